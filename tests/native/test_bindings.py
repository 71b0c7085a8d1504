"""The thin wrappers without a GPU: completeness, argument checking before C, closed objects, enums."""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path

import pytest

from pycusparselt import bindings as b
from pycusparselt import enums
from pycusparselt._native.ffi import ffi
from pycusparselt.errors import ClosedError

ROOT = Path(__file__).resolve().parents[2]
_spec = importlib.util.spec_from_file_location("build_ffi", ROOT / "build_ffi.py")
build_ffi = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(build_ffi)

C_FUNCTIONS = re.findall(r"\b(cusparseLt\w+)\s*\(", build_ffi.CUSPARSELT_CDEF)


def snake(name: str) -> str:
    name = name.removeprefix("cusparseLt")
    name = name.replace("SpMMA", "Spmma")
    return re.sub(r"(?<=[a-z0-9])(?=[A-Z])", "_", name).lower()


def test_one_wrapper_per_c_function():
    assert len(C_FUNCTIONS) == 31
    for cname in C_FUNCTIONS:
        wrapper = getattr(b, snake(cname), None)
        assert callable(wrapper), f"no wrapper {snake(cname)} for {cname}"
        assert f"``{cname}``" in wrapper.__doc__, f"{snake(cname)}'s docstring does not name {cname}"
        assert snake(cname) in b.__all__


ENUM_TYPES = {
    enums.Status: "cusparseStatus_t",
    enums.Operation: "cusparseOperation_t",
    enums.Order: "cusparseOrder_t",
    enums.DataType: "cudaDataType",
    enums.LibraryProperty: "libraryPropertyType",
    enums.Sparsity: "cusparseLtSparsity_t",
    enums.MatDescAttribute: "cusparseLtMatDescAttribute_t",
    enums.ComputeType: "cusparseComputeType",
    enums.MatmulDescAttribute: "cusparseLtMatmulDescAttribute_t",
    enums.MatmulMatrixScale: "cusparseLtMatmulMatrixScale_t",
    enums.MatmulAlg: "cusparseLtMatmulAlg_t",
    enums.MatmulAlgAttribute: "cusparseLtMatmulAlgAttribute_t",
    enums.SplitKMode: "cusparseLtSplitKMode_t",
    enums.PruneAlg: "cusparseLtPruneAlg_t",
}


def test_enums_mirror_the_declarations():
    declared_enums = set(re.findall(r"}\s*(\w+);", build_ffi.CDEF)) - {
        "cusparseLtHandle_t", "cusparseLtMatDescriptor_t", "cusparseLtMatmulDescriptor_t",
        "cusparseLtMatmulAlgSelection_t", "cusparseLtMatmulPlan_t",
    }
    assert set(ENUM_TYPES.values()) == declared_enums
    for enum, ctype in ENUM_TYPES.items():
        declared = ffi.typeof(ctype).relements
        assert len(enum.__members__) == len(declared), enum
        for cname, value in declared.items():
            # the member is the C name less its prefix: the longest member name that ends the C name
            name = max((n for n in enum.__members__ if cname == n or cname.endswith("_" + n)), key=len)
            assert int(enum[name]) == value, cname


def test_enum_spot_values():
    # a few values readers rely on, as the header gives them
    assert enums.Order.ROW == 2 and enums.Order.COL == 1
    assert enums.DataType.R_16F == 2 and enums.DataType.R_16BF == 14 and enums.DataType.R_8F_E4M3 == 28
    assert enums.ComputeType.COMPUTE_32F == 2 and enums.PruneAlg.SPMMA_STRIP == 1
    assert enums.MatmulDescAttribute.SPARSE_MAT_POINTER == 9


def test_attribute_type_tables_cover_every_attribute():
    assert set(b.MAT_DESC_ATTRIBUTE_TYPES) == set(enums.MatDescAttribute)
    assert set(b.MATMUL_DESC_ATTRIBUTE_TYPES) == set(enums.MatmulDescAttribute)
    assert set(b.MATMUL_ALG_ATTRIBUTE_TYPES) == set(enums.MatmulAlgAttribute)


@pytest.mark.parametrize("cls", [b.RawHandle, b.RawMatDescriptor, b.RawMatmulDescriptor, b.RawAlgSelection, b.RawPlan])
def test_opaque_storage_is_16_byte_aligned(cls):
    objs = [cls() for _ in range(64)]
    assert all(o.address % 16 == 0 for o in objs)
    assert not any(o.initialized for o in objs)
    assert "not initialized" in repr(objs[0])


# Arguments that must be refused in Python, before anything reaches C.
H = b.RawHandle  # never initialised


@pytest.mark.parametrize(
    "call, exc, words",
    [
        (lambda: b.init("handle"), TypeError, "expected a RawHandle, got str"),
        (lambda: b.init(b.RawPlan()), TypeError, "expected a RawHandle, got RawPlan"),
        (lambda: b.destroy(H()), ClosedError, "not initialized"),
        (lambda: b.get_version(H()), ClosedError, "handle"),
        (lambda: b.dense_descriptor_init(H(), b.RawMatDescriptor(), 16, 16, 16, 16, 2, 2), ClosedError, "handle"),
        (lambda: b.mat_descriptor_destroy(b.RawMatDescriptor()), ClosedError, "matrix descriptor"),
        (lambda: b.matmul_alg_selection_destroy(b.RawAlgSelection()), ClosedError, "algorithm selection"),
        (lambda: b.matmul_plan_destroy(b.RawPlan()), ClosedError, "plan"),
        (lambda: b.matmul_get_workspace(H(), b.RawPlan()), ClosedError, "handle"),
        (lambda: b.spmma_compressed_size2(H(), b.RawMatDescriptor()), ClosedError, "handle"),
        (lambda: b.get_property(7), ValueError, "LibraryProperty"),
        (lambda: b.get_property("major"), ValueError, "LibraryProperty"),
        (lambda: b.get_error_name("x"), TypeError, "status"),
        (lambda: b.get_error_name(True), TypeError, "status"),
    ],
)
def test_bad_arguments_raise_before_c(call, exc, words):
    with pytest.raises(exc, match=words):
        call()


class _FakeLive:
    """Marks raw storage as initialised without C, to reach the later argument checks."""

    @staticmethod
    def make(cls):
        obj = cls()
        obj._live = True
        return obj


def test_argument_checks_on_live_objects():
    h = _FakeLive.make(b.RawHandle)
    mat = b.RawMatDescriptor()
    with pytest.raises(TypeError, match="rows: expected an integer"):
        b.dense_descriptor_init(h, mat, 16.0, 16, 16, 16, enums.DataType.R_16F, enums.Order.ROW)
    with pytest.raises(ValueError, match="value_type: expected a DataType"):
        b.dense_descriptor_init(h, mat, 16, 16, 16, 16, 999, enums.Order.ROW)
    with pytest.raises(ValueError, match="order: expected a Order"):
        b.dense_descriptor_init(h, mat, 16, 16, 16, 16, enums.DataType.R_16F, 0)
    assert not mat.initialized
    live_mat = _FakeLive.make(b.RawMatDescriptor)
    with pytest.raises(ValueError, match="already initialized"):
        b.dense_descriptor_init(h, live_mat, 16, 16, 16, 16, enums.DataType.R_16F, enums.Order.ROW)
    desc = _FakeLive.make(b.RawMatmulDescriptor)
    with pytest.raises(ValueError, match="attribute: expected a MatmulDescAttribute"):
        b.matmul_desc_set_attribute(h, desc, 99, 1)
    with pytest.raises(TypeError, match="takes a float"):
        b.matmul_desc_set_attribute(h, desc, enums.MatmulDescAttribute.ACTIVATION_RELU_UPPERBOUND, "6")
    with pytest.raises(TypeError, match="value: expected an integer"):
        b.matmul_desc_set_attribute(h, desc, enums.MatmulDescAttribute.ACTIVATION_RELU, 1.5)
    with pytest.raises(ValueError, match="does not fit the C type int"):
        b.matmul_desc_set_attribute(h, desc, enums.MatmulDescAttribute.ACTIVATION_RELU, 2**40)
    with pytest.raises(ValueError, match="device address is in 0"):
        b.matmul_desc_set_attribute(h, desc, enums.MatmulDescAttribute.BIAS_POINTER, -16)
    plan = _FakeLive.make(b.RawPlan)
    with pytest.raises(TypeError, match="alpha: expected a real number"):
        b.matmul(h, plan, "1", 0, 0, 0.0, 0, 0, 0)
    with pytest.raises(TypeError, match="a: expected an integer"):
        b.matmul(h, plan, 1.0, "ptr", 0, 0.0, 0, 0, 0)
    with pytest.raises(TypeError, match="streams: expected an integer"):
        b.matmul(h, plan, 1.0, 0, 0, 0.0, 0, 0, 0, streams=["s"])
    with pytest.raises(ValueError, match="prune_alg: expected a PruneAlg"):
        b.spmma_prune(h, desc, 0, 0, 5)
    with pytest.raises(ValueError, match="op: expected a Operation"):
        b.spmma_prune2(h, live_mat, True, 7, 0, 0, enums.PruneAlg.SPMMA_STRIP)


def test_stream_forms():
    class CudaStreamProtocol:
        def __cuda_stream__(self):
            return (0, 1234)

    class HasPtr:
        ptr = 5678

    assert b.stream_handle(None) == 0
    assert b.stream_handle(42) == 42
    assert b.stream_handle(CudaStreamProtocol()) == 1234
    assert b.stream_handle(HasPtr()) == 5678
    array, count = b._streams([1, HasPtr()])
    assert count == 2 and int(ffi.cast("uintptr_t", array[1])) == 5678
    assert b._streams(None) == (ffi.NULL, 0)
    assert b._streams(7)[1] == 1


def test_addresses_and_streams_out_of_range_are_refused():
    for bad in (-1, 1 << 64, (1 << 64) + 5):
        with pytest.raises(ValueError, match="device address is in 0 .. 2\\*\\*64 - 1"):
            b._pointer(bad, "a")
        with pytest.raises(ValueError, match="cudaStream_t handle is in 0 .. 2\\*\\*64 - 1"):
            b.stream_handle(bad)

    class Negative:
        def __cuda_stream__(self):
            return (0, -1)

    with pytest.raises(ValueError, match="stream: a cudaStream_t handle"):
        b.stream_handle(Negative())
    assert int(ffi.cast("uintptr_t", b._pointer((1 << 64) - 1, "a"))) == (1 << 64) - 1


@pytest.mark.parametrize("cls", [b.RawHandle, b.RawMatDescriptor, b.RawMatmulDescriptor, b.RawAlgSelection,
                                 b.RawPlan])
def test_native_holders_cannot_be_copied(cls):
    import copy
    import pickle

    raw = cls()
    for duplicate in (copy.copy, copy.deepcopy, pickle.dumps):
        with pytest.raises(TypeError, match="cannot be"):
            duplicate(raw)


def test_device_pointer_scalar_is_passed_as_address():
    ptr = b._scalar(b.DevicePointer(4096), "alpha")
    assert int(ffi.cast("uintptr_t", ptr)) == 4096
    host = b._scalar(0.5, "alpha")
    assert ffi.typeof(host) is ffi.typeof("float *") and host[0] == 0.5
    assert repr(b.DevicePointer(16)) == "DevicePointer(0x10)"


def test_source_checkout_fallback_declares_the_same_api():
    """Run from an unbuilt checkout, the declarations are parsed from build_ffi.py: same types, same values."""
    from pycusparselt._native import ffi as _ffi

    inline = _ffi._from_source_checkout(ROOT / "build_ffi.py")
    for ctype in ENUM_TYPES.values():
        assert inline.typeof(ctype).relements == ffi.typeof(ctype).relements
    assert inline.sizeof("cusparseLtMatmulPlan_t") == ffi.sizeof("cusparseLtMatmulPlan_t") == 512


@pytest.mark.parametrize("cname", C_FUNCTIONS)
def test_every_wrapper_refuses_wrong_types(cname):
    """Objects of the wrong type in every position: a Python exception, never a call into C."""
    import inspect

    wrapper = getattr(b, snake(cname))
    required = [p for p in inspect.signature(wrapper).parameters.values() if p.default is inspect.Parameter.empty]
    with pytest.raises((TypeError, ValueError)):
        wrapper(*[object() for _ in required])


@pytest.mark.parametrize("cname", [c for c in C_FUNCTIONS if c not in (
    "cusparseLtInit", "cusparseLtGetProperty", "cusparseLtGetErrorName", "cusparseLtGetErrorString")])
def test_every_wrapper_refuses_destroyed_structures(cname):
    """Raw structures that were destroyed (or never initialised): ClosedError before any C call."""
    import inspect

    wrapper = getattr(b, snake(cname))
    args = []
    for p in inspect.signature(wrapper).parameters.values():
        if p.default is not inspect.Parameter.empty:
            break
        ann = str(p.annotation)
        if ann.startswith("Raw"):
            obj = getattr(b, ann)()
            obj._live = True
            obj._live = False  # as after a destroy
            args.append(obj)
        else:
            args.append(1.0 if p.name in ("alpha", "beta") else 0)
    with pytest.raises(ClosedError, match="not initialized"):
        wrapper(*args)
