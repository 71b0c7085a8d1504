"""Element types: NumPy dtypes to cuSPARSELt's, the valid combinations, and the size rules per type.

The combinations and rules are those measured on an H100 with cuSPARSELt 0.8.0 (docs/semantics.rst);
``reference.VALID_COMBINATIONS`` lists the same combinations for the CPU oracle.
"""

from __future__ import annotations

from dataclasses import dataclass

import ml_dtypes
import numpy as np

from ..enums import ComputeType, DataType

__all__ = ["TypeRules", "data_type", "rules_for", "SUPPORTED_INPUTS", "combinations_text"]

F16, BF16, F32 = np.dtype(np.float16), np.dtype(ml_dtypes.bfloat16), np.dtype(np.float32)
I8, I32 = np.dtype(np.int8), np.dtype(np.int32)
E4M3, E5M2 = np.dtype(ml_dtypes.float8_e4m3fn), np.dtype(ml_dtypes.float8_e5m2)

_DATA_TYPES = {
    F16: DataType.R_16F,
    BF16: DataType.R_16BF,
    F32: DataType.R_32F,
    I8: DataType.R_8I,
    I32: DataType.R_32I,
    E4M3: DataType.R_8F_E4M3,
    E5M2: DataType.R_8F_E5M2,
}


@dataclass(frozen=True)
class TypeRules:
    """What cuSPARSELt needs for one input type."""

    outputs: tuple[np.dtype, ...]  # valid C/D types; the first is the default
    computes: tuple[str, ...]  # valid compute types; the first is the default
    sparse_multiple: int  # rows, cols and ld of the structured operand
    dense_multiple: int  # rows, cols and ld of the dense operands
    needs_tn: bool  # sparse operand row-major along K and dense operand column-major along K
    min_cc: tuple[int, int]


_RULES = {
    F16: TypeRules((F16,), ("32F", "16F"), 16, 8, False, (8, 0)),
    BF16: TypeRules((BF16,), ("32F",), 16, 8, False, (8, 0)),
    # FP32 with a row-major dense B never returns from cusparseLtMatmul on 0.8.0: TN only.
    F32: TypeRules((F32,), ("32F",), 8, 4, True, (8, 0)),
    I8: TypeRules((I32, I8, F16, BF16), ("32I",), 32, 16, True, (8, 0)),
    E4M3: TypeRules((F16, BF16, F32), ("32F",), 32, 16, True, (8, 9)),
    E5M2: TypeRules((F16, BF16, F32), ("32F",), 32, 16, True, (8, 9)),
}

SUPPORTED_INPUTS: tuple[np.dtype, ...] = tuple(_RULES)

_COMPUTE = {"32F": ComputeType.COMPUTE_32F, "16F": ComputeType.COMPUTE_16F, "32I": ComputeType.COMPUTE_32I}


def _name(dt: np.dtype) -> str:
    return dt.name


def combinations_text() -> str:
    """The supported input -> output combinations, for error messages."""
    return "; ".join(f"{_name(i)} -> {', '.join(_name(o) for o in r.outputs)}" for i, r in _RULES.items())


def rules_for(dtype: np.dtype, what: str = "dtype") -> TypeRules:
    """The rules for an input dtype, or a TypeError listing the supported ones."""
    try:
        return _RULES[np.dtype(dtype)]
    except (KeyError, TypeError):
        supported = ", ".join(_name(d) for d in _RULES)
        raise TypeError(f"{what}: {dtype} is not a supported input type (supported: {supported})") from None


def data_type(dtype: np.dtype) -> DataType:
    """cuSPARSELt's ``cudaDataType`` for a NumPy dtype."""
    return _DATA_TYPES[np.dtype(dtype)]


def resolve_out_dtype(in_dtype: np.dtype, out_dtype, c_dtype) -> np.dtype:
    """D's dtype: ``out_dtype``, else C's, else the input type's default; checked against the combinations."""
    rules = rules_for(in_dtype, "a")
    if out_dtype is None:
        out = np.dtype(c_dtype) if c_dtype is not None else rules.outputs[0]
    else:
        out = np.dtype(out_dtype)
    if out not in rules.outputs:
        raise TypeError(
            f"out_dtype: {in_dtype} inputs cannot produce {out} (supported combinations: {combinations_text()})"
        )
    if c_dtype is not None and np.dtype(c_dtype) != out:
        raise TypeError(f"c: dtype {c_dtype} differs from D's dtype {out} (C and D share one type)")
    return out


def resolve_compute(in_dtype: np.dtype, compute) -> ComputeType:
    """The compute type: ``compute`` ("32F", "16F", "32I") if valid for the input, else the default."""
    rules = rules_for(in_dtype, "a")
    name = rules.computes[0] if compute is None else str(compute).upper().removeprefix("COMPUTE_")
    if name not in rules.computes:
        raise ValueError(
            f"compute: {compute!r} is not valid for {in_dtype} inputs (valid: {', '.join(rules.computes)})"
        )
    return _COMPUTE[name]


def bias_dtype(out_dtype: np.dtype) -> np.dtype:
    """The bias element type cuSPARSELt reads: float32 for integer D, else D's type (measured)."""
    return F32 if np.dtype(out_dtype) in (I8, I32) else np.dtype(out_dtype)
