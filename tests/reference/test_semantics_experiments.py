"""Replay the GPU experiments of scripts/probe_semantics.py on the NumPy reference.

``tests/reference/data/probe_*.npz`` holds each case's exact inputs, parameters, status and the GPU's output (an H100
with cuSPARSELt 0.8.0). Inputs are small integers, so the products are exact in every type and the reference
must reproduce the GPU's output **bit for bit**: any rule of docs/semantics.rst that the reference breaks
fails here, without a GPU. Cases the library refused are pinned to their recorded refusal, so the
documentation's claims about them are tied to data too.
"""

from __future__ import annotations

import json
from pathlib import Path

import ml_dtypes
import numpy as np
import pytest

from pycusparselt import reference

DATA = sorted((Path(__file__).parent / "data").glob("probe_*.npz"))

DTYPES = {
    "float16": np.float16,
    "bfloat16": ml_dtypes.bfloat16,
    "float32": np.float32,
    "int8": np.int8,
    "int32": np.int32,
    "float8_e4m3fn": ml_dtypes.float8_e4m3fn,
    "float8_e5m2": ml_dtypes.float8_e5m2,
}

# What the library said to the cases it did not run (cuSPARSELt 0.8.0, H100).
REFUSALS = {
    "gelu_e4m3_fp32": "InvalidValueError",
    "gelu_scaling_e4m3_fp32": "InvalidValueError",
    "gelu_fp16": "InvalidValueError",
    "bf16_gelu": "InvalidValueError",
    "gelu_int8_fp16": "InvalidValueError",
    "gelu_scaling_int8_fp16": "InvalidValueError",
    "gelu_scaling_int8_int32": "InvalidValueError",
    "e4m3_to_e4m3_saturate": "NotSupportedError: cusparseLtMatmulDescriptorInit",
    "int8_row_row": "NotSupportedError: cusparseLtMatmulDescriptorInit",
    "e4m3_row_row": "NotSupportedError: cusparseLtMatmulDescriptorInit",
    "fp32_row_row": "hung",
}


def _cases():
    for path in DATA:
        with np.load(path) as f:
            summary = json.loads(str(f["summary"]))
        for name in summary:
            yield pytest.param(path, name, id=f"{path.stem}:{name}")


def _load(path: Path, name: str) -> tuple[dict, dict]:
    with np.load(path) as f:
        record = json.loads(str(f["summary"]))[name]
        prefix = f"{name}__"
        arrays = {k[len(prefix):]: f[k] for k in f.files if k.startswith(prefix)}
    return record, arrays


def replay_arguments(record: dict, arrays: dict) -> tuple[tuple, dict]:
    """The recorded case as arguments of :func:`reference.matmul`."""
    in_dt, out_dt = DTYPES[record["in_type"]], DTYPES[record["out_type"]]
    a = arrays["a"].astype(in_dt)
    b = arrays["b"].astype(in_dt)
    m = a.shape[0]
    c = arrays["c"].astype(out_dt) if "c" in arrays else None
    alpha = arrays["alpha_vector"][:m].astype(np.float32) if "alpha_vector" in arrays else record.get("alpha", 1.0)
    bias = None
    if "bias" in arrays:
        # Records made before the bias-type finding lack "bias_type": they passed float32 for INT8 inputs.
        default = "float32" if record["in_type"] == "int8" or record["out_type"] == "float32" else record["out_type"]
        sent = arrays["bias"].astype(DTYPES[record.get("bias_type", default)])
        # The library reads the bias in its own type: a float32 buffer under a 16-bit output is read as halves.
        read_as = DTYPES["float32" if record["out_type"] in ("int8", "int32", "float32") else record["out_type"]]
        bias = sent.view(read_as)[:m]
    activation = "relu" if record.get("relu") else "gelu" if record.get("gelu") or "gelu_scaling" in record else None
    kwargs = {}
    if activation == "relu":
        kwargs = {"relu_threshold": record.get("relu_threshold", 0.0),
                  "relu_upper_bound": record.get("relu_upper", np.inf)}
    elif activation == "gelu":
        kwargs = {"gelu_scaling": record.get("gelu_scaling", 1.0)}
    return (a, b, c), dict(alpha=alpha, beta=record.get("beta", 0.0), bias=bias, activation=activation,
                           out_dtype=out_dt, **kwargs)


@pytest.mark.skipif(not DATA, reason="no recorded GPU experiments in tests/data")
@pytest.mark.parametrize("path, name", list(_cases()))
def test_reference_reproduces_the_gpu(path, name):
    record, arrays = _load(path, name)
    if record["status"] != "ok":
        assert name in REFUSALS, f"unexpected refusal: {record['status']}"
        assert record["status"].startswith(REFUSALS[name]), record["status"]
        return
    assert name not in REFUSALS, "a refusal recorded in REFUSALS now succeeds: update the docs"
    expected = arrays["d"]
    args, kwargs = replay_arguments(record, arrays)
    got = reference.matmul(*args, **kwargs).astype(np.float64)
    if kwargs["activation"] == "gelu":
        # The GPU's tanh is an approximation: a GELU value within its error (2**-10 relative) of an
        # int8 rounding boundary may round the other way (13.5 -> 13). Only there is a difference of
        # one allowed; everywhere else the reference must match exactly.
        y = reference.semantics.compute_product(*args, **{"relu_upper_bound": np.inf, "relu_threshold": 0.0,
                                                  "gelu_scaling": 1.0, **kwargs}).y
        near_tie = np.abs(np.abs(y - np.floor(y)) - 0.5) <= 2.0**-10 * np.maximum(np.abs(y), 1.0)
        allowed = near_tie & (np.abs(got - expected) == 1)
        assert np.mean(allowed) < 0.02, "too many outputs excused: the exception would hide a wrong rule"
        got = np.where(allowed, expected, got)
    mismatch = np.flatnonzero(got != expected)
    assert mismatch.size == 0, (
        f"{mismatch.size} of {expected.size} outputs differ; first at {np.unravel_index(mismatch[0], expected.shape)}: "
        f"reference {got.flat[mismatch[0]]}, GPU {expected.flat[mismatch[0]]}"
    )
