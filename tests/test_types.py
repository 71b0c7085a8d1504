"""The type table shared by the NumPy reference and the GPU layers (pycusparselt.types): the combinations
cuSPARSELt documents with C and D of one type, the defaults, and that both layers read this one table."""

from __future__ import annotations

import ml_dtypes
import numpy as np
import pytest

from pycusparselt import reference, types
from pycusparselt.gemm import dtypes

F16, BF16, F32 = np.dtype(np.float16), np.dtype(ml_dtypes.bfloat16), np.dtype(np.float32)
I8, I32 = np.dtype(np.int8), np.dtype(np.int32)
E4M3, E5M2 = np.dtype(ml_dtypes.float8_e4m3fn), np.dtype(ml_dtypes.float8_e5m2)


def test_combinations_are_those_cusparselt_documents_with_one_c_and_d_type():
    assert dict(types.VALID_COMBINATIONS) == {
        F16: (F16,),
        BF16: (BF16,),
        F32: (F32,),
        I8: (I32, I8, F16, BF16),
        E4M3: (F16, BF16, F32),
        E5M2: (F16, BF16, F32),
    }


@pytest.mark.parametrize("fp8", [E4M3, E5M2])
def test_fp8_inputs_give_float16_by_default_and_no_fp8_output(fp8):
    """cuSPARSELt documents an E4M3 D only with a C of another type; C and D share one type here."""
    assert types.default_out_dtype(fp8) == F16
    assert E4M3 not in types.VALID_COMBINATIONS[fp8] and E5M2 not in types.VALID_COMBINATIONS[fp8]
    assert types.COMPUTE_TYPES[fp8] == ("32F",)
    a = np.zeros((2, 4), fp8)
    assert reference.matmul(a, np.zeros((4, 2), fp8)).dtype == F16
    with pytest.raises(TypeError, match="unsupported type combination"):
        reference.matmul(a, np.zeros((4, 2), fp8), out_dtype=fp8)
    assert dtypes.resolve_out_dtype(fp8, None, None) == F16
    with pytest.raises(TypeError, match="cannot produce"):
        dtypes.resolve_out_dtype(fp8, fp8, None)


def test_defaults_and_compute_types():
    assert [types.default_out_dtype(t) for t in types.SUPPORTED_INPUTS] == [F16, BF16, F32, I32, F16, F16]
    assert types.COMPUTE_TYPES[F16] == ("32F", "16F")
    assert types.COMPUTE_TYPES[I8] == ("32I",)
    assert dtypes.resolve_compute(F32, "TF32") == dtypes.resolve_compute(F32, None)
    with pytest.raises(ValueError, match="not valid"):
        dtypes.resolve_compute(I8, "32F")


def test_the_reference_and_the_gpu_layer_read_one_table():
    assert reference.VALID_COMBINATIONS is types.VALID_COMBINATIONS
    assert reference.DEFAULT_COMPUTE is types.COMPUTE_TYPES
    assert reference.SUPPORTED_DTYPES == types.SUPPORTED_INPUTS == dtypes.SUPPORTED_INPUTS
    assert dtypes.rules_for is types.rules_for and dtypes.combinations_text is types.combinations_text
    for in_dt, outs in types.VALID_COMBINATIONS.items():
        for out in outs:
            assert dtypes.resolve_out_dtype(in_dt, out, None) == out
            reference.matmul_tolerance(in_dt, out, 8)  # every combination is one the tolerance knows


def test_bias_dtype():
    assert types.bias_dtype(I8) == F32 and types.bias_dtype(I32) == F32
    assert types.bias_dtype(F16) == F16 and types.bias_dtype(BF16) == BF16


def test_unknown_input_type_lists_the_supported_ones():
    with pytest.raises(TypeError, match="float64.* is not a supported input type"):
        types.rules_for(np.float64)
