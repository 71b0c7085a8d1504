"""The per-call path without a GPU: the compiled shim and the ABI pointer type hand cusparseLtMatmul exactly the
arguments MatmulCall, PreparedMatmul and a plan's Launcher fixed, and a failing status raises.

A cffi callback with cusparseLtMatmul's signature stands in for the library: it records what it was called
with and returns the status it is told to."""

from __future__ import annotations

import functools
import os
import re

import pytest
from checkout import build_ffi  # build_ffi.py, loaded from the checkout

from pycusparselt import bindings as b
from pycusparselt.enums import Status
from pycusparselt._native.ffi import ffi
from pycusparselt.errors import CuSparseLtError

#: Made-up device addresses in these tests are below this; host buffers from ffi.new are above it.
HOST = 1 << 24

SIGNATURE = "int(" + ", ".join(["intptr_t"] * 10) + ", int)"


def compiled_module():
    try:
        from pycusparselt import _fastcall
    except ImportError as exc:
        if os.environ.get("PYCUSPARSELT_REQUIRE_HEADER") == "1":  # CI has a compiler: the module must be built
            pytest.fail(f"pycusparselt._fastcall was not built: {exc}")
        pytest.skip(f"pycusparselt._fastcall was not built here (no compiler at install time?): {exc}")
    return _fastcall


class FakeLibrary:
    """A C function with cusparseLtMatmul's parameters; remembers its calls (and the values behind alpha, beta
    and the stream array, read while the call runs)."""

    def __init__(self, status: int = 0) -> None:
        self.status = status
        self.calls: list[tuple] = []
        self.seen: list[tuple] = []

        def matmul(*args):
            self.calls.append(args)
            alpha, beta, streams = args[2], args[5], args[9]
            if min(alpha, beta, streams) > HOST:  # host buffers (the made-up device addresses are small)
                self.seen.append((ffi.cast("float *", alpha)[0], ffi.cast("float *", beta)[0],
                                  int(ffi.cast("intptr_t", ffi.cast("cudaStream_t *", streams)[0]))))
            return self.status

        self.callback = ffi.callback(SIGNATURE, matmul)
        self.address = int(ffi.cast("intptr_t", self.callback))


def callers(fake: FakeLibrary) -> dict:
    """Both paths, each calling the fake library: the compiled shim (where built) and the ABI pointer type."""
    paths = {"abi": ffi.cast("pycusparselt_matmul_fn", fake.callback)}
    try:
        from pycusparselt._fastcall import lib
    except ImportError:
        pass
    else:
        paths["compiled"] = functools.partial(lib.pycusparselt_matmul_at, fake.address)
    return paths


def fake_call(fn, kind: str, ints=(1111, 2222, 0, 4444, 0)) -> b.MatmulCall:
    """A MatmulCall over the fake library (its handle and plan addresses made up: the fake reads neither)."""
    call = object.__new__(b.MatmulCall)
    call._fn, call.kind = fn, kind
    call._alpha, call._beta = ffi.new("float *"), ffi.new("float *")
    call._stream = ffi.new("cudaStream_t[1]")
    call._last_stream = 0
    call._alpha_at = int(ffi.cast("intptr_t", call._alpha))
    handle, plan, _, workspace, _ = ints
    call._ints = (handle, plan, int(ffi.cast("intptr_t", call._beta)), workspace,
                  int(ffi.cast("intptr_t", call._stream)))
    return call


def test_compiled_shim_forwards_every_argument():
    lib = compiled_module().lib
    fake = FakeLibrary(status=7)
    alpha, beta, streams = ffi.new("float *", 1.5), ffi.new("float *", -2.0), ffi.new("cudaStream_t[1]")
    args = (11, 22, int(ffi.cast("intptr_t", alpha)), 44, 55, int(ffi.cast("intptr_t", beta)), 77, 88, 99,
            int(ffi.cast("intptr_t", streams)), 3)
    assert lib.pycusparselt_matmul_at(fake.address, *args) == 7
    assert fake.calls == [args]
    assert fake.seen == [(1.5, -2.0, 0)]


@pytest.mark.parametrize("kind", ["abi", "compiled"])
def test_matmul_call_passes_its_arguments(kind):
    fake = FakeLibrary()
    paths = callers(fake)
    if kind not in paths:
        compiled_module()  # fails in CI, skips elsewhere
    call = fake_call(paths[kind], kind)
    call(0.5, 0xA000, 0xB000, 0.25, 0xC000, 0xD000, 0x5151)
    call(2.0, 0xA100, 0xB100, 0.0, 0xC100, 0xD100, 0x5151)
    (first, second) = fake.calls
    assert first[:2] == (1111, 2222) and first[3:5] == (0xA000, 0xB000) and first[6:9] == (0xC000, 0xD000, 4444)
    assert first[10] == 1 and second[3:5] == (0xA100, 0xB100)
    assert fake.seen == [(0.5, 0.25, 0x5151), (2.0, 0.0, 0x5151)]
    # a device alpha is passed as its address, not through the host buffer
    call(b.DevicePointer(0xF00D), 1, 2, 0.0, 3, 4, 0x5151)
    assert fake.calls[-1][2] == 0xF00D


@pytest.mark.parametrize("kind", ["abi", "compiled"])
def test_prepared_matmul_owns_its_scalars_and_stream(kind):
    fake = FakeLibrary()
    paths = callers(fake)
    if kind not in paths:
        compiled_module()
    call = fake_call(paths[kind], kind)
    first = call.prepare(0.5, 0xA0, 0xB0, 1.0, 0xC0, 0xD0, 0x11)
    second = call.prepare(3.0, 0xA1, 0xB1, 0.0, 0xC1, 0xD1, 0x22)
    call(9.0, 1, 2, 9.0, 3, 4, 0x33)  # the MatmulCall's own buffers change; the prepared ones must not
    assert first.launch() == 0
    second()
    assert fake.seen[1:] == [(0.5, 1.0, 0x11), (3.0, 0.0, 0x22)]
    assert fake.calls[1][3:5] == (0xA0, 0xB0) and fake.calls[2][6:8] == (0xC1, 0xD1)
    assert first.kind == kind
    device_alpha = call.prepare(b.DevicePointer(0xBEEF), 1, 2, 0.0, 3, 4, 0)
    device_alpha()
    assert fake.calls[-1][2] == 0xBEEF


@pytest.mark.parametrize("kind", ["abi", "compiled"])
def test_a_failing_status_raises_naming_the_function(kind):
    fake = FakeLibrary(status=int(Status.INVALID_VALUE))
    paths = callers(fake)
    if kind not in paths:
        compiled_module()
    call = fake_call(paths[kind], kind)
    with pytest.raises(CuSparseLtError, match="cusparseLtMatmul.*INVALID_VALUE"):
        call(1.0, 1, 2, 0.0, 3, 4, 0)
    prepared = call.prepare(1.0, 1, 2, 0.0, 3, 4, 0)
    assert prepared.launch() == int(Status.INVALID_VALUE)  # the raw status, for callers that check it
    with pytest.raises(CuSparseLtError, match="cusparseLtMatmul.*INVALID_VALUE"):
        prepared()


def test_fast_call_switch(monkeypatch):
    monkeypatch.setenv("PYCUSPARSELT_FAST_CALL", "0")
    assert b.matmul_call_path() == "abi (PYCUSPARSELT_FAST_CALL is off)"
    monkeypatch.delenv("PYCUSPARSELT_FAST_CALL")
    compiled_module()
    assert b.matmul_call_path() == "compiled"


def test_shim_has_cusparselt_matmul_parameters():
    """The shim's pointer type lists cusparseLtMatmul's parameters (its declaration is checked against the
    header elsewhere): same count, a pointer where the header has one, the int32 count last."""
    declared = re.search(r"cusparseLtMatmul\s*\(([^)]*)\)", build_ffi.CUSPARSELT_CDEF).group(1)
    header_params = [p.strip() for p in declared.split(",")]
    shim = re.search(r"pycusparselt_matmul_ptr\)\(([^)]*)\)", build_ffi.FASTCALL_SOURCE).group(1)
    shim_params = [p.strip() for p in shim.split(",")]
    assert len(shim_params) == len(header_params) == 11
    for ours, theirs in zip(shim_params[:-1], header_params[:-1], strict=True):
        assert "*" in ours and ("*" in theirs or "cudaStream_t" in theirs), (ours, theirs)
        assert ours.startswith("const") == theirs.startswith("const"), (ours, theirs)
    assert "int32_t" in shim_params[-1] and "int32_t" in header_params[-1]


# -- the plan's launcher (pycusparselt.gemm.launch.Launcher) calls the C function itself ------------------------


class _FakePlan:
    """What a Launcher reads of its plan: the call object of the current configuration (None once closed), the
    device, and what check_compressed compares."""

    device = 0
    sparse = "b"
    sparse_key = ("sparse",)
    compressed_key = ("sparse", "problem", 0)

    def __init__(self, call) -> None:
        self.matmul_call = call

    def compressed_size(self) -> int:
        return 64


def _launcher(monkeypatch, call, alpha):
    from types import SimpleNamespace

    from pycusparselt.gemm import launch

    runtime = SimpleNamespace(getDevice=lambda: 0)  # no GPU needed: the plan's device is current
    monkeypatch.setattr(launch.gpu, "cupy", lambda: SimpleNamespace(cuda=SimpleNamespace(runtime=runtime)))
    plan = _FakePlan(call)
    buffer = SimpleNamespace(nbytes=64, data=SimpleNamespace(ptr=0xA000))
    compressed = launch.CompressedOperand(buffer, plan.compressed_key, (32, 16), None, "b")
    return plan, compressed, launch.Launcher(plan, compressed, alpha)


@pytest.mark.parametrize("kind", ["abi", "compiled"])
def test_launcher_passes_its_fixed_arguments_and_the_calls(kind, monkeypatch):
    """The launcher hands cusparseLtMatmul the plan's handle, plan and workspace, its own alpha, beta = 0 and
    stream buffers, S (the compressed operand) as A, X as B and D as both C and D; the plan's call object's
    buffers (changed by other calls) are not read."""
    fake = FakeLibrary()
    paths = callers(fake)
    if kind not in paths:
        compiled_module()
    call = fake_call(paths[kind], kind)
    plan, compressed, launcher = _launcher(monkeypatch, call, 0.5)
    call(9.0, 1, 2, 9.0, 3, 4, 0x33)  # another call of the plan: its own buffers change
    launcher(0xB000, 0xD000, 0x5151)
    launcher(0xB100, 0xD100, 0x5151)
    launcher(0xB200, 0xD200, 0x6161)
    first, second, third = fake.calls[1:]
    assert first[:2] == (1111, 2222) and first[3:5] == (0xA000, 0xB000) and first[6:9] == (0xD000, 0xD000, 4444)
    assert first[10] == 1 and second[3:5] == (0xA000, 0xB100) and second[6:8] == (0xD100, 0xD100)
    assert third[4] == 0xB200 and third[6:8] == (0xD200, 0xD200)
    assert fake.seen[1:] == [(0.5, 0.0, 0x5151), (0.5, 0.0, 0x5151), (0.5, 0.0, 0x6161)]
    # a re-initialised plan (a new call object): the new handle, plan and workspace
    plan.matmul_call = fake_call(paths[kind], kind, ints=(3333, 5555, 0, 7777, 0))
    launcher(0xB300, 0xD300, 0x6161)
    assert fake.calls[-1][:2] == (3333, 5555) and fake.calls[-1][8] == 7777 and fake.calls[-1][3] == 0xA000
    assert fake.seen[-1] == (0.5, 0.0, 0x6161)


@pytest.mark.parametrize("kind", ["abi", "compiled"])
def test_launcher_with_a_device_alpha_and_its_failures(kind, monkeypatch):
    from pycusparselt.errors import ClosedError

    fake = FakeLibrary()
    paths = callers(fake)
    if kind not in paths:
        compiled_module()
    plan, compressed, launcher = _launcher(monkeypatch, fake_call(paths[kind], kind), b.DevicePointer(0xF00D))
    launcher(0xB000, 0xD000, 0)
    assert fake.calls[-1][2] == 0xF00D  # the vector alpha's address, not a host buffer
    fake.status = int(Status.INVALID_VALUE)
    with pytest.raises(CuSparseLtError, match="cusparseLtMatmul.*INVALID_VALUE"):
        launcher(0xB000, 0xD000, 0)
    fake.status = 0
    count = len(fake.calls)
    compressed.close()
    with pytest.raises(ClosedError, match="compressed operand"):
        launcher(0xB000, 0xD000, 0)
    plan.matmul_call = None
    with pytest.raises(ClosedError, match="plan was closed"):
        launcher(0xB000, 0xD000, 0)
    assert len(fake.calls) == count  # nothing reached the library
