"""Device arrays as cuSPARSELt sees them: pointer, shape, dtype and layout, read without copying.

Any object with ``__cuda_array_interface__`` (CuPy, PyTorch, Numba, JAX) or ``__dlpack__`` is accepted. The
layout comes from the strides of the last two dimensions: unit stride along the columns is row-major
(``ld`` = the row stride), unit stride along the rows is column-major (``ld`` = the column stride). A third,
leading dimension is a batch; a batch stride of 0 (a broadcast view) shares one matrix across the batch.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from .. import _arrays
from .._native import gpu

__all__ = ["Operand", "as_operand", "ROW", "COL"]

ROW, COL = "row", "col"


@dataclass(frozen=True)
class Operand:
    """A matrix or a batch of matrices in device memory (elements, not bytes, for every stride)."""

    name: str
    ptr: int
    dtype: np.dtype
    batch: int  # 1 for a 2-D array
    rows: int
    cols: int
    order: str  # ROW or COL
    ld: int
    batch_stride: int  # 0 for a 2-D array or a broadcast batch
    ndim: int
    owner: Any  # keeps the memory alive

    @property
    def shape(self) -> tuple[int, ...]:
        return (self.batch, self.rows, self.cols) if self.ndim == 3 else (self.rows, self.cols)

    @property
    def layout(self) -> tuple:
        """What a plan fixes about this operand: everything but the pointer."""
        return (self.dtype, self.shape, self.order, self.ld, self.batch_stride)

    def fits(self, order: str) -> bool:
        """Whether the memory can be read in ``order``: its own, or either one for a single row or column."""
        return order == self.order or self.rows == 1 or self.cols == 1

    def transposed(self) -> Operand:
        """The same memory seen as the transposed matrix (free: only the order flips)."""
        return Operand(
            self.name,
            self.ptr,
            self.dtype,
            self.batch,
            self.cols,
            self.rows,
            COL if self.order == ROW else ROW,
            self.ld,
            self.batch_stride,
            self.ndim,
            self.owner,
        )

    def device(self) -> int:
        """The CUDA device the memory lives on (asks the driver; needs a GPU)."""
        cupy = gpu.cupy()

        return int(cupy.cuda.runtime.pointerGetAttributes(self.ptr).device)


def _interface(obj: Any, name: str) -> tuple[dict, Any]:
    if isinstance(obj, np.ndarray) or (hasattr(obj, "__dlpack__") and not _arrays.is_device(obj)):
        kind = "NumPy" if isinstance(obj, np.ndarray) else type(obj).__name__
        raise TypeError(
            f"{name}: a {kind} (host) array was given; pycusparselt runs on device arrays: move it with "
            f"cupy.asarray({name}) (a PyTorch tensor: .cuda()), or compute on the CPU with pycusparselt.reference"
        )
    if hasattr(obj, "__cuda_array_interface__"):
        cai = obj.__cuda_array_interface__
        # The interface cannot name bfloat16 (PyTorch says '<V2'); CuPy arrays carry their dtype, others
        # can say it through DLPack.
        named = isinstance(getattr(obj, "dtype", None), np.dtype)
        if named or np.dtype(cai["typestr"]).kind != "V" or not hasattr(obj, "__dlpack__"):
            return cai, obj
    if hasattr(obj, "__dlpack__"):
        cupy = gpu.cupy()

        arr = cupy.from_dlpack(obj)  # zero-copy
        return arr.__cuda_array_interface__, arr
    raise TypeError(
        f"{name}: expected a device array (CuPy, or any object with __cuda_array_interface__ or __dlpack__), "
        f"got {type(obj).__name__}"
    )


def as_operand(obj: Any, name: str, dtype: Any = None) -> Operand:
    """Describe ``obj`` (2-D or 3-D, on the GPU) without copying, or raise TypeError/ValueError naming it.

    ``dtype`` reinterprets one-byte storage (uint8 or int8 arrays) as another one-byte type: CuPy cannot
    hold float8 arrays, so FP8 data travels as its bytes.
    """
    cai, owner = _interface(obj, name)
    stored = getattr(owner, "dtype", None)
    if not isinstance(stored, np.dtype):  # foreign arrays: the typestr says it
        try:
            stored = np.dtype(cai["typestr"])
        except TypeError:
            raise TypeError(f"{name}: unknown element type {cai['typestr']!r}") from None
    if stored.hasobject or stored.kind in "OUSMm":  # other numeric types are refused with the supported list
        raise TypeError(f"{name}: element type {stored} cannot be a matrix operand (numbers only)")
    dtype = stored if dtype is None else np.dtype(dtype)
    if dtype != stored and not (dtype.itemsize == 1 and stored in (np.dtype(np.uint8), np.dtype(np.int8))):
        raise TypeError(f"{name}: holds {stored}; only uint8/int8 storage can be read as {dtype}")
    shape = tuple(int(s) for s in cai["shape"])
    if len(shape) not in (2, 3):
        raise ValueError(f"{name}: expected a matrix (rows, cols) or a batch (batch, rows, cols), got shape {shape}")
    if min(shape) < 1:
        raise ValueError(f"{name}: shape {shape} has an empty dimension; cuSPARSELt multiplies matrices of at "
                         f"least one row and one column (skip empty products)")
    itemsize = stored.itemsize
    if cai.get("strides") is None:
        strides = tuple(int(np.prod(shape[i + 1 :], dtype=np.int64)) for i in range(len(shape)))
    else:
        byte_strides = tuple(int(s) for s in cai["strides"])
        if any(s % itemsize for s in byte_strides):
            raise ValueError(f"{name}: strides {byte_strides} (bytes) are not multiples of the element size {itemsize}")
        strides = tuple(s // itemsize for s in byte_strides)
    ptr = int(cai["data"][0])
    if not 0 < ptr < 1 << 64:
        raise ValueError(f"{name}: device address {ptr:#x} is not a valid pointer (NULL, negative or too large)")
    rows, cols = shape[-2:]
    sr, sc = strides[-2:]
    row_major = (sc == 1 or cols == 1) and (rows == 1 or sr >= cols)
    col_major = (sr == 1 or rows == 1) and (cols == 1 or sc >= rows)
    if row_major:
        order, ld = ROW, (sr if rows > 1 else max(cols, 1))
    elif col_major:
        order, ld = COL, (sc if cols > 1 else max(rows, 1))
    else:
        raise ValueError(
            f"{name}: shape {shape} with element strides {strides} is contiguous along neither of its last two "
            f"dimensions; pass a C- or F-contiguous array (or a transposed view of one)"
        )
    batch, batch_stride = 1, 0
    if len(shape) == 3:
        batch, batch_stride = shape[0], strides[0] if shape[0] > 1 else 0
        if batch_stride < 0 or 0 < batch_stride < ld * (rows if order == ROW else cols):
            raise ValueError(f"{name}: batch stride {batch_stride} overlaps the matrices of shape {shape[1:]}")
    return Operand(name, ptr, dtype, batch, rows, cols, order, ld, batch_stride, len(shape), owner)
