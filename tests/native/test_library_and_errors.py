"""Loading the library (order, errors, once and thread-safe), the exception classes, and the CLI."""

from __future__ import annotations

import os
import pickle
import subprocess
import sys
import threading

import pytest

import pycusparselt
from pycusparselt import bindings, errors
from pycusparselt._native import library as _library
from pycusparselt.enums import Status


def _library_or_skip():
    try:
        return _library.load()
    except errors.LibraryNotFoundError as exc:
        if os.environ.get("PYCUSPARSELT_REQUIRE_HEADER") == "1":
            raise
        pytest.skip(f"cuSPARSELt is not installed: {exc}")


@pytest.fixture
def fresh_loader(monkeypatch):
    """Forget the loaded library for one test (the real one is restored afterwards)."""
    monkeypatch.setattr(_library, "_loaded", None)
    yield
    # monkeypatch restores _loaded


def test_library_version_and_path():
    loaded = _library_or_skip()
    version = pycusparselt.library_version()
    assert isinstance(version, tuple) and len(version) == 3 and all(isinstance(v, int) for v in version)
    assert version >= _library.MIN_VERSION
    assert version == loaded.version
    assert os.path.basename(pycusparselt.library_path()).startswith("libcusparseLt")
    assert bindings.get_property(0) == version[0] and bindings.get_property(1) == version[1]


def test_env_var_to_missing_file(fresh_loader, monkeypatch):
    monkeypatch.setenv(_library.ENV_VAR, "/nonexistent/libcusparseLt.so.0")
    with pytest.raises(errors.LibraryNotFoundError, match="PYCUSPARSELT_LIBRARY=.*no such file"):
        _library.load()


def test_env_var_to_a_file_that_is_no_library(fresh_loader, monkeypatch, tmp_path):
    bogus = tmp_path / "libcusparseLt.so.0"
    bogus.write_text("not a shared library")
    monkeypatch.setenv(_library.ENV_VAR, str(bogus))
    with pytest.raises(errors.LibraryNotFoundError, match="could not be loaded.*pip install"):
        _library.load()


def test_env_var_to_a_library_that_is_not_cusparselt(fresh_loader, monkeypatch):
    import ctypes.util

    other = ctypes.util.find_library("z") or ctypes.util.find_library("m")
    if other is None or not os.path.isabs(other):  # find_library may give only a name: find its file
        candidates = [p for p in ("/lib/x86_64-linux-gnu/libz.so.1", "/usr/lib/x86_64-linux-gnu/libz.so.1",
                                  "/lib/x86_64-linux-gnu/libm.so.6", "/usr/lib64/libm.so.6") if os.path.exists(p)]
        if not candidates:
            pytest.skip("no other shared library found on this machine to point the variable at")
        other = candidates[0]
    monkeypatch.setenv(_library.ENV_VAR, other)
    with pytest.raises(errors.LibraryNotFoundError, match="is not libcusparseLt"):
        _library.load()
    result = subprocess.run([sys.executable, "-P", "-m", "pycusparselt", "info"], capture_output=True, text=True,
                            env={**os.environ, _library.ENV_VAR: other}, timeout=120)
    assert "Traceback" not in result.stderr and "is not libcusparseLt" in result.stdout + result.stderr


def test_env_var_with_a_home_directory(fresh_loader, monkeypatch, tmp_path):
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.setenv(_library.ENV_VAR, "~/absent/libcusparseLt.so.0")
    with pytest.raises(errors.LibraryNotFoundError, match=str(tmp_path / "absent")):
        _library.load()


def test_env_var_takes_precedence(fresh_loader, monkeypatch):
    real = _library_or_skip()
    monkeypatch.setattr(_library, "_loaded", None)
    monkeypatch.setenv(_library.ENV_VAR, real.path)
    loaded = _library.load()
    assert loaded.found_via == "$PYCUSPARSELT_LIBRARY" and loaded.path == real.path


def test_missing_library_names_the_pip_package(fresh_loader, monkeypatch):
    from cuda import pathfinder

    def not_found(name):
        raise pathfinder.DynamicLibNotFoundError(f"{name} nowhere")

    monkeypatch.delenv(_library.ENV_VAR, raising=False)
    monkeypatch.setattr(pathfinder, "load_nvidia_dynamic_lib", not_found)
    with pytest.raises(errors.LibraryNotFoundError) as info:
        _library.load()
    assert isinstance(info.value, ImportError)
    assert "pip install nvidia-cusparselt-cu1" in str(info.value)
    assert _library.ENV_VAR in str(info.value)


def test_too_old_library_is_refused(fresh_loader, monkeypatch):
    _library_or_skip()
    monkeypatch.setattr(_library, "_loaded", None)
    monkeypatch.setattr(_library, "_query_version", lambda lib: (0, 6, 3))
    expected = r"0\.6\.3 .* too old: pycusparselt needs 0\.8\.0.*pip install"
    with pytest.raises(errors.LibraryNotFoundError, match=expected):
        _library.load()


def test_newer_library_warns(fresh_loader, monkeypatch):
    _library_or_skip()
    monkeypatch.setattr(_library, "_loaded", None)
    monkeypatch.setattr(_library, "_query_version", lambda lib: (0, 11, 0))
    with pytest.warns(_library.UntestedLibraryWarning, match="0.11.0"):
        _library.load()


def test_load_is_once_and_thread_safe(fresh_loader, monkeypatch):
    _library_or_skip()
    monkeypatch.setattr(_library, "_loaded", None)
    calls = []
    real_locate = _library._locate

    def counting_locate():
        calls.append(1)
        return real_locate()

    monkeypatch.setattr(_library, "_locate", counting_locate)
    results = []
    barrier = threading.Barrier(8)

    def worker():
        barrier.wait()
        results.append(_library.load())

    threads = [threading.Thread(target=worker) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(calls) == 1
    assert len(results) == 8 and all(r is results[0] for r in results)


def test_init_without_gpu_raises_not_initialized_with_hint():
    _library_or_skip()
    from pycusparselt._native.devices import cuda_devices

    devices, _ = cuda_devices()
    if devices:
        pytest.skip("a GPU is present: cusparseLtInit succeeds here")
    handle = bindings.RawHandle()
    with pytest.raises(errors.NotInitializedError) as info:
        bindings.init(handle)
    err = info.value
    assert err.function == "cusparseLtInit" and err.status == Status.NOT_INITIALIZED
    assert err.name == "CUSPARSE_STATUS_NOT_INITIALIZED" and err.text
    assert "compute capability 8.0" in err.hint
    assert not handle.initialized


def test_error_classes_by_status():
    expect = {
        Status.NOT_INITIALIZED: errors.NotInitializedError,
        Status.ALLOC_FAILED: errors.AllocFailedError,
        Status.INVALID_VALUE: errors.InvalidValueError,
        Status.ARCH_MISMATCH: errors.ArchMismatchError,
        Status.EXECUTION_FAILED: errors.ExecutionFailedError,
        Status.INTERNAL_ERROR: errors.InternalError,
        Status.NOT_SUPPORTED: errors.NotSupportedError,
        Status.INSUFFICIENT_RESOURCES: errors.InsufficientResourcesError,
    }
    for status, cls in expect.items():
        assert errors.error_class_for_status(status) is cls
    for status in Status:
        if status != Status.SUCCESS:
            assert issubclass(errors.error_class_for_status(status), errors.CuSparseLtError)
    assert issubclass(errors.InvalidValueError, ValueError)
    assert issubclass(errors.NotSupportedError, errors.CuSparseLtUsageError)
    assert issubclass(errors.AllocFailedError, MemoryError)
    assert issubclass(errors.InternalError, errors.CuSparseLtRuntimeError)
    assert not issubclass(errors.InternalError, errors.CuSparseLtUsageError)


def test_check_status_uses_the_library_text_and_our_hint():
    _library_or_skip()
    bindings.check_status("cusparseLtMatmul", 0)  # success: nothing
    with pytest.raises(errors.NotSupportedError) as info:
        bindings.check_status("cusparseLtMatmulDescriptorInit", Status.NOT_SUPPORTED)
    message = str(info.value)
    assert message.startswith("cusparseLtMatmulDescriptorInit failed with CUSPARSE_STATUS_NOT_SUPPORTED (10): ")
    assert "'TN' form" in message
    with pytest.raises(errors.InternalError) as info:
        bindings.check_status("cusparseLtMatmul", Status.INTERNAL_ERROR, hint="our own words")
    assert info.value.hint == "our own words" and "our own words" in str(info.value)


@pytest.mark.parametrize(
    "cls", [errors.InvalidValueError, errors.InternalError, errors.AllocFailedError, errors.CuSparseLtError]
)
def test_errors_pickle(cls):
    err = cls("cusparseLtMatmul", 3, "CUSPARSE_STATUS_INVALID_VALUE", "invalid value", "a hint")
    again = pickle.loads(pickle.dumps(err))
    assert type(again) is cls
    assert (again.function, again.status, again.name, again.text, again.hint) == (
        err.function, err.status, err.name, err.text, err.hint)
    assert str(again) == str(err)
    lib_err = pickle.loads(pickle.dumps(errors.LibraryNotFoundError("gone")))
    assert isinstance(lib_err, ImportError) and str(lib_err) == "gone"


def _run_cli(*args: str) -> subprocess.CompletedProcess:
    # -P keeps the checkout off sys.path: the installed package runs.
    return subprocess.run([sys.executable, "-P", "-m", "pycusparselt", *args], capture_output=True, text=True,
                          timeout=300)


def test_cli_info():
    result = _run_cli("info")
    assert result.returncode == 0, result.stderr
    assert "pycusparselt" in result.stdout and "cffi" in result.stdout and "NumPy" in result.stdout
    assert "cuSPARSELt" in result.stdout
    from pycusparselt._native.devices import cuda_devices

    devices, reason = cuda_devices()
    if devices:
        assert "Sparse Tensor Cores" in result.stdout
    else:
        assert "GPU          none: " in result.stdout


def test_cli_demo_reference_path():
    result = _run_cli("demo", "--path", "reference", "-m", "32", "-n", "16", "-k", "64")
    assert result.returncode == 0, result.stderr
    assert "on the NumPy reference" in result.stdout
    assert "D[:2, :4]" in result.stdout


def test_cli_demo_auto_says_which_path():
    result = _run_cli("demo", "-m", "64", "-n", "64", "-k", "64")
    assert result.returncode == 0, result.stderr
    from pycusparselt._native.devices import gpu_unavailable_reason

    if gpu_unavailable_reason() is None:
        assert "on the GPU through cuSPARSELt" in result.stdout
        assert "relative error" in result.stdout
    else:
        assert "on the NumPy reference (no GPU path:" in result.stdout


def test_a_machine_without_an_nvidia_driver_is_named_as_such(monkeypatch):
    """The CUDA runtime reports a missing driver as 'insufficient'; the reason says there is no driver."""
    from types import SimpleNamespace

    from pycusparselt._native import devices

    def no_driver():
        raise RuntimeError("cudaErrorInsufficientDriver: CUDA driver version is insufficient for CUDA runtime version")

    fake = SimpleNamespace(cuda=SimpleNamespace(runtime=SimpleNamespace(getDeviceCount=no_driver)))
    monkeypatch.setattr(devices.gpu, "cupy", lambda: fake)
    monkeypatch.setattr(devices, "nvidia_driver_found", lambda: False)
    assert devices.gpu_unavailable_reason().startswith("no NVIDIA driver found")
    monkeypatch.setattr(devices, "nvidia_driver_found", lambda: True)  # a driver too old: CUDA's own words
    assert "CUDA driver version is insufficient" in devices.gpu_unavailable_reason()


def test_pytest_reports_one_line_per_gpu_skip_reason():
    """``pytest -ra`` without a usable GPU: the GPU tests' reason once, with their count, not once per test."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    tests = Path(__file__).resolve().parents[1]
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}
    result = subprocess.run([sys.executable, "-m", "pytest", "-q", "-ra", "-p", "no:cacheprovider",
                             str(tests / "nn" / "test_linear_gpu.py"), str(tests / "tuning" / "test_tuning_gpu.py")],
                            capture_output=True, text=True, timeout=300, env=env, cwd=tests.parent)
    lines = [line for line in result.stdout.splitlines() if line.startswith("SKIPPED") and "GPU test: " in line]
    assert len(lines) == 1, result.stdout[-3000:]
    count = int(lines[0].split("[")[1].split("]")[0])
    assert count > 20 and f"{count} skipped" in result.stdout


def test_info_says_when_it_runs_from_a_checkout_without_its_built_modules(tmp_path):
    from pycusparselt.cli import source_checkout_note

    package = tmp_path / "pycusparselt"
    package.mkdir()
    assert source_checkout_note(str(package)) is None  # not a checkout
    (tmp_path / "pyproject.toml").write_text("[project]\nname = 'pycusparselt'\n")
    (tmp_path / "build_ffi.py").write_text("")
    note = source_checkout_note(str(package))
    assert note.startswith(f"the source checkout at {tmp_path} ") and "pycusparselt._fastcall" in note
    assert "pycusparselt._cusparselt_cffi" in note and "pip install -e ." in note and "\n" not in note
    (package / "_cusparselt_cffi.py").write_text("")
    (package / "_fastcall.abi3.so").write_bytes(b"")
    assert source_checkout_note(str(package)) is None  # built in place (pip install -e .)


def test_info_prints_one_line_per_item():
    import subprocess
    import sys

    result = subprocess.run([sys.executable, "-P", "-m", "pycusparselt", "info"], capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0, result.stderr
    labels = ("pycusparselt ", "source ", "cuSPARSELt ", "cffi ", "matmul call ", "NumPy ", "ml_dtypes ", "CuPy ",
              "GPU", "decode ")
    assert all(line.startswith(labels) for line in result.stdout.splitlines()), result.stdout


def test_a_library_not_found_message_is_one_line(monkeypatch):
    from pycusparselt._native import library

    class Finder:
        @staticmethod
        def load_nvidia_dynamic_lib(name):
            raise RuntimeError('Failure finding "libcusparseLt.so.0": No such file,\nNo such file\n')

    pytest.importorskip("cuda.pathfinder")
    monkeypatch.setattr(sys.modules["cuda"], "pathfinder", Finder)
    monkeypatch.delenv(library.ENV_VAR, raising=False)
    try:
        library._locate()
    except library.LibraryNotFoundError as exc:
        assert "\n" not in str(exc) and "No such file, No such file)" in str(exc)
    else:
        pytest.fail("no LibraryNotFoundError")
