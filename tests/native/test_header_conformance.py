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

ROOT = Path(__file__).resolve().parents[2]


def _load_build_ffi():
    spec = importlib.util.spec_from_file_location("build_ffi", ROOT / "build_ffi.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


build_ffi = _load_build_ffi()


def _header_dir() -> str | None:
    if os.environ.get("PYCUSPARSELT_HEADER_DIR"):  # check another release's header
        return os.environ["PYCUSPARSELT_HEADER_DIR"]
    try:
        from cuda import pathfinder

        return pathfinder.find_nvidia_header_directory("cusparseLt")
    except Exception:
        return None


def _nvidia_header_dirs(libname: str) -> list[str]:
    try:
        from cuda import pathfinder

        found = pathfinder.find_nvidia_header_directory(libname)
    except Exception:
        return []
    return [found] if found else []


def _cuda_include_dirs() -> list[Path]:
    """Where CUDA's library_types.h may be: the CUDA runtime wheel, CUDA_HOME, /usr/local/cuda."""
    dirs = [Path(d) for d in _nvidia_header_dirs("cudart")]
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


def _split(cdef: str) -> tuple[str, str]:
    """(the CUDA and cuSPARSE types, cusparseLt.h's own declarations): the latter start at its first struct."""
    start = cdef.index("typedef struct { uint8_t data[")
    return cdef[:start], cdef[start:]


def _ours(cdef: str) -> cdef_check.Declarations:
    outside, own = _split(cdef)
    return cdef_check.parse(own, prelude=outside)


def _header(header_dir: str, cdef: str = build_ffi.CDEF) -> cdef_check.Declarations:
    text = cdef_check.read_header(header_dir, "cusparseLt.h")
    return cdef_check.parse(cdef_check.preprocess_header(text), prelude=_split(cdef)[0])


CUSPARSE_ENUMS = ("cusparseStatus_t", "cusparseOperation_t", "cusparseOrder_t")


def _cusparse_source(header_dir: str) -> tuple[str, str, bool] | None:
    """(where, text, exact) of the cuSPARSE enums cuSPARSELt uses: the 0.10 wheel's stub (exact: the same
    constants), else a toolkit or wheel cusparse.h (ours must be a subset: it has more operations)."""
    stub = cdef_check.read_header(header_dir, "cusparseLt_cusparse_stub.h")
    if stub is not None:
        return "cuSPARSE stub", stub, True
    for directory in [header_dir, *map(str, _cuda_include_dirs())]:
        text = cdef_check.read_header(directory, "cusparse.h")
        if text is not None:
            return f"{directory}/cusparse.h", text, False
    return None


def check_cdef(cdef: str, header_dir: str) -> list[str]:
    """Every difference between ``cdef`` and the installed headers: cusparseLt.h, and the cuSPARSE enums
    from the wheel's stub or a cusparse.h where one is installed."""
    problems = cdef_check.compare(_header(header_dir, cdef), _ours(cdef))
    source = _cusparse_source(header_dir)
    if source is not None:
        where, text, exact = source
        ours = cdef_check.parse(_split(cdef)[0]).enums
        theirs = cdef_check.parse(cdef_check.extract_enums(text, CUSPARSE_ENUMS)).enums
        for name in CUSPARSE_ENUMS:
            if exact:
                problems += cdef_check.compare_enum(name, theirs[name], ours[name], where)
            else:
                problems += cdef_check.compare_enum_subset(name, {k: v for k, v in theirs[name].items()
                                                                  if k in ours[name]}, ours[name], where)
    return problems


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
    if expect.startswith("CUSPARSE_") and _cusparse_source(header_dir) is None:
        pytest.skip("no cuSPARSE header here (neither the 0.10 wheel's stub nor a cusparse.h) to compare with")
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
    from pycusparselt._native import library as _library
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
    """Second layer: an API-mode build of the same cdef against the real header, as C++. The compiler checks
    every signature (pointer mismatches are errors in C++); every enum constant's compiled value is compared
    with ours."""
    import cffi

    cuda_dirs = [d for d in _cuda_include_dirs() if (d / "driver_types.h").is_file()
                 and (d / "crt" / "host_defines.h").is_file()]
    if shutil.which("c++") is None and shutil.which("g++") is None:
        pytest.skip("no C++ compiler here")
    if not cuda_dirs:
        pytest.skip("no complete CUDA include directory here (cusparseLt.h includes driver_types.h)")
    include_dirs = [header_dir, str(cuda_dirs[0])]
    if '#include "cusparse.h"' in cdef_check.read_header(header_dir, "cusparseLt.h"):
        # 0.8 and 0.9 include the toolkit's cusparse.h unconditionally
        with_cusparse = [d for d in [*_cuda_include_dirs(), *_nvidia_header_dirs("cusparse")]
                         if (Path(d) / "cusparse.h").is_file()]
        if not with_cusparse:
            pytest.skip("this cusparseLt.h includes cusparse.h, which is not installed here")
        include_dirs.append(str(with_cusparse[0]))
    ffi = cffi.FFI()
    # cdef without our copies of the CUDA/cuSPARSE types: those come from the real headers in the build.
    ffi.cdef(build_ffi.CDEF.replace("typedef struct { uint8_t data[512]; }",
                                    "typedef struct { uint8_t data[512]; ...; }"))
    ffi.set_source(
        "_pycusparselt_conformance",
        '#include "cusparseLt.h"',
        include_dirs=include_dirs,
        # C++: the 0.8 and 0.9 headers include <cstddef>; C++ also refuses every pointer mismatch.
        source_extension=".cpp",
        extra_compile_args=["-Wno-unused"],
    )
    try:
        library = ffi.compile(tmpdir=str(tmp_path), verbose=False)
    except Exception as exc:
        pytest.fail(f"the cdef does not compile against the real header: {exc}")
    import ctypes

    from pycusparselt._native import library as _library

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
