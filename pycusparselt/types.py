"""The element types: one table shared by the NumPy reference and the GPU layers.

NumPy and ml_dtypes only. Every NumPy dtype constant of the package lives here (``tests/test_structure.py``
fails on a dtype table defined elsewhere): the types cuSPARSELt takes, the C/D types each input type can
produce with its default, the compute types, the size rules per type, and the formats of the float types.

The combinations are those cuSPARSELt 0.8-0.10 documents with C and D of one type, as the GPU layer always
passes them. The library documents one more for FP8 inputs: an E4M3 D from a FP16 or BF16 C. With C and D of
one type (E4M3 -> E4M3 with an E4M3 C) ``cusparseLtMatmulDescriptorInit`` answers ``NOT_SUPPORTED`` (measured
on an H100 with 0.8.0, docs/semantics.rst, case ``e4m3_to_e4m3_saturate``), so FP8 inputs produce FP16 (the
default), BF16 or FP32 here, in the reference as on the GPU.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping, NamedTuple

import ml_dtypes
import numpy as np

__all__ = [
    "F16", "BF16", "F32", "F64", "I8", "I32", "I64", "U8", "U16", "U32", "U64", "E4M3", "E5M2",
    "SUPPORTED_INPUTS", "FLOAT_TYPES", "FP8_TYPES", "INTEGER_OUTPUTS", "UINT_OF_WIDTH",
    "TypeRules", "TYPE_RULES", "VALID_COMBINATIONS", "COMPUTE_TYPES",
    "FloatFormat", "FLOAT_FORMATS",
    "name", "rules_for", "default_out_dtype", "combinations_text", "bias_dtype", "is_fp8",
]

F16 = np.dtype(np.float16)
BF16 = np.dtype(ml_dtypes.bfloat16)
F32 = np.dtype(np.float32)
F64 = np.dtype(np.float64)
I8 = np.dtype(np.int8)
I32 = np.dtype(np.int32)
U8 = np.dtype(np.uint8)  # FP8 values on the GPU (CuPy has no float8 type): their bytes
U16 = np.dtype(np.uint16)  # bfloat16 values in files: their bits
U32 = np.dtype(np.uint32)
I64 = np.dtype(np.int64)
U64 = np.dtype(np.uint64)
E4M3 = np.dtype(ml_dtypes.float8_e4m3fn)
E5M2 = np.dtype(ml_dtypes.float8_e5m2)

#: The unsigned integer type of each width in bits (bit patterns of the float types).
UINT_OF_WIDTH: Mapping[int, np.dtype] = {8: U8, 16: U16, 32: U32}

FLOAT_TYPES: tuple[np.dtype, ...] = (F16, BF16, F32, E4M3, E5M2)
FP8_TYPES: tuple[np.dtype, ...] = (E4M3, E5M2)
#: Output types with integer values (their bias is float32, their conversion rounds and saturates).
INTEGER_OUTPUTS: tuple[np.dtype, ...] = (I8, I32)


@dataclass(frozen=True)
class TypeRules:
    """What cuSPARSELt takes and gives for one input (A/B) type.

    Attributes
    ----------
    outputs : tuple of numpy.dtype
        The C/D types (C and D share one); the first is the default when neither ``out_dtype`` nor C names one.
    computes : tuple of str
        The compute types; the first is the default. ``"TF32"`` names the math ``"32F"`` does for float32
        inputs (there is no sparse FP32 math: Tensor Cores round the inputs to TF32).
    sparse_multiple, dense_multiple : int
        What rows, columns and leading dimensions of the structured and of the dense operands are multiples of.
    needs_tn : bool
        Whether the sparse operand must be row-major along K and the dense one column-major along K.
    min_cc : tuple of int
        The lowest compute capability with kernels for the type.
    """

    outputs: tuple[np.dtype, ...]
    computes: tuple[str, ...]
    sparse_multiple: int
    dense_multiple: int
    needs_tn: bool
    min_cc: tuple[int, int]


#: Input type -> its rules. FP32 with a row-major dense B never returns from ``cusparseLtMatmul`` on 0.8.0,
#: and INT8 / FP8 with a row-major B are refused: those types are TN only.
TYPE_RULES: Mapping[np.dtype, TypeRules] = {
    F16: TypeRules((F16,), ("32F", "16F"), 16, 8, False, (8, 0)),
    BF16: TypeRules((BF16,), ("32F",), 16, 8, False, (8, 0)),
    F32: TypeRules((F32,), ("32F", "TF32"), 8, 4, True, (8, 0)),
    I8: TypeRules((I32, I8, F16, BF16), ("32I",), 32, 16, True, (8, 0)),
    E4M3: TypeRules((F16, BF16, F32), ("32F",), 32, 16, True, (8, 9)),
    E5M2: TypeRules((F16, BF16, F32), ("32F",), 32, 16, True, (8, 9)),
}

#: The element types of the sparse and dense operands A and B.
SUPPORTED_INPUTS: tuple[np.dtype, ...] = tuple(TYPE_RULES)

#: Input type -> the C/D types it can produce; the first is the default.
VALID_COMBINATIONS: Mapping[np.dtype, tuple[np.dtype, ...]] = {i: r.outputs for i, r in TYPE_RULES.items()}

#: Input type -> the compute types it accepts; the first is the default.
COMPUTE_TYPES: Mapping[np.dtype, tuple[str, ...]] = {i: r.computes for i, r in TYPE_RULES.items()}


class FloatFormat(NamedTuple):
    """The bit layout and range of one float type."""

    bits: int  # storage width
    mant: int  # explicit mantissa bits
    emin: int  # exponent of the smallest normal
    max: float  # largest finite value
    inf_bits: int | None  # sign-cleared bit pattern of +inf (None: the type has no infinity)
    nan_bits: int  # sign-cleared bit pattern of the canonical quiet NaN
    saturate: bool  # conversion to this type saturates to +-max instead of overflowing to inf


FLOAT_FORMATS: Mapping[np.dtype, FloatFormat] = {
    F16: FloatFormat(16, 10, -14, 65504.0, 0x7C00, 0x7E00, False),
    BF16: FloatFormat(16, 7, -126, float(ml_dtypes.finfo(BF16).max), 0x7F80, 0x7FC0, False),
    F32: FloatFormat(32, 23, -126, float(np.finfo(np.float32).max), 0x7F800000, 0x7FC00000, False),
    E4M3: FloatFormat(8, 3, -6, 448.0, None, 0x7F, True),
    E5M2: FloatFormat(8, 2, -14, 57344.0, 0x7C, 0x7E, True),
}


def name(dtype: Any) -> str:
    """The dtype's name as messages give it (``"bfloat16"``, ``"float8_e4m3fn"``)."""
    return np.dtype(dtype).name


def is_fp8(dtype: Any) -> bool:
    """Whether ``dtype`` is one of the float8 types."""
    return np.dtype(dtype) in FP8_TYPES


def rules_for(dtype: Any, what: str = "dtype") -> TypeRules:
    """The rules of an input type.

    Parameters
    ----------
    dtype : numpy dtype-like
        The A/B element type.
    what : str
        The argument's name in the error.

    Raises
    ------
    TypeError
        For a type cuSPARSELt does not take, listing those it does.
    """
    try:
        return TYPE_RULES[np.dtype(dtype)]
    except (KeyError, TypeError):
        supported = ", ".join(name(d) for d in TYPE_RULES)
        raise TypeError(f"{what}: {dtype} is not a supported input type (supported: {supported})") from None


def default_out_dtype(in_dtype: Any) -> np.dtype:
    """D's type when neither ``out_dtype`` nor C names one: the input type for FP16, BF16 and FP32, int32 for
    INT8 (exact), float16 for FP8."""
    return rules_for(in_dtype, "a").outputs[0]


def combinations_text() -> str:
    """The input -> output combinations, for error messages (``"float16 -> float16; ..."``)."""
    return "; ".join(f"{name(i)} -> {', '.join(name(o) for o in r.outputs)}" for i, r in TYPE_RULES.items())


def bias_dtype(out_dtype: Any) -> np.dtype:
    """The bias element type cuSPARSELt reads: float32 for an integer D, else D's type (measured)."""
    out = np.dtype(out_dtype)
    return F32 if out in INTEGER_OUTPUTS else out
