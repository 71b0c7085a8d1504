"""Our cdef (build_ffi.py) against the installed cusparseLt.h: every signature, enum value and struct.

The header comes from ``cuda.pathfinder.find_nvidia_header_directory("cusparseLt")`` (the pip wheels ship
it). Where none is installed the tests skip, unless ``PYCUSPARSELT_REQUIRE_HEADER=1`` (set by CI), where a
missing header is a failure. The mutation tests prove the checker notices any single change to the cdef.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import sys
from pathlib import Path

import pytest

import cdef_check

ROOT = Path(__file__).resolve().parent.parent


def _load_build_ffi():
    spec = importlib.util.spec_from_file_location("build_ffi", ROOT / "build_ffi.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


build_ffi = _load_build_ffi()


def _header_dir() -> str | None:
    try:
        from cuda import pathfinder

        return pathfinder.find_nvidia_header_directory("cusparseLt")
    except Exception:
        return None


def _cuda_include_dirs() -> list[Path]:
    """Where CUDA's library_types.h may be: the CUDA runtime wheel, CUDA_HOME, /usr/local/cuda."""
    dirs = []
    try:
        from cuda import pathfinder

        found = pathfinder.find_nvidia_header_directory("cudart")
        if found:
            dirs.append(Path(found))
    except Exception:
        pass
    for var in ("CUDA_HOME", "CUDA_PATH"):
        if os.environ.get(var):
            dirs.append(Path(os.environ[var]) / "include")
    dirs.append(Path("/usr/local/cuda/include"))
    return [d for d in dirs if (d / "library_types.h").is_file()]


@pytest.fixture(scope="module")
def header_dir() -> str:
    found = _header_dir()
    if found is None:
        if os.environ.get("PYCUSPARSELT_REQUIRE_HEADER") == "1":
            pytest.fail("cusparseLt.h not found, and PYCUSPARSELT_REQUIRE_HEADER=1 (install nvidia-cusparselt-cu13)")
        pytest.skip("cusparseLt.h is not installed (pip install nvidia-cusparselt-cu13)")
    return found


def _ours(cdef: str) -> cdef_check.Declarations:
    return cdef_check.parse(cdef.replace(build_ffi.CUDA_TYPES_CDEF + build_ffi.CUSPARSE_TYPES_CDEF, ""),
                            prelude=build_ffi.CUDA_TYPES_CDEF + build_ffi.CUSPARSE_TYPES_CDEF)


def _header(header_dir: str) -> cdef_check.Declarations:
    text = cdef_check.read_header(header_dir, "cusparseLt.h")
    return cdef_check.parse(cdef_check.preprocess_header(text),
                            prelude=build_ffi.CUDA_TYPES_CDEF + build_ffi.CUSPARSE_TYPES_CDEF)


def check_cdef(cdef: str, header_dir: str) -> list[str]:
    """Every difference between ``cdef`` and the installed headers (cusparseLt.h, and the cuSPARSE stub
    where the wheel ships it)."""
    problems = cdef_check.compare(_header(header_dir), _ours(cdef))
    stub = cdef_check.read_header(header_dir, "cusparseLt_cusparse_stub.h")
    ours_outside = cdef_check.parse(cdef.split(build_ffi.CUSPARSELT_CDEF)[0])
    if stub is not None:
        theirs = cdef_check.parse(cdef_check.preprocess_header(stub))
        problems += cdef_check.compare(theirs, _only(ours_outside, theirs.enums), "cuSPARSE stub")
    return problems


def _only(decls: cdef_check.Declarations, names) -> cdef_check.Declarations:
    return cdef_check.Declarations(enums={k: v for k, v in decls.enums.items() if k in names})


def test_cdef_matches_installed_header(header_dir):
    problems = check_cdef(build_ffi.CDEF, header_dir)
    assert problems == []


def test_cdef_declares_the_whole_api(header_dir):
    ours = _ours(build_ffi.CDEF)
    assert len(ours.functions) == 31
    assert set(ours.functions) == set(_header(header_dir).functions)


@pytest.mark.parametrize(
    "old, new, expect",
    [
        ("CUSPARSE_ORDER_ROW = 2", "CUSPARSE_ORDER_ROW = 3", "CUSPARSE_ORDER_ROW"),
        ("CUSPARSELT_MATMUL_SPLIT_K_BUFFERS   = 5", "CUSPARSELT_MATMUL_SPLIT_K_BUFFERS   = 6", "SPLIT_K_BUFFERS"),
        ("CUSPARSELT_PRUNE_SPMMA_STRIP = 1", "CUSPARSELT_PRUNE_SPMMA_STRIP = 0", "SPMMA_STRIP"),
        ("    CUSPARSELT_MATMUL_D_OUT_SCALE_POINTER        = 19\n", "", "D_OUT_SCALE_POINTER"),
        ("    CUSPARSELT_STREAMK                  = 6\n", "    CUSPARSELT_STREAMK = 6,\n    CUSPARSELT_EXTRA = 7\n",
         "CUSPARSELT_EXTRA"),
        ("int64_t rows, int64_t cols, int64_t ld,\n                                               uint32_t",
         "int32_t rows, int64_t cols, int64_t ld,\n                                               uint32_t",
         "cusparseLtDenseDescriptorInit"),
        ("cusparseLtMatmulPlanDestroy(const cusparseLtMatmulPlan_t* plan)",
         "cusparseLtMatmulPlanDestroy(cusparseLtMatmulPlan_t* plan)", "cusparseLtMatmulPlanDestroy"),
        ("const char* cusparseLtGetErrorName", "char* cusparseLtGetErrorName", "cusparseLtGetErrorName"),
        ("void* workspace, cudaStream_t* streams, int32_t numStreams);\n\ncusparseStatus_t cusparseLtMatmulSearch",
         "void* workspace, cudaStream_t streams, int32_t numStreams);\n\ncusparseStatus_t cusparseLtMatmulSearch",
         "cusparseLtMatmul:"),
        ("typedef struct { uint8_t data[512]; } cusparseLtMatmulPlan_t;",
         "typedef struct { uint8_t data[256]; } cusparseLtMatmulPlan_t;", "cusparseLtMatmulPlan_t"),
        ("cusparseStatus_t cusparseLtGetVersion(const cusparseLtHandle_t* handle, int* version);\n", "",
         "cusparseLtGetVersion"),
        ("CUSPARSE_STATUS_NOT_SUPPORTED             = 10", "CUSPARSE_STATUS_NOT_SUPPORTED             = 12",
         "CUSPARSE_STATUS_NOT_SUPPORTED"),
    ],
    ids=lambda value: None,
)
def test_checker_reports_every_mutation(header_dir, old, new, expect):
    if expect == "CUSPARSE_STATUS_NOT_SUPPORTED" and not (Path(header_dir) / "cusparseLt_cusparse_stub.h").is_file():
        pytest.skip("this cuSPARSELt wheel ships no cuSPARSE stub header to compare the status values with")
    assert old in build_ffi.CDEF, "the mutation no longer applies to the cdef: update the test"
    mutated = build_ffi.CDEF.replace(old, new, 1)
    problems = check_cdef(mutated, header_dir)
    assert any(expect in p for p in problems), problems


def test_cuda_types_match_the_cuda_headers():
    dirs = _cuda_include_dirs()
    if not dirs:
        pytest.skip("CUDA's library_types.h is not installed here (no CUDA toolkit or runtime wheel)")
    theirs = cdef_check.parse(cdef_check.preprocess_header((dirs[0] / "library_types.h").read_text()))
    ours = cdef_check.parse(build_ffi.CUDA_TYPES_CDEF.split("typedef struct CUstream_st")[0])
    problems = []
    for name in ("cudaDataType", "libraryPropertyType"):
        # CUDA's typedefs name the enums `enum cudaDataType_t` etc.; compare constants and values.
        their_values = next((v for k, v in theirs.enums.items() if k == name), None)
        assert their_values is not None, f"{name} not found in {dirs[0]}/library_types.h"
        problems += cdef_check.compare_enum_subset(name, their_values, ours.enums[name], "CUDA header")
    assert problems == []


def test_every_declared_function_is_exported_by_the_library():
    """The loaded library resolves every function we declare (it loads without a GPU)."""
    from pycusparselt import _library
    from pycusparselt.errors import LibraryNotFoundError

    try:
        lib = _library.load().lib
    except LibraryNotFoundError as exc:
        if os.environ.get("PYCUSPARSELT_REQUIRE_HEADER") == "1":
            raise
        pytest.skip(str(exc))
    for name in _ours(build_ffi.CDEF).functions:
        assert callable(getattr(lib, name)), name


def test_compiled_check_against_the_header(header_dir, tmp_path):
    """Second layer: an API-mode build of the same cdef against the real header. The compiler checks every
    signature (pointer and integer mismatches are errors); every enum constant's compiled value is compared
    with ours."""
    import cffi

    cuda_dirs = _cuda_include_dirs()
    if shutil.which("cc") is None and shutil.which("gcc") is None:
        pytest.skip("no C compiler here")
    if not cuda_dirs or not (cuda_dirs[0] / "driver_types.h").is_file():
        pytest.skip("CUDA's driver_types.h/library_types.h are not installed here (cusparseLt.h includes them)")
    ffi = cffi.FFI()
    # cdef without our copies of the CUDA/cuSPARSE types: those come from the real headers in the build.
    ffi.cdef(build_ffi.CDEF.replace("typedef struct { uint8_t data[512]; }", "typedef struct { uint8_t data[512]; ...; }"))
    ffi.set_source(
        "_pycusparselt_conformance",
        '#include "cusparseLt.h"',
        include_dirs=[header_dir, str(cuda_dirs[0])],
        extra_compile_args=["-Werror=incompatible-pointer-types", "-Werror=int-conversion", "-Wno-unused"],
    )
    try:
        library = ffi.compile(tmpdir=str(tmp_path), verbose=False)
    except Exception as exc:
        pytest.fail(f"the cdef does not compile against the real header: {exc}")
    import ctypes

    from pycusparselt import _library

    # The extension is not linked against libcusparseLt: make its symbols global before importing it.
    ctypes.CDLL(_library.load().path, mode=ctypes.RTLD_GLOBAL)
    sys.path.insert(0, str(tmp_path))
    try:
        spec = importlib.util.spec_from_file_location("_pycusparselt_conformance", library)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        # API mode takes enum values from the compiled header: they must equal the ones we declare.
        ours = cdef_check.parse(build_ffi.CDEF)
        mismatches = {
            name: (getattr(module.lib, name), value)
            for values in ours.enums.values()
            for name, value in values.items()
            if getattr(module.lib, name) != value
        }
        assert mismatches == {}, "constant: (header, cdef)"
    finally:
        sys.path.remove(str(tmp_path))
