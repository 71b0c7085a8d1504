"""Element types as the GPU layer passes them: NumPy dtypes to cuSPARSELt's, and the checks of a plan's
output and compute types.

The table itself (combinations, defaults, size rules) is :mod:`pycusparselt.types`, shared with the
NumPy reference; this module adds what needs the library's enumerations.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from ..enums import ComputeType, DataType
from ..types import (
    BF16,
    E4M3,
    E5M2,
    F16,
    F32,
    I8,
    I32,
    SUPPORTED_INPUTS,
    TypeRules,
    bias_dtype,
    combinations_text,
    rules_for,
)

__all__ = ["TypeRules", "data_type", "rules_for", "SUPPORTED_INPUTS", "combinations_text", "resolve_out_dtype",
           "resolve_compute", "bias_dtype", "F16", "BF16", "F32", "I8", "I32", "E4M3", "E5M2"]

_DATA_TYPES = {
    F16: DataType.R_16F,
    BF16: DataType.R_16BF,
    F32: DataType.R_32F,
    I8: DataType.R_8I,
    I32: DataType.R_32I,
    E4M3: DataType.R_8F_E4M3,
    E5M2: DataType.R_8F_E5M2,
}

# "TF32" names the math "32F" does for float32 inputs (types.TypeRules.computes)
_COMPUTE = {"32F": ComputeType.COMPUTE_32F, "TF32": ComputeType.COMPUTE_32F, "16F": ComputeType.COMPUTE_16F,
            "32I": ComputeType.COMPUTE_32I}


def data_type(dtype: Any) -> DataType:
    """cuSPARSELt's ``cudaDataType`` for a NumPy dtype."""
    return _DATA_TYPES[np.dtype(dtype)]


def resolve_out_dtype(in_dtype: Any, out_dtype: Any, c_dtype: Any) -> np.dtype:
    """D's dtype: ``out_dtype``, else C's, else the input type's default; checked against the combinations.

    Raises
    ------
    TypeError
        For a combination cuSPARSELt does not offer, or a C whose type is not D's.
    """
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


def resolve_compute(in_dtype: Any, compute: Any) -> ComputeType:
    """The compute type: ``compute`` ("32F", "16F", "32I"; "TF32" for float32) if valid for the input, else
    the input type's default.

    Raises
    ------
    ValueError
        For a compute type the input type does not take.
    """
    rules = rules_for(in_dtype, "a")
    key = rules.computes[0] if compute is None else str(compute).upper().removeprefix("COMPUTE_")
    if key not in rules.computes:
        raise ValueError(
            f"compute: {compute!r} is not valid for {in_dtype} inputs (valid: {', '.join(rules.computes)})"
        )
    return _COMPUTE[key]
