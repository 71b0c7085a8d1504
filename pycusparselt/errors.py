"""Exceptions raised by pycusparselt.

Every failed cuSPARSELt call raises a :class:`CuSparseLtError` subclass chosen by its status, so callers can
tell their own mistakes (:class:`CuSparseLtUsageError`) from runtime failures
(:class:`CuSparseLtRuntimeError`) and from running out of memory (:class:`CuSparseLtMemoryError`)::

    CuSparseLtError
    ├── CuSparseLtUsageError (also ValueError)
    │   ├── InvalidValueError          CUSPARSE_STATUS_INVALID_VALUE
    │   ├── NotSupportedError          CUSPARSE_STATUS_NOT_SUPPORTED, MATRIX_TYPE_NOT_SUPPORTED
    │   └── ArchMismatchError          CUSPARSE_STATUS_ARCH_MISMATCH
    ├── CuSparseLtRuntimeError
    │   ├── NotInitializedError        CUSPARSE_STATUS_NOT_INITIALIZED
    │   ├── ExecutionFailedError       CUSPARSE_STATUS_EXECUTION_FAILED, MAPPING_ERROR
    │   └── InternalError              CUSPARSE_STATUS_INTERNAL_ERROR, ZERO_PIVOT
    └── CuSparseLtMemoryError (also MemoryError)
        ├── AllocFailedError           CUSPARSE_STATUS_ALLOC_FAILED
        └── InsufficientResourcesError CUSPARSE_STATUS_INSUFFICIENT_RESOURCES

Mistakes caught in Python before any C call raise the built-in ``TypeError`` / ``ValueError``, or
:class:`ClosedError` for an object used after it was destroyed. A missing or too old library raises
:class:`LibraryNotFoundError`, an ``ImportError``. All of them pickle.
"""

from __future__ import annotations

from .enums import Status

__all__ = [
    "HINTS",
    "hint_for",
    "GpuUnavailableError",
    "LayerFileError",
    "CuSparseLtError",
    "CuSparseLtUsageError",
    "InvalidValueError",
    "NotSupportedError",
    "ArchMismatchError",
    "CuSparseLtRuntimeError",
    "NotInitializedError",
    "ExecutionFailedError",
    "InternalError",
    "CuSparseLtMemoryError",
    "AllocFailedError",
    "InsufficientResourcesError",
    "ClosedError",
    "LibraryNotFoundError",
    "error_class_for_status",
]


class CuSparseLtError(RuntimeError):
    """A cuSPARSELt function returned a status other than ``CUSPARSE_STATUS_SUCCESS``.

    Parameters
    ----------
    function : str
        The C function that failed, e.g. ``"cusparseLtMatmul"``.
    status : int
        The ``cusparseStatus_t`` value it returned.
    name : str
        ``cusparseLtGetErrorName(status)``, e.g. ``"CUSPARSE_STATUS_NOT_SUPPORTED"``.
    text : str
        ``cusparseLtGetErrorString(status)``: NVIDIA's description.
    hint : str or None
        pycusparselt's explanation of the likely cause, where known.
    """

    def __init__(self, function: str, status: int, name: str, text: str, hint: str | None = None):
        self.function = function
        self.status = int(status)
        self.name = name
        self.text = text
        self.hint = hint
        message = f"{function} failed with {name} ({self.status}): {text}"
        if hint:
            message += f". Hint: {hint}"
        super().__init__(message)

    def __reduce__(self):
        return (type(self), (self.function, self.status, self.name, self.text, self.hint))


class CuSparseLtUsageError(CuSparseLtError, ValueError):
    """The library rejected the arguments: the caller can fix this."""


class InvalidValueError(CuSparseLtUsageError):
    """``CUSPARSE_STATUS_INVALID_VALUE``: an argument is out of range or inconsistent."""


class NotSupportedError(CuSparseLtUsageError):
    """``CUSPARSE_STATUS_NOT_SUPPORTED``: the combination of types, layouts or sizes is not supported."""


class ArchMismatchError(CuSparseLtUsageError):
    """``CUSPARSE_STATUS_ARCH_MISMATCH``: the GPU lacks the needed capability (SM 8.0+, SM 8.9+ for FP8)."""


class CuSparseLtRuntimeError(CuSparseLtError):
    """The library failed at run time for a reason outside the caller's arguments."""


class NotInitializedError(CuSparseLtRuntimeError):
    """``CUSPARSE_STATUS_NOT_INITIALIZED``: no usable GPU or driver, or an uninitialised handle."""


class ExecutionFailedError(CuSparseLtRuntimeError):
    """``CUSPARSE_STATUS_EXECUTION_FAILED``: a GPU kernel failed to launch or run."""


class InternalError(CuSparseLtRuntimeError):
    """``CUSPARSE_STATUS_INTERNAL_ERROR``: an internal operation of the library failed."""


class CuSparseLtMemoryError(CuSparseLtError, MemoryError):
    """The library ran out of host or device memory or another resource."""


class AllocFailedError(CuSparseLtMemoryError):
    """``CUSPARSE_STATUS_ALLOC_FAILED``: a memory allocation failed."""


class InsufficientResourcesError(CuSparseLtMemoryError):
    """``CUSPARSE_STATUS_INSUFFICIENT_RESOURCES``: not enough resources (e.g. workspace) for the operation."""


class ClosedError(ValueError):
    """A native object was used before it was initialised or after it was destroyed."""


class GpuUnavailableError(RuntimeError):
    """No GPU pycusparselt can use here (no CuPy, no CUDA driver, no GPU of SM 8.0+, or no cuSPARSELt); the
    message says which, and what runs without one."""


class LayerFileError(ValueError):
    """A file given to :meth:`SparseLinear.load <pycusparselt.SparseLinear.load>` is not a saved layer, or is
    corrupt or inconsistent; the message names the file and the field."""


class LibraryNotFoundError(ImportError):
    """libcusparseLt could not be found or loaded, or it is older than pycusparselt supports."""

    def __reduce__(self):
        return (type(self), self.args)


# cusparseStatus_t values (checked against the header by the conformance test through the cdef).
_CLASS_BY_STATUS: dict[int, type[CuSparseLtError]] = {
    1: NotInitializedError,
    2: AllocFailedError,
    3: InvalidValueError,
    4: ArchMismatchError,
    5: ExecutionFailedError,  # MAPPING_ERROR: access to GPU memory space failed
    6: ExecutionFailedError,
    7: InternalError,
    8: NotSupportedError,  # MATRIX_TYPE_NOT_SUPPORTED
    9: InternalError,  # ZERO_PIVOT: never returned by cuSPARSELt
    10: NotSupportedError,
    11: InsufficientResourcesError,
}


def error_class_for_status(status: int) -> type[CuSparseLtError]:
    """Return the exception class raised for a ``cusparseStatus_t`` value."""
    return _CLASS_BY_STATUS.get(int(status), CuSparseLtError)


#: (C function, status) -> what usually causes it. Keys with function None apply to any function.
HINTS: dict[tuple[str | None, int], str] = {
    ("cusparseLtInit", Status.NOT_INITIALIZED): (
        "no usable CUDA GPU or driver is visible to this process; cuSPARSELt needs an NVIDIA GPU of "
        "compute capability 8.0 or newer and a driver that supports the library's CUDA version"
    ),
    ("cusparseLtStructuredDescriptorInit", Status.NOT_SUPPORTED): (
        "check the data type, the order and the sizes: rows, cols and ld must be multiples of 16 for 16-bit "
        "types, 32 for 8-bit types and 8 for float32 (sparse operand); 8-bit inputs need the 'TN' layout "
        "(row-major A with column-major B, or the transposed equivalents)"
    ),
    ("cusparseLtDenseDescriptorInit", Status.NOT_SUPPORTED): (
        "check the data type, the order and the sizes: rows, cols and ld must be multiples of 8 for 16-bit "
        "types, 16 for 8-bit types and 4 for float32 (dense operands); ld must be at least the leading "
        "dimension's extent"
    ),
    ("cusparseLtMatmulDescriptorInit", Status.NOT_SUPPORTED): (
        "this combination of input/output types, compute type, operations and orders is not supported; 8-bit "
        "inputs (INT8, FP8) need the 'TN' form (row-major A with column-major B); FP8 needs SM 8.9+"
    ),
    (None, Status.ARCH_MISMATCH): (
        "the GPU is too old for this operation: cuSPARSELt needs SM 8.0+, and FP8 needs SM 8.9 or 9.0+"
    ),
    (None, Status.INSUFFICIENT_RESOURCES): "the GPU ran out of memory or the workspace is too small",
    (None, Status.ALLOC_FAILED): "a memory allocation inside cuSPARSELt failed (out of host or device memory)",
    ("cusparseLtMatDescSetAttribute", Status.INVALID_VALUE): "the value is out of range for this attribute",
    ("cusparseLtMatmulDescSetAttribute", Status.INVALID_VALUE): (
        "the value is out of range or conflicts with the descriptor's types (e.g. alpha vector scaling is "
        "only for INT8 inputs with 32I compute in some releases)"
    ),
    ("cusparseLtMatmulAlgSetAttribute", Status.INVALID_VALUE): (
        "the value is out of range for this attribute (config ids go from 0 to CONFIG_MAX_ID - 1; split-k "
        "settings depend on the GPU architecture)"
    ),
    ("cusparseLtMatmul", Status.INVALID_VALUE): (
        "a pointer is NULL or not 16-byte aligned, the workspace is too small, or the sparse operand was not "
        "compressed with this plan"
    ),
}


def hint_for(function: str, status: int) -> str | None:
    """What usually causes ``status`` from the C function ``function``, or None."""
    return HINTS.get((function, status)) or HINTS.get((None, status))
