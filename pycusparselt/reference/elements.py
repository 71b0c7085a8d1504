"""Element-level helpers of the reference: input checks, exact conversions to float64, bit patterns,
magnitudes and non-zeros of every supported type (the formats are :data:`pycusparselt.types.FLOAT_FORMATS`)."""

from __future__ import annotations

from typing import Any

import numpy as np

from ..types import BF16, E4M3, E5M2, FLOAT_FORMATS, I8, SUPPORTED_INPUTS, U8, UINT_OF_WIDTH

__all__ = ["dtype_name", "supported_list", "as_array", "normalize_axis", "check_multiple_of_4", "bit_patterns",
           "to_float64", "magnitude64", "magnitude_key", "is_nonzero", "format_value"]


def dtype_name(dt: np.dtype) -> str:
    """The dtype's name as messages give it."""
    return np.dtype(dt).name


def supported_list() -> str:
    """The supported input types, for messages."""
    return ", ".join(dtype_name(d) for d in SUPPORTED_INPUTS)


def as_array(a: Any, what: str = "a") -> np.ndarray:
    """``a`` as a NumPy array of a supported input type, or TypeError naming ``what``."""
    arr = np.asarray(a)
    if arr.dtype not in SUPPORTED_INPUTS:
        raise TypeError(
            f"{what}: unsupported dtype {arr.dtype}; supported: {supported_list()}"
        )
    return arr


def normalize_axis(axis: int, ndim: int, what: str = "axis") -> int:
    """``axis`` as a non-negative axis of an array of ``ndim`` dimensions (checked)."""
    if not isinstance(axis, (int, np.integer)) or isinstance(axis, bool):
        raise TypeError(f"{what} must be an int, got {axis!r}")
    if not -ndim <= axis < ndim:
        raise ValueError(f"{what} {axis} is out of range for an array of {ndim} dimension(s)")
    return int(axis) % ndim


def check_multiple_of_4(shape: tuple[int, ...], ax: int) -> None:
    """ValueError unless axis ``ax`` of ``shape`` holds whole groups of four."""
    if shape[ax] % 4:
        raise ValueError(
            f"axis {ax} has size {shape[ax]}, which is not a multiple of 4 "
            f"(2:4 groups of four run along that axis)"
        )


def bit_patterns(a: np.ndarray) -> np.ndarray:
    """The raw bit patterns of ``a`` as unsigned integers of the same width (a view)."""
    return a.view(UINT_OF_WIDTH[a.dtype.itemsize * 8])


_E4M3_TABLE = np.arange(256, dtype=U8).view(E4M3).astype(np.float64)
_E5M2_TABLE = np.arange(256, dtype=U8).view(E5M2).astype(np.float64)


def to_float64(a: np.ndarray) -> np.ndarray:
    """Exact conversion of any supported (or int32/float64) array to float64, fast for ml_dtypes."""
    dt = a.dtype
    if dt == BF16:
        with np.errstate(invalid="ignore"):  # signalling NaNs warn; they convert to quiet NaNs
            return (bit_patterns(a).astype(np.uint32) << 16).view(np.float32).astype(np.float64)
    if dt == E4M3:
        return _E4M3_TABLE[bit_patterns(a)]
    if dt == E5M2:
        return _E5M2_TABLE[bit_patterns(a)]
    with np.errstate(invalid="ignore"):  # signalling NaNs warn; they convert to quiet NaNs
        return a.astype(np.float64)


def magnitude64(a: np.ndarray) -> np.ndarray:
    """|a| in float64 (exact; int8's -128 becomes 128, NaN stays NaN)."""
    return np.abs(to_float64(a))


def magnitude_key(a: np.ndarray) -> np.ndarray:
    """An unsigned integer per element that orders like |a|, with every NaN above +inf.

    Sign-magnitude floats order like their sign-cleared bit patterns; all NaNs are mapped to one
    value above +inf so that NaN payloads do not rank among themselves. Exact, and much faster than
    comparing float64 magnitudes.
    """
    if a.dtype == I8:
        return np.abs(a.astype(np.int16)).astype(np.uint16)
    info = FLOAT_FORMATS[a.dtype]
    key = bit_patterns(a) & np.array((1 << (info.bits - 1)) - 1, dtype=UINT_OF_WIDTH[info.bits])
    if info.inf_bits is not None:  # e4m3fn's only NaN (0x7F) is already the largest key
        key = np.where(key > info.inf_bits, np.array(info.inf_bits + 1, key.dtype), key)
    return key


def is_nonzero(a: np.ndarray) -> np.ndarray:
    """True where the value is non-zero (-0.0 counts as zero, NaN as non-zero)."""
    if a.dtype == I8:
        return a != 0
    info = FLOAT_FORMATS[a.dtype]
    return (bit_patterns(a) & np.array((1 << (info.bits - 1)) - 1, dtype=UINT_OF_WIDTH[info.bits])) != 0


def format_value(v: Any) -> str:
    """One element for a message: integers as integers, floats by ``repr``."""
    if isinstance(v, (np.integer, int)):
        return str(int(v))
    return repr(float(v))
