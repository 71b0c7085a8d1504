"""Thin checked wrappers: one Python function per cuSPARSELt C function.

Each wrapper is named after its C function in snake_case (``cusparseLtMatmulPlanInit`` is
:func:`matmul_plan_init`), checks its arguments' Python types, calls the library and raises a
:class:`~pycusparselt.errors.CuSparseLtError` subclass on any status but success.

The five opaque structures are Python objects that own 16-byte aligned storage (:class:`RawHandle`,
:class:`RawMatDescriptor`, :class:`RawMatmulDescriptor`, :class:`RawAlgSelection`, :class:`RawPlan`). They
remember whether they are initialised: a wrapper given one that was never initialised or was already
destroyed raises :class:`~pycusparselt.errors.ClosedError` instead of handing freed memory to C, and
initialising a live one twice raises instead of leaking it. Lifetimes across objects (destroy descriptors
before their handle, say) are the object layer's business.

Device memory is passed as integer addresses (``cupy_array.data.ptr``) or ``None`` for NULL; streams as an
integer handle, ``None`` (the legacy default stream), or any object with ``__cuda_stream__`` or ``.ptr``
(``cupy.cuda.Stream``). ``alpha`` and ``beta`` are host scalars (passed as C ``float``) unless wrapped in
:class:`DevicePointer` (for alpha/beta vector scaling, where they point to device vectors).
"""

from __future__ import annotations

import functools
from typing import Any

from ._native import library as _library
from ._native.ffi import ffi
from ._native.opaque import (
    RawAlgSelection,
    RawHandle,
    RawMatDescriptor,
    RawMatmulDescriptor,
    RawPlan,
    fresh_pointer,
    live_pointer,
)
from ._native.streams import stream_handle  # public here too: the wrappers take streams by it
from .enums import (
    ComputeType,
    DataType,
    LibraryProperty,
    MatDescAttribute,
    MatmulAlg,
    MatmulAlgAttribute,
    MatmulDescAttribute,
    Operation,
    Order,
    PruneAlg,
    Sparsity,
)
from .errors import error_class_for_status, hint_for

__all__ = [
    "RawHandle",
    "RawMatDescriptor",
    "RawMatmulDescriptor",
    "RawAlgSelection",
    "RawPlan",
    "DevicePointer",
    "MatmulCall",
    "PreparedMatmul",
    "matmul_call_path",
    "matmul_caller",
    "MAT_DESC_ATTRIBUTE_TYPES",
    "MATMUL_DESC_ATTRIBUTE_TYPES",
    "MATMUL_ALG_ATTRIBUTE_TYPES",
    "check_status",
    "stream_handle",
    # one per C function, in the header's order
    "init",
    "destroy",
    "get_version",
    "get_property",
    "get_error_name",
    "get_error_string",
    "dense_descriptor_init",
    "structured_descriptor_init",
    "mat_descriptor_destroy",
    "mat_desc_set_attribute",
    "mat_desc_get_attribute",
    "matmul_descriptor_init",
    "matmul_desc_set_attribute",
    "matmul_desc_get_attribute",
    "matmul_alg_selection_init",
    "matmul_alg_selection_destroy",
    "matmul_alg_set_attribute",
    "matmul_alg_get_attribute",
    "matmul_get_workspace",
    "matmul_plan_init",
    "matmul_plan_destroy",
    "matmul",
    "matmul_search",
    "spmma_prune",
    "spmma_prune_check",
    "spmma_prune2",
    "spmma_prune_check2",
    "spmma_compressed_size",
    "spmma_compress",
    "spmma_compressed_size2",
    "spmma_compress2",
]

_SUCCESS = 0


def _lib() -> Any:
    return _library.load().lib


# --------------------------------------------------------------------------------------------------
# Errors

def check_status(function: str, status: int, hint: str | None = None) -> None:
    """Raise the matching :class:`~pycusparselt.errors.CuSparseLtError` unless ``status`` is success.

    Parameters
    ----------
    function : str
        Name of the C function that returned ``status``.
    status : int
        The ``cusparseStatus_t`` it returned.
    hint : str, optional
        Explanation to attach; by default pycusparselt's own hint for that function and status, if any.
    """
    if status == _SUCCESS:
        return
    lib = _lib()
    name = ffi.string(lib.cusparseLtGetErrorName(status)).decode(errors="replace")
    text = ffi.string(lib.cusparseLtGetErrorString(status)).decode(errors="replace")
    raise error_class_for_status(status)(function, status, name, text, hint or hint_for(function, status))


# --------------------------------------------------------------------------------------------------
# Scalars, pointers and streams

_ADDRESS_LIMIT = 1 << 64


class DevicePointer(int):
    """An integer marked as a device address, for ``alpha``/``beta`` when they point to device vectors."""

    def __repr__(self) -> str:
        return f"DevicePointer(0x{int(self):x})"


def _int(value: Any, arg: str, ctype: str) -> int:
    if isinstance(value, bool) or not hasattr(value, "__index__"):
        raise TypeError(f"{arg}: expected an integer ({ctype}), got {type(value).__name__}")
    return value.__index__()


def _pointer(value: Any, arg: str) -> Any:
    """``void*`` from an integer device address or None (NULL)."""
    if value is None:
        return ffi.NULL
    address = _int(value, arg, "a device address")
    if not 0 <= address < _ADDRESS_LIMIT:
        raise ValueError(f"{arg}: a device address is in 0 .. 2**64 - 1, got {address}")
    return ffi.cast("void *", address)


def _stream(stream: Any, arg: str = "stream") -> Any:
    return ffi.cast("cudaStream_t", stream_handle(stream, arg))


def _streams(streams: Any) -> tuple[Any, int]:
    """``cudaStream_t*`` and a count from None, one stream, or an iterable of streams."""
    if streams is None:
        return ffi.NULL, 0
    if isinstance(streams, int) or hasattr(streams, "__cuda_stream__") or hasattr(streams, "ptr"):
        streams = [streams]
    handles = [stream_handle(s, "streams") for s in streams]
    if not handles:
        return ffi.NULL, 0
    return ffi.new("cudaStream_t[]", [ffi.cast("cudaStream_t", h) for h in handles]), len(handles)


def _scalar(value: Any, arg: str) -> Any:
    """``const void*`` to a host float, or a device address for vector scaling."""
    if isinstance(value, DevicePointer):
        return _pointer(value, arg)
    if isinstance(value, bool) or not isinstance(value, (int, float)) and not hasattr(value, "__float__"):
        raise TypeError(f"{arg}: expected a real number or a DevicePointer, got {type(value).__name__}")
    return ffi.new("float *", float(value))


def _enum(value: Any, enum_type: type, arg: str) -> int:
    try:
        return int(enum_type(value))
    except (ValueError, TypeError):
        valid = ", ".join(f"{m.name}={int(m)}" for m in enum_type)
        raise ValueError(f"{arg}: expected a {enum_type.__name__} ({valid}), got {value!r}") from None


# --------------------------------------------------------------------------------------------------
# Attribute value types (the C type each attribute's data points to)

MAT_DESC_ATTRIBUTE_TYPES: dict[MatDescAttribute, str] = {
    MatDescAttribute.NUM_BATCHES: "int",
    MatDescAttribute.BATCH_STRIDE: "int64_t",
}

MATMUL_DESC_ATTRIBUTE_TYPES: dict[MatmulDescAttribute, str] = {
    MatmulDescAttribute.ACTIVATION_RELU: "int",
    MatmulDescAttribute.ACTIVATION_RELU_UPPERBOUND: "float",
    MatmulDescAttribute.ACTIVATION_RELU_THRESHOLD: "float",
    MatmulDescAttribute.ACTIVATION_GELU: "int",
    MatmulDescAttribute.ACTIVATION_GELU_SCALING: "float",
    MatmulDescAttribute.ALPHA_VECTOR_SCALING: "int",
    MatmulDescAttribute.BETA_VECTOR_SCALING: "int",
    MatmulDescAttribute.BIAS_STRIDE: "int64_t",
    MatmulDescAttribute.BIAS_POINTER: "void *",
    MatmulDescAttribute.SPARSE_MAT_POINTER: "void *",
    MatmulDescAttribute.A_SCALE_MODE: "int",
    MatmulDescAttribute.B_SCALE_MODE: "int",
    MatmulDescAttribute.C_SCALE_MODE: "int",
    MatmulDescAttribute.D_SCALE_MODE: "int",
    MatmulDescAttribute.D_OUT_SCALE_MODE: "int",
    MatmulDescAttribute.A_SCALE_POINTER: "void *",
    MatmulDescAttribute.B_SCALE_POINTER: "void *",
    MatmulDescAttribute.C_SCALE_POINTER: "void *",
    MatmulDescAttribute.D_SCALE_POINTER: "void *",
    MatmulDescAttribute.D_OUT_SCALE_POINTER: "void *",
}

MATMUL_ALG_ATTRIBUTE_TYPES: dict[MatmulAlgAttribute, str] = {
    MatmulAlgAttribute.ALG_CONFIG_ID: "int",
    MatmulAlgAttribute.ALG_CONFIG_MAX_ID: "int",
    MatmulAlgAttribute.SEARCH_ITERATIONS: "int",
    MatmulAlgAttribute.SPLIT_K: "int",
    MatmulAlgAttribute.SPLIT_K_MODE: "int",
    MatmulAlgAttribute.SPLIT_K_BUFFERS: "int",
}


def _attribute_buffer(table: dict, attribute: Any, enum_type: type) -> tuple[int, Any, str]:
    """(attribute as int, a zeroed buffer of the attribute's C type, that C type)."""
    member = enum_type(_enum(attribute, enum_type, "attribute"))
    ctype = table[member]
    return int(member), ffi.new(ctype + " *"), ctype


def _store(buffer: Any, ctype: str, value: Any, attribute: int, enum_type: type) -> None:
    name = enum_type(attribute).name
    if ctype == "void *":
        buffer[0] = _pointer(value, "value")
    elif ctype == "float":
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise TypeError(f"value: attribute {name} takes a float, got {type(value).__name__}")
        buffer[0] = value
    else:
        try:
            buffer[0] = _int(value, "value", ctype)
        except OverflowError:
            raise ValueError(f"value: {value} does not fit the C type {ctype} of attribute {name}") from None


def _set_attribute(function: str, table: dict, enum_type: type, handle, obj, cls, arg, attribute, value) -> None:
    attribute, buffer, ctype = _attribute_buffer(table, attribute, enum_type)
    _store(buffer, ctype, value, attribute, enum_type)
    status = getattr(_lib(), function)(
        live_pointer(handle, RawHandle, "handle"), live_pointer(obj, cls, arg), attribute, buffer, ffi.sizeof(ctype)
    )
    check_status(function, status)


def _get_attribute(function: str, table: dict, enum_type: type, handle, obj, cls, arg, attribute) -> Any:
    attribute, buffer, ctype = _attribute_buffer(table, attribute, enum_type)
    status = getattr(_lib(), function)(
        live_pointer(handle, RawHandle, "handle"), live_pointer(obj, cls, arg), attribute, buffer, ffi.sizeof(ctype)
    )
    check_status(function, status)
    if ctype == "void *":
        return int(ffi.cast("uintptr_t", buffer[0]))
    return buffer[0] if ctype == "float" else int(buffer[0])


# --------------------------------------------------------------------------------------------------
# Initialization, destroy, version, errors


def init(handle: RawHandle) -> None:
    """``cusparseLtInit``: initialise ``handle`` on the current CUDA device."""
    check_status("cusparseLtInit", _lib().cusparseLtInit(fresh_pointer(handle, RawHandle, "handle")))
    handle.mark_initialized(True)


def destroy(handle: RawHandle) -> None:
    """``cusparseLtDestroy``: release ``handle``. Its descriptors and plans must be destroyed first."""
    status = _lib().cusparseLtDestroy(live_pointer(handle, RawHandle, "handle"))
    handle.mark_initialized(False)  # whatever the status, the storage must not be handed to C again
    check_status("cusparseLtDestroy", status)


def get_version(handle: RawHandle) -> int:
    """``cusparseLtGetVersion``: the library version as one integer (``major * 1000 + minor * 100 + patch``
    for 0.x releases)."""
    version = ffi.new("int *")
    status = _lib().cusparseLtGetVersion(live_pointer(handle, RawHandle, "handle"), version)
    check_status("cusparseLtGetVersion", status)
    return int(version[0])


def get_property(property_type: Any) -> int:
    """``cusparseLtGetProperty``: one part of the version (a :class:`~pycusparselt.enums.LibraryProperty`).
    Needs no handle and no GPU."""
    value = ffi.new("int *")
    prop = _enum(property_type, LibraryProperty, "property_type")
    check_status("cusparseLtGetProperty", _lib().cusparseLtGetProperty(prop, value))
    return int(value[0])


def get_error_name(status: Any) -> str:
    """``cusparseLtGetErrorName``: the status's C name, e.g. ``"CUSPARSE_STATUS_NOT_SUPPORTED"``."""
    return ffi.string(_lib().cusparseLtGetErrorName(_int(status, "status", "cusparseStatus_t"))).decode()


def get_error_string(status: Any) -> str:
    """``cusparseLtGetErrorString``: NVIDIA's description of the status."""
    return ffi.string(_lib().cusparseLtGetErrorString(_int(status, "status", "cusparseStatus_t"))).decode()


# --------------------------------------------------------------------------------------------------
# Matrix descriptors


def _descriptor_args(rows: Any, cols: Any, ld: Any, alignment: Any, value_type: Any, order: Any) -> tuple:
    return (
        _int(rows, "rows", "int64_t"),
        _int(cols, "cols", "int64_t"),
        _int(ld, "ld", "int64_t"),
        _int(alignment, "alignment", "uint32_t"),
        _enum(value_type, DataType, "value_type"),
        _enum(order, Order, "order"),
    )


def dense_descriptor_init(
    handle: RawHandle,
    descriptor: RawMatDescriptor,
    rows: int,
    cols: int,
    ld: int,
    alignment: int,
    value_type: Any,
    order: Any,
) -> None:
    """``cusparseLtDenseDescriptorInit``: describe a dense ``rows x cols`` matrix with leading dimension
    ``ld``, memory ``alignment`` in bytes, element type ``value_type`` (:class:`~pycusparselt.enums.DataType`)
    and ``order`` (:class:`~pycusparselt.enums.Order`)."""
    h, target = live_pointer(handle, RawHandle, "handle"), fresh_pointer(descriptor, RawMatDescriptor, "descriptor")
    args = _descriptor_args(rows, cols, ld, alignment, value_type, order)
    status = _lib().cusparseLtDenseDescriptorInit(h, target, *args)
    check_status("cusparseLtDenseDescriptorInit", status)
    descriptor.mark_initialized(True)


def structured_descriptor_init(
    handle: RawHandle,
    descriptor: RawMatDescriptor,
    rows: int,
    cols: int,
    ld: int,
    alignment: int,
    value_type: Any,
    order: Any,
    sparsity: Any = 0,
) -> None:
    """``cusparseLtStructuredDescriptorInit``: like :func:`dense_descriptor_init` for the 2:4 structured
    (sparse) operand, with its ``sparsity`` (:class:`~pycusparselt.enums.Sparsity`, 50 % by default)."""
    h, target = live_pointer(handle, RawHandle, "handle"), fresh_pointer(descriptor, RawMatDescriptor, "descriptor")
    args = _descriptor_args(rows, cols, ld, alignment, value_type, order)
    status = _lib().cusparseLtStructuredDescriptorInit(h, target, *args, _enum(sparsity, Sparsity, "sparsity"))
    check_status("cusparseLtStructuredDescriptorInit", status)
    descriptor.mark_initialized(True)


def mat_descriptor_destroy(descriptor: RawMatDescriptor) -> None:
    """``cusparseLtMatDescriptorDestroy``: release a matrix descriptor."""
    status = _lib().cusparseLtMatDescriptorDestroy(live_pointer(descriptor, RawMatDescriptor, "descriptor"))
    descriptor.mark_initialized(False)
    check_status("cusparseLtMatDescriptorDestroy", status)


def mat_desc_set_attribute(handle: RawHandle, descriptor: RawMatDescriptor, attribute: Any, value: int) -> None:
    """``cusparseLtMatDescSetAttribute``: set a :class:`~pycusparselt.enums.MatDescAttribute`
    (``NUM_BATCHES``: int, ``BATCH_STRIDE``: int64, in elements)."""
    _set_attribute(
        "cusparseLtMatDescSetAttribute", MAT_DESC_ATTRIBUTE_TYPES, MatDescAttribute,
        handle, descriptor, RawMatDescriptor, "descriptor", attribute, value,
    )


def mat_desc_get_attribute(handle: RawHandle, descriptor: RawMatDescriptor, attribute: Any) -> int:
    """``cusparseLtMatDescGetAttribute``: read a :class:`~pycusparselt.enums.MatDescAttribute`."""
    return _get_attribute(
        "cusparseLtMatDescGetAttribute", MAT_DESC_ATTRIBUTE_TYPES, MatDescAttribute,
        handle, descriptor, RawMatDescriptor, "descriptor", attribute,
    )


# --------------------------------------------------------------------------------------------------
# Matmul descriptor


def matmul_descriptor_init(
    handle: RawHandle,
    descriptor: RawMatmulDescriptor,
    op_a: Any,
    op_b: Any,
    mat_a: RawMatDescriptor,
    mat_b: RawMatDescriptor,
    mat_c: RawMatDescriptor,
    mat_d: RawMatDescriptor,
    compute_type: Any,
) -> None:
    """``cusparseLtMatmulDescriptorInit``: describe ``D = op(A) op(B) * alpha + C * beta`` from four matrix
    descriptors (exactly one of A and B structured), operations (:class:`~pycusparselt.enums.Operation`)
    and a :class:`~pycusparselt.enums.ComputeType`."""
    status = _lib().cusparseLtMatmulDescriptorInit(
        live_pointer(handle, RawHandle, "handle"),
        fresh_pointer(descriptor, RawMatmulDescriptor, "descriptor"),
        _enum(op_a, Operation, "op_a"),
        _enum(op_b, Operation, "op_b"),
        live_pointer(mat_a, RawMatDescriptor, "mat_a"),
        live_pointer(mat_b, RawMatDescriptor, "mat_b"),
        live_pointer(mat_c, RawMatDescriptor, "mat_c"),
        live_pointer(mat_d, RawMatDescriptor, "mat_d"),
        _enum(compute_type, ComputeType, "compute_type"),
    )
    check_status("cusparseLtMatmulDescriptorInit", status)
    descriptor.mark_initialized(True)


def matmul_desc_set_attribute(handle: RawHandle, descriptor: RawMatmulDescriptor, attribute: Any, value: Any) -> None:
    """``cusparseLtMatmulDescSetAttribute``: set a :class:`~pycusparselt.enums.MatmulDescAttribute`. The
    value's C type comes from ``MATMUL_DESC_ATTRIBUTE_TYPES`` (int flags, float bounds and scalings,
    int64 bias stride, integer device addresses for pointers)."""
    _set_attribute(
        "cusparseLtMatmulDescSetAttribute", MATMUL_DESC_ATTRIBUTE_TYPES, MatmulDescAttribute,
        handle, descriptor, RawMatmulDescriptor, "descriptor", attribute, value,
    )


def matmul_desc_get_attribute(handle: RawHandle, descriptor: RawMatmulDescriptor, attribute: Any) -> Any:
    """``cusparseLtMatmulDescGetAttribute``: read a :class:`~pycusparselt.enums.MatmulDescAttribute`."""
    return _get_attribute(
        "cusparseLtMatmulDescGetAttribute", MATMUL_DESC_ATTRIBUTE_TYPES, MatmulDescAttribute,
        handle, descriptor, RawMatmulDescriptor, "descriptor", attribute,
    )


# --------------------------------------------------------------------------------------------------
# Algorithm selection


def matmul_alg_selection_init(
    handle: RawHandle, selection: RawAlgSelection, descriptor: RawMatmulDescriptor, alg: Any = 0
) -> None:
    """``cusparseLtMatmulAlgSelectionInit``: choose the algorithm family (:class:`~pycusparselt.enums.MatmulAlg`)."""
    status = _lib().cusparseLtMatmulAlgSelectionInit(
        live_pointer(handle, RawHandle, "handle"),
        fresh_pointer(selection, RawAlgSelection, "selection"),
        live_pointer(descriptor, RawMatmulDescriptor, "descriptor"),
        _enum(alg, MatmulAlg, "alg"),
    )
    check_status("cusparseLtMatmulAlgSelectionInit", status)
    selection.mark_initialized(True)


def matmul_alg_selection_destroy(selection: RawAlgSelection) -> None:
    """``cusparseLtMatmulAlgSelectionDestroy``: release an algorithm selection (mandatory since 0.8)."""
    status = _lib().cusparseLtMatmulAlgSelectionDestroy(live_pointer(selection, RawAlgSelection, "selection"))
    selection.mark_initialized(False)
    check_status("cusparseLtMatmulAlgSelectionDestroy", status)


def matmul_alg_set_attribute(handle: RawHandle, selection: RawAlgSelection, attribute: Any, value: int) -> None:
    """``cusparseLtMatmulAlgSetAttribute``: set a :class:`~pycusparselt.enums.MatmulAlgAttribute` (all int)."""
    _set_attribute(
        "cusparseLtMatmulAlgSetAttribute", MATMUL_ALG_ATTRIBUTE_TYPES, MatmulAlgAttribute,
        handle, selection, RawAlgSelection, "selection", attribute, value,
    )


def matmul_alg_get_attribute(handle: RawHandle, selection: RawAlgSelection, attribute: Any) -> int:
    """``cusparseLtMatmulAlgGetAttribute``: read a :class:`~pycusparselt.enums.MatmulAlgAttribute`."""
    return _get_attribute(
        "cusparseLtMatmulAlgGetAttribute", MATMUL_ALG_ATTRIBUTE_TYPES, MatmulAlgAttribute,
        handle, selection, RawAlgSelection, "selection", attribute,
    )


# --------------------------------------------------------------------------------------------------
# Plan


def matmul_get_workspace(handle: RawHandle, plan: RawPlan) -> int:
    """``cusparseLtMatmulGetWorkspace``: bytes of device workspace the plan's matmul needs."""
    size = ffi.new("size_t *")
    status = _lib().cusparseLtMatmulGetWorkspace(
        live_pointer(handle, RawHandle, "handle"), live_pointer(plan, RawPlan, "plan"), size
    )
    check_status("cusparseLtMatmulGetWorkspace", status)
    return int(size[0])


def matmul_plan_init(
    handle: RawHandle, plan: RawPlan, descriptor: RawMatmulDescriptor, selection: RawAlgSelection
) -> None:
    """``cusparseLtMatmulPlanInit``: build an execution plan from a matmul descriptor and an algorithm
    selection."""
    status = _lib().cusparseLtMatmulPlanInit(
        live_pointer(handle, RawHandle, "handle"),
        fresh_pointer(plan, RawPlan, "plan"),
        live_pointer(descriptor, RawMatmulDescriptor, "descriptor"),
        live_pointer(selection, RawAlgSelection, "selection"),
    )
    check_status("cusparseLtMatmulPlanInit", status)
    plan.mark_initialized(True)


def matmul_plan_destroy(plan: RawPlan) -> None:
    """``cusparseLtMatmulPlanDestroy``: release a plan."""
    status = _lib().cusparseLtMatmulPlanDestroy(live_pointer(plan, RawPlan, "plan"))
    plan.mark_initialized(False)
    check_status("cusparseLtMatmulPlanDestroy", status)


# --------------------------------------------------------------------------------------------------
# Execution


def _matmul_args(handle, plan, alpha, a, b, beta, c, d, workspace, streams) -> tuple:
    stream_array, count = _streams(streams)
    return (
        live_pointer(handle, RawHandle, "handle"),
        live_pointer(plan, RawPlan, "plan"),
        _scalar(alpha, "alpha"),
        _pointer(a, "a"),
        _pointer(b, "b"),
        _scalar(beta, "beta"),
        _pointer(c, "c"),
        _pointer(d, "d"),
        _pointer(workspace, "workspace"),
        stream_array,
        count,
    )


def matmul(
    handle: RawHandle,
    plan: RawPlan,
    alpha: float | DevicePointer,
    a: int,
    b: int,
    beta: float | DevicePointer,
    c: int,
    d: int,
    workspace: int | None,
    streams: Any = None,
) -> None:
    """``cusparseLtMatmul``: ``D = activation(alpha op(A) op(B) + beta C + bias)`` on the given stream(s).
    The sparse operand (A or B) must be the compressed buffer made with this plan's descriptor."""
    status = _lib().cusparseLtMatmul(*_matmul_args(handle, plan, alpha, a, b, beta, c, d, workspace, streams))
    check_status("cusparseLtMatmul", status)


def _compiled_matmul() -> tuple[Any, str]:
    """(the compiled module's call-through-an-address function or None, a description of the path)."""
    from ._native import settings

    if not settings.flag(settings.FAST_CALL, True):
        return None, f"abi ({settings.FAST_CALL} is off)"
    try:
        from ._fastcall import lib
    except ImportError as exc:  # not built at install time (no compiler or no Python headers)
        return None, f"abi (the compiled module pycusparselt._fastcall is not installed: {exc})"
    return lib.pycusparselt_matmul_at, "compiled"


def matmul_call_path() -> str:
    """How :class:`MatmulCall` calls ``cusparseLtMatmul`` here: ``"compiled"``, or ``"abi (why)"``."""
    return _compiled_matmul()[1]


def matmul_caller() -> tuple[Any, str]:
    """``(call, kind)``: what :class:`MatmulCall` calls ``cusparseLtMatmul`` through, taking its eleven
    arguments as integers, and which path that is.

    ``kind`` is ``"compiled"`` when the optional module ``pycusparselt._fastcall`` was built at install time
    (a C function that calls the library through its address: a direct call, about a microsecond less per
    call than libffi), else ``"abi"`` (cffi's ABI mode through ``pycusparselt_matmul_fn``). Setting
    ``PYCUSPARSELT_FAST_CALL=0`` chooses the ABI path even where the compiled module exists.
    """
    fn = _lib().cusparseLtMatmul
    compiled, _ = _compiled_matmul()
    if compiled is not None:
        return functools.partial(compiled, int(ffi.cast("intptr_t", fn))), "compiled"
    return ffi.cast("pycusparselt_matmul_fn", fn), "abi"


def _address(cdata: Any) -> int:
    return int(ffi.cast("intptr_t", cdata))


class MatmulCall:
    """``cusparseLtMatmul`` with its fixed arguments converted once, for hot loops and graph capture.

    :func:`matmul` checks and converts all eleven arguments on every call, which costs microseconds; here
    the handle, plan, workspace and the addresses of alpha, beta and the stream live as integers, and the
    function is called through :func:`matmul_caller` (a compiled direct call, or an all-integer cffi pointer
    type), so a call converts nothing. The caller keeps the handle, plan and workspace alive and unchanged
    while the object (or a :class:`PreparedMatmul` made by :meth:`prepare`) is used; a plan whose
    configuration changes needs a new MatmulCall. Not thread-safe: alpha, beta and the stream live in
    buffers the object owns.
    """

    __slots__ = ("_fn", "kind", "_ints", "_alpha", "_alpha_at", "_beta", "_stream", "_last_stream")

    def __init__(self, handle: RawHandle, plan: RawPlan, workspace: int | None) -> None:
        self._fn, self.kind = matmul_caller()
        self._alpha = ffi.new("float *")
        self._beta = ffi.new("float *")
        self._stream = ffi.new("cudaStream_t[1]")
        self._last_stream = 0
        self._alpha_at = _address(self._alpha)
        # handle, plan, beta, workspace, streams
        self._ints = (
            _address(live_pointer(handle, RawHandle, "handle")),
            _address(live_pointer(plan, RawPlan, "plan")),
            _address(self._beta),
            0 if workspace is None else _int(workspace, "workspace", "a device address"),
            _address(self._stream),
        )

    def __call__(self, alpha: float | DevicePointer, a: int, b: int, beta: float, c: int, d: int, stream: int) -> None:
        """Run the product; ``alpha`` a float or a :class:`DevicePointer`, the rest device addresses and a
        stream handle (integers)."""
        if type(alpha) is DevicePointer:
            alpha_at = int(alpha)
        else:
            self._alpha[0] = alpha
            alpha_at = self._alpha_at
        self._beta[0] = beta
        if stream != self._last_stream:
            self._stream[0] = ffi.cast("cudaStream_t", stream)
            self._last_stream = stream
        handle, plan, beta_at, workspace, streams = self._ints
        status = self._fn(handle, plan, alpha_at, a, b, beta_at, c, d, workspace, streams, 1)
        if status:
            check_status("cusparseLtMatmul", status)

    def fixed_arguments(self) -> tuple[Any, int, int, int]:
        """``(fn, handle, plan, workspace)``: the function this object calls ``cusparseLtMatmul`` through
        (:func:`matmul_caller`'s: the eleven arguments as integers, the status returned) and the addresses it
        fixed, for a caller that owns the buffers of alpha, beta and the stream itself
        (:class:`pycusparselt.gemm.plan.Launcher`). The same lifetime rule applies."""
        handle, plan, _, workspace, _ = self._ints
        return self._fn, handle, plan, workspace

    def prepare(
        self, alpha: float | DevicePointer, a: int, b: int, beta: float, c: int, d: int, stream: int
    ) -> PreparedMatmul:
        """Every argument fixed: a :class:`PreparedMatmul` that owns its own alpha, beta and stream."""
        return PreparedMatmul(self, alpha, a, b, beta, c, d, stream)


class PreparedMatmul:
    """One ``cusparseLtMatmul`` with all eleven arguments fixed (from :meth:`MatmulCall.prepare`).

    ``launch()`` enqueues it and returns the raw status (0 for success), for callers that check it
    themselves on their hottest path; calling the object raises on failure. Alpha, beta and the stream
    handle live in buffers this object owns, so several may be used side by side. The same lifetime rule
    as :class:`MatmulCall` applies.
    """

    __slots__ = ("launch", "kind", "_buffers")

    def __init__(
        self, call: MatmulCall, alpha: float | DevicePointer, a: int, b: int, beta: float, c: int, d: int, stream: int
    ) -> None:
        handle, plan, _, workspace, _ = call._ints
        beta_buf, stream_buf = ffi.new("float *", float(beta)), ffi.new("cudaStream_t[1]")
        stream_buf[0] = ffi.cast("cudaStream_t", _int(stream, "stream", "a stream handle"))
        self._buffers: tuple = (beta_buf, stream_buf)
        if type(alpha) is DevicePointer:
            alpha_at = int(alpha)
        else:
            alpha_buf = ffi.new("float *", float(alpha))
            self._buffers += (alpha_buf,)
            alpha_at = _address(alpha_buf)
        args = (handle, plan, alpha_at, a, b, _address(beta_buf), c, d, workspace, _address(stream_buf), 1)
        self.launch = functools.partial(call._fn, *args)
        self.kind = call.kind

    def __call__(self) -> None:
        status = self.launch()
        if status:
            check_status("cusparseLtMatmul", status)


def matmul_search(
    handle: RawHandle,
    plan: RawPlan,
    alpha: float | DevicePointer,
    a: int,
    b: int,
    beta: float | DevicePointer,
    c: int,
    d: int,
    workspace: int | None,
    streams: Any = None,
) -> None:
    """``cusparseLtMatmulSearch``: time the plan's candidate configurations (running the matmul, so ``D``
    is overwritten) and write the fastest back into the plan. Synchronous."""
    status = _lib().cusparseLtMatmulSearch(*_matmul_args(handle, plan, alpha, a, b, beta, c, d, workspace, streams))
    check_status("cusparseLtMatmulSearch", status)


# --------------------------------------------------------------------------------------------------
# Pruning


def spmma_prune(
    handle: RawHandle,
    descriptor: RawMatmulDescriptor,
    dense_in: int,
    dense_out: int,
    prune_alg: Any,
    stream: Any = None,
) -> None:
    """``cusparseLtSpMMAPrune``: prune the sparse operand of ``descriptor`` (device memory ``dense_in``) to
    2:4 into ``dense_out`` (may equal ``dense_in``) with a :class:`~pycusparselt.enums.PruneAlg`."""
    status = _lib().cusparseLtSpMMAPrune(
        live_pointer(handle, RawHandle, "handle"),
        live_pointer(descriptor, RawMatmulDescriptor, "descriptor"),
        _pointer(dense_in, "dense_in"),
        _pointer(dense_out, "dense_out"),
        _enum(prune_alg, PruneAlg, "prune_alg"),
        _stream(stream),
    )
    check_status("cusparseLtSpMMAPrune", status)


def spmma_prune_check(
    handle: RawHandle, descriptor: RawMatmulDescriptor, dense_in: int, d_valid: int, stream: Any = None
) -> None:
    """``cusparseLtSpMMAPruneCheck``: check that ``dense_in`` is a valid 2:4 matrix for ``descriptor``.

    The result goes to the **device** int at ``d_valid``: non-zero means invalid. The library writes it only
    when the matrix is invalid (seen with 0.8.0 on an H100), so set it to 0 before the call. Asynchronous:
    synchronise the stream before reading it."""
    status = _lib().cusparseLtSpMMAPruneCheck(
        live_pointer(handle, RawHandle, "handle"),
        live_pointer(descriptor, RawMatmulDescriptor, "descriptor"),
        _pointer(dense_in, "dense_in"),
        ffi.cast("int *", _pointer(d_valid, "d_valid")),
        _stream(stream),
    )
    check_status("cusparseLtSpMMAPruneCheck", status)


def spmma_prune2(
    handle: RawHandle,
    sparse_descriptor: RawMatDescriptor,
    is_sparse_a: bool,
    op: Any,
    dense_in: int,
    dense_out: int,
    prune_alg: Any,
    stream: Any = None,
) -> None:
    """``cusparseLtSpMMAPrune2``: :func:`spmma_prune` from the structured matrix descriptor alone."""
    status = _lib().cusparseLtSpMMAPrune2(
        live_pointer(handle, RawHandle, "handle"),
        live_pointer(sparse_descriptor, RawMatDescriptor, "sparse_descriptor"),
        1 if is_sparse_a else 0,
        _enum(op, Operation, "op"),
        _pointer(dense_in, "dense_in"),
        _pointer(dense_out, "dense_out"),
        _enum(prune_alg, PruneAlg, "prune_alg"),
        _stream(stream),
    )
    check_status("cusparseLtSpMMAPrune2", status)


def spmma_prune_check2(
    handle: RawHandle,
    sparse_descriptor: RawMatDescriptor,
    is_sparse_a: bool,
    op: Any,
    dense_in: int,
    d_valid: int,
    stream: Any = None,
) -> None:
    """``cusparseLtSpMMAPruneCheck2``: :func:`spmma_prune_check` from the structured matrix descriptor alone
    (set ``*d_valid`` to 0 first)."""
    status = _lib().cusparseLtSpMMAPruneCheck2(
        live_pointer(handle, RawHandle, "handle"),
        live_pointer(sparse_descriptor, RawMatDescriptor, "sparse_descriptor"),
        1 if is_sparse_a else 0,
        _enum(op, Operation, "op"),
        _pointer(dense_in, "dense_in"),
        ffi.cast("int *", _pointer(d_valid, "d_valid")),
        _stream(stream),
    )
    check_status("cusparseLtSpMMAPruneCheck2", status)


# --------------------------------------------------------------------------------------------------
# Compression


def spmma_compressed_size(handle: RawHandle, plan: RawPlan) -> tuple[int, int]:
    """``cusparseLtSpMMACompressedSize``: ``(compressed_size, compress_buffer_size)`` in bytes for the
    plan's sparse operand: the compressed matrix and the scratch buffer :func:`spmma_compress` needs."""
    size, buffer_size = ffi.new("size_t *"), ffi.new("size_t *")
    status = _lib().cusparseLtSpMMACompressedSize(
        live_pointer(handle, RawHandle, "handle"), live_pointer(plan, RawPlan, "plan"), size, buffer_size
    )
    check_status("cusparseLtSpMMACompressedSize", status)
    return int(size[0]), int(buffer_size[0])


def spmma_compress(
    handle: RawHandle, plan: RawPlan, dense: int, compressed: int, compress_buffer: int, stream: Any = None
) -> None:
    """``cusparseLtSpMMACompress``: compress the 2:4 matrix at ``dense`` into ``compressed``."""
    status = _lib().cusparseLtSpMMACompress(
        live_pointer(handle, RawHandle, "handle"),
        live_pointer(plan, RawPlan, "plan"),
        _pointer(dense, "dense"),
        _pointer(compressed, "compressed"),
        _pointer(compress_buffer, "compress_buffer"),
        _stream(stream),
    )
    check_status("cusparseLtSpMMACompress", status)


def spmma_compressed_size2(handle: RawHandle, sparse_descriptor: RawMatDescriptor) -> tuple[int, int]:
    """``cusparseLtSpMMACompressedSize2``: :func:`spmma_compressed_size` from the structured descriptor."""
    size, buffer_size = ffi.new("size_t *"), ffi.new("size_t *")
    status = _lib().cusparseLtSpMMACompressedSize2(
        live_pointer(handle, RawHandle, "handle"),
        live_pointer(sparse_descriptor, RawMatDescriptor, "sparse_descriptor"),
        size,
        buffer_size,
    )
    check_status("cusparseLtSpMMACompressedSize2", status)
    return int(size[0]), int(buffer_size[0])


def spmma_compress2(
    handle: RawHandle,
    sparse_descriptor: RawMatDescriptor,
    is_sparse_a: bool,
    op: Any,
    dense: int,
    compressed: int,
    compress_buffer: int,
    stream: Any = None,
) -> None:
    """``cusparseLtSpMMACompress2``: :func:`spmma_compress` from the structured descriptor alone."""
    status = _lib().cusparseLtSpMMACompress2(
        live_pointer(handle, RawHandle, "handle"),
        live_pointer(sparse_descriptor, RawMatDescriptor, "sparse_descriptor"),
        1 if is_sparse_a else 0,
        _enum(op, Operation, "op"),
        _pointer(dense, "dense"),
        _pointer(compressed, "compressed"),
        _pointer(compress_buffer, "compress_buffer"),
        _stream(stream),
    )
    check_status("cusparseLtSpMMACompress2", status)
