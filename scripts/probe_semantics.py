"""Experiments that settle cuSPARSELt's epilogue and conversion semantics on a real GPU.

Runs small sparse GEMMs through the thin bindings with inputs designed to tell candidate rules apart
(bias indexing, the order of alpha/beta/bias/activation, the ReLU threshold and upper bound, the GELU
formula and its scaling, int8 rounding and saturation, alpha-vector indexing, FP8 output saturation, FP32
inputs) and saves every case's exact inputs, parameters, status and output to ``probe.npz`` (one file
for all cases) and ``probe_summary.json``. ``tests/reference/test_semantics_experiments.py`` replays the saved cases
on the NumPy reference, so the findings are checked in CI without a GPU.

Usage: ``python scripts/probe_semantics.py OUTDIR``
"""

from __future__ import annotations

import json
import os
import sys
import traceback

import ml_dtypes
import numpy as np

DTYPES = {
    "float16": (np.float16, "R_16F"),
    "bfloat16": (ml_dtypes.bfloat16, "R_16BF"),
    "float32": (np.float32, "R_32F"),
    "int8": (np.int8, "R_8I"),
    "int32": (np.int32, "R_32I"),
    "float8_e4m3fn": (ml_dtypes.float8_e4m3fn, "R_8F_E4M3"),
    "float8_e5m2": (ml_dtypes.float8_e5m2, "R_8F_E5M2"),
}


def bias_type_for(out_type: str) -> str:
    """The bias element type cuSPARSELt reads: float for integer and FP32 outputs, else the output type
    (an INT8 -> FP16 experiment read a float32 bias as pairs of halves)."""
    return "float32" if out_type in ("int8", "int32", "float32") else out_type


def run_case(
    a: np.ndarray,
    b: np.ndarray,
    c: np.ndarray | None,
    *,
    in_type: str,
    out_type: str,
    compute: str,
    b_order: str = "row",
    alpha=1.0,
    beta=0.0,
    alpha_vector: np.ndarray | None = None,
    bias: np.ndarray | None = None,
    relu: bool = False,
    relu_upper: float | None = None,
    relu_threshold: float | None = None,
    gelu: bool = False,
    gelu_scaling: float | None = None,
) -> np.ndarray:
    """D = epilogue(A_sparse @ B) with A row-major (M, K) structured, B (K, N) row- or column-major,
    C/D row-major (M, N). A must already be 2:4 along K. Returns D on the host."""
    import cupy as cp

    from pycusparselt import bindings as bd
    from pycusparselt.enums import ComputeType, DataType, MatmulDescAttribute, Operation, Order

    m, k = a.shape
    n = b.shape[1]
    in_np, in_dt = DTYPES[in_type]
    out_np, out_dt = DTYPES[out_type]
    a_dev = cp.asarray(a.astype(in_np).view(np.uint8)).view(cp.uint8)
    if b_order == "row":
        b_dev = cp.asarray(np.ascontiguousarray(b.astype(in_np)).view(np.uint8))
        b_ld = n
    else:
        b_dev = cp.asarray(np.ascontiguousarray(b.astype(in_np).T).view(np.uint8))
        b_ld = k
    c_host = np.zeros((m, n), out_np) if c is None else c.astype(out_np)
    c_dev = cp.asarray(c_host.view(np.uint8))
    d_dev = cp.zeros_like(c_dev)

    h = bd.RawHandle()
    ma, mb, mc = bd.RawMatDescriptor(), bd.RawMatDescriptor(), bd.RawMatDescriptor()
    desc, sel, plan = bd.RawMatmulDescriptor(), bd.RawAlgSelection(), bd.RawPlan()
    keep = []
    bd.init(h)
    try:
        bd.structured_descriptor_init(h, ma, m, k, k, 16, DataType[in_dt], Order.ROW)
        bd.dense_descriptor_init(h, mb, k, n, b_ld, 16, DataType[in_dt], Order.ROW if b_order == "row" else Order.COL)
        bd.dense_descriptor_init(h, mc, m, n, n, 16, DataType[out_dt], Order.ROW)
        bd.matmul_descriptor_init(h, desc, Operation.NON_TRANSPOSE, Operation.NON_TRANSPOSE, ma, mb, mc, mc,
                                  ComputeType[compute])
        A = MatmulDescAttribute
        bd.matmul_desc_set_attribute(h, desc, A.SPARSE_MAT_POINTER, a_dev.data.ptr)
        if relu:
            bd.matmul_desc_set_attribute(h, desc, A.ACTIVATION_RELU, 1)
        if relu_upper is not None:
            bd.matmul_desc_set_attribute(h, desc, A.ACTIVATION_RELU_UPPERBOUND, float(relu_upper))
        if relu_threshold is not None:
            bd.matmul_desc_set_attribute(h, desc, A.ACTIVATION_RELU_THRESHOLD, float(relu_threshold))
        if gelu:
            bd.matmul_desc_set_attribute(h, desc, A.ACTIVATION_GELU, 1)
        if gelu_scaling is not None:
            bd.matmul_desc_set_attribute(h, desc, A.ACTIVATION_GELU_SCALING, float(gelu_scaling))
        alpha_arg: object = alpha
        if alpha_vector is not None:
            bd.matmul_desc_set_attribute(h, desc, A.ALPHA_VECTOR_SCALING, 1)
            av = cp.asarray(alpha_vector.astype(np.float32))
            keep.append(av)
            alpha_arg = bd.DevicePointer(av.data.ptr)
        if bias is not None:
            bv = cp.asarray(bias.astype(DTYPES[bias_type_for(out_type)][0]).view(np.uint8))
            keep.append(bv)
            bd.matmul_desc_set_attribute(h, desc, A.BIAS_POINTER, bv.data.ptr)
        bd.matmul_alg_selection_init(h, sel, desc)
        bd.matmul_plan_init(h, plan, desc, sel)
        size, scratch_size = bd.spmma_compressed_size(h, plan)
        comp = cp.empty(size, cp.uint8)
        scratch = cp.empty(max(scratch_size, 1), cp.uint8)
        stream = cp.cuda.get_current_stream()
        bd.spmma_compress(h, plan, a_dev.data.ptr, comp.data.ptr, scratch.data.ptr, stream)
        ws = cp.empty(max(bd.matmul_get_workspace(h, plan), 1), cp.uint8)
        bd.matmul(h, plan, alpha_arg, comp.data.ptr, b_dev.data.ptr, beta, c_dev.data.ptr, d_dev.data.ptr,
                  ws.data.ptr, [stream])
        stream.synchronize()
        return d_dev.get().view(out_np).reshape(m, n)
    finally:
        for destroy, obj in ((bd.matmul_plan_destroy, plan), (bd.matmul_alg_selection_destroy, sel),
                             (bd.mat_descriptor_destroy, ma), (bd.mat_descriptor_destroy, mb),
                             (bd.mat_descriptor_destroy, mc)):
            if obj.initialized:
                destroy(obj)
        desc.release()
        bd.destroy(h)


def sparse_int_matrix(rng, m, k, lo, hi):
    """Integer-valued 2:4 matrix (exactly representable in every input type)."""
    a = rng.integers(lo, hi + 1, size=(m, k)).astype(np.float64)
    groups = a.reshape(m, k // 4, 4)
    # keep positions 0 and 2 of every group: a fixed, valid 2:4 pattern
    groups[..., 1] = 0
    groups[..., 3] = 0
    return groups.reshape(m, k)


def cases(rng):
    m, n, k = 64, 128, 64
    a = sparse_int_matrix(rng, m, k, -3, 3)
    b = rng.integers(-3, 4, size=(k, n)).astype(np.float64)
    c = rng.integers(-4, 5, size=(m, n)).astype(np.float64)
    bias_m = np.arange(m, dtype=np.float64) * 0.25 - 4
    bias_n = np.arange(n, dtype=np.float64) * 0.25 - 8
    tn = dict(b_order="col")
    yield "bias_len_m_fp16", dict(a=a, b=b, c=None, in_type="float16", out_type="float16", compute="COMPUTE_32F",
                                  bias=np.concatenate([bias_m, np.zeros(n)]))
    yield "order_fp16", dict(a=a, b=b, c=c, in_type="float16", out_type="float16", compute="COMPUTE_32F",
                             alpha=0.5, beta=0.75, bias=bias_m, relu=True)
    yield "relu_threshold_upper_fp16", dict(a=a, b=b, c=None, in_type="float16", out_type="float16",
                                            compute="COMPUTE_32F", relu=True, relu_threshold=2.0, relu_upper=7.0)
    yield "relu_threshold_only_fp16", dict(a=a, b=b, c=None, in_type="float16", out_type="float16",
                                           compute="COMPUTE_32F", relu_threshold=2.0)
    yield "relu_upper_only_fp16", dict(a=a, b=b, c=None, in_type="float16", out_type="float16",
                                       compute="COMPUTE_32F", relu_upper=7.0)
    # GELU in fp32 output (FP8 inputs, exact integers): fine enough to tell tanh from erf.
    yield "gelu_e4m3_fp32", dict(a=a, b=b, c=None, in_type="float8_e4m3fn", out_type="float32",
                                 compute="COMPUTE_32F", alpha=1 / 8, gelu=True, **tn)
    yield "gelu_scaling_e4m3_fp32", dict(a=a, b=b, c=None, in_type="float8_e4m3fn", out_type="float32",
                                         compute="COMPUTE_32F", alpha=1 / 8, gelu=True, gelu_scaling=2.0, **tn)
    yield "gelu_fp16", dict(a=a, b=b, c=None, in_type="float16", out_type="float16", compute="COMPUTE_32F",
                            alpha=1 / 8, gelu=True)
    # int8 output: halves (alpha 0.5) and saturation (alpha 16).
    yield "int8_round_half", dict(a=a, b=b, c=None, in_type="int8", out_type="int8", compute="COMPUTE_32I",
                                  alpha=0.5, **tn)
    yield "int8_saturate", dict(a=a, b=b, c=None, in_type="int8", out_type="int8", compute="COMPUTE_32I",
                                alpha=16.0, **tn)
    yield "int8_to_int32", dict(a=sparse_int_matrix(rng, m, k, -128, 127),
                                b=rng.integers(-128, 128, (k, n)).astype(float),
                                c=None, in_type="int8", out_type="int32", compute="COMPUTE_32I", **tn)
    yield "int8_to_int32_alpha_half", dict(a=a, b=b, c=None, in_type="int8", out_type="int32", compute="COMPUTE_32I",
                                           alpha=0.5, **tn)
    yield "int8_to_fp16", dict(a=a, b=b, c=c, in_type="int8", out_type="float16", compute="COMPUTE_32I",
                               alpha=0.5, beta=0.25, bias=bias_m, **tn)
    yield "int8_alpha_vector", dict(a=a, b=b, c=None, in_type="int8", out_type="float16", compute="COMPUTE_32I",
                                    alpha_vector=np.concatenate([np.arange(1, m + 1) / 16, np.full(n, 100.0)]), **tn)
    yield "int8_bias_len", dict(a=a, b=b, c=None, in_type="int8", out_type="int32", compute="COMPUTE_32I",
                                bias=np.concatenate([bias_m, bias_n]), **tn)
    yield "e4m3_to_e4m3_saturate", dict(a=a, b=b, c=None, in_type="float8_e4m3fn", out_type="float8_e4m3fn",
                                        compute="COMPUTE_32F", alpha=64.0, **tn)
    yield "e4m3_to_bf16", dict(a=a, b=b, c=c, in_type="float8_e4m3fn", out_type="bfloat16", compute="COMPUTE_32F",
                               alpha=0.5, beta=0.5, **tn)
    yield "gelu_int8_fp16", dict(a=a, b=b, c=None, in_type="int8", out_type="float16", compute="COMPUTE_32I",
                                 alpha=1 / 8, gelu=True, **tn)
    yield "gelu_scaling_int8_fp16", dict(a=a, b=b, c=None, in_type="int8", out_type="float16",
                                         compute="COMPUTE_32I", alpha=1 / 8, gelu=True, gelu_scaling=2.0, **tn)
    yield "gelu_int8_int8", dict(a=a, b=b, c=None, in_type="int8", out_type="int8", compute="COMPUTE_32I",
                                 alpha=1 / 2, gelu=True, **tn)
    yield "gelu_int8_int8_bias_beta", dict(a=a, b=b, c=c, in_type="int8", out_type="int8", compute="COMPUTE_32I",
                                           alpha=1 / 2, beta=1.0, bias=bias_m, gelu=True, **tn)
    yield "gelu_scaling_int8_int8", dict(a=a, b=b, c=None, in_type="int8", out_type="int8", compute="COMPUTE_32I",
                                         alpha=1 / 2, gelu_scaling=3.0, **tn)
    yield "relu_int8_int8_bias_beta", dict(a=a, b=b, c=c, in_type="int8", out_type="int8", compute="COMPUTE_32I",
                                           alpha=1 / 2, beta=1.0, bias=bias_m, relu=True, relu_threshold=1.0, **tn)
    yield "gelu_scaling_int8_int32", dict(a=a, b=b, c=None, in_type="int8", out_type="int32",
                                          compute="COMPUTE_32I", alpha=1 / 8, gelu_scaling=64.0, **tn)
    yield "bf16_gelu", dict(a=a, b=b, c=None, in_type="bfloat16", out_type="bfloat16", compute="COMPUTE_32F",
                            alpha=1 / 8, gelu=True)
    yield "bf16_alpha_beta", dict(a=a, b=b, c=c, in_type="bfloat16", out_type="bfloat16", compute="COMPUTE_32F",
                                  alpha=0.5, beta=0.25, bias=bias_m)
    yield "fp16_col_b_relu", dict(a=a, b=b, c=c, in_type="float16", out_type="float16", compute="COMPUTE_32F",
                                  alpha=0.5, beta=0.25, bias=bias_m, relu=True, **tn)
    yield "e4m3_to_fp16_bias", dict(a=a, b=b, c=c, in_type="float8_e4m3fn", out_type="float16",
                                    compute="COMPUTE_32F", alpha=0.5, beta=0.25, bias=bias_m, **tn)
    yield "e4m3_to_fp32", dict(a=a, b=b, c=c, in_type="float8_e4m3fn", out_type="float32", compute="COMPUTE_32F",
                               alpha=0.5, beta=0.25, bias=bias_m, **tn)
    yield "e5m2_to_fp16", dict(a=a, b=b, c=None, in_type="float8_e5m2", out_type="float16", compute="COMPUTE_32F",
                               **tn)
    yield "int8_to_bf16", dict(a=a, b=b, c=c, in_type="int8", out_type="bfloat16", compute="COMPUTE_32I",
                               alpha=0.5, beta=0.25, bias=bias_m, **tn)
    yield "fp16_compute16f", dict(a=a, b=b, c=c, in_type="float16", out_type="float16", compute="COMPUTE_16F",
                                  alpha=0.5, beta=0.5)
    yield "fp32_row_row", dict(a=a, b=b, c=None, in_type="float32", out_type="float32", compute="COMPUTE_32F")
    yield "fp32_row_col", dict(a=a, b=b, c=None, in_type="float32", out_type="float32", compute="COMPUTE_32F", **tn)
    yield "int8_row_row", dict(a=a, b=b, c=None, in_type="int8", out_type="int32", compute="COMPUTE_32I")
    yield "e4m3_row_row", dict(a=a, b=b, c=None, in_type="float8_e4m3fn", out_type="float16", compute="COMPUTE_32F")


# Cases that have hung the process (FP32 inputs on 0.8.0): each runs in a child process with a time limit.
ISOLATED_PREFIX = "fp32_"
ISOLATED_TIMEOUT_S = 60


def _run_and_record(name: str, kw: dict) -> tuple[dict, dict]:
    record = {k: v for k, v in kw.items() if not isinstance(v, np.ndarray) and v is not None}
    arrays = {k: v for k, v in kw.items() if isinstance(v, np.ndarray)}
    if "bias" in arrays:
        record["bias_type"] = bias_type_for(kw["out_type"])
    try:
        arrays["d"] = run_case(**kw).astype(np.float64)
        record["status"] = "ok"
    except Exception as exc:  # which layouts and types the library refuses is a finding too
        record["status"] = f"{type(exc).__name__}: {exc}"
        if not hasattr(exc, "function"):
            record["traceback"] = traceback.format_exc()
    return record, arrays


def _run_isolated(name: str, kw: dict, outdir: str) -> tuple[dict, dict]:
    import subprocess

    tmp = os.path.join(outdir, f"_{name}.npz")
    try:
        subprocess.run([sys.executable, os.path.abspath(__file__), "--case", name, tmp],
                       timeout=ISOLATED_TIMEOUT_S, check=False)
    except subprocess.TimeoutExpired:
        record = {k: v for k, v in kw.items() if not isinstance(v, np.ndarray) and v is not None}
        record["status"] = f"hung: no result within {ISOLATED_TIMEOUT_S} s (child process killed)"
        return record, {}
    if not os.path.exists(tmp):
        return {"status": "child process died without a result"}, {}
    with np.load(tmp) as f:
        arrays = {k: f[k] for k in f.files if k != "record"}
        record = json.loads(str(f["record"]))
    os.remove(tmp)
    return record, arrays


def main(outdir: str) -> int:
    os.makedirs(outdir, exist_ok=True)
    summary = {}
    saved = {}
    for name, kw in cases(np.random.default_rng(20261124)):
        if name.startswith(ISOLATED_PREFIX):
            record, arrays = _run_isolated(name, kw, outdir)
        else:
            record, arrays = _run_and_record(name, kw)
        saved.update({f"{name}__{key}": value for key, value in arrays.items()})
        summary[name] = record
        print(f"{name:28s} {record['status'][:200]}")
        # Rewritten after every case, so a crash keeps what came before. One file for all cases: the GPU
        # machine returns only a few files.
        np.savez_compressed(os.path.join(outdir, "probe.npz"), **saved, summary=json.dumps(summary, default=str))
        with open(os.path.join(outdir, "probe_summary.json"), "w") as f:
            json.dump(summary, f, indent=1, default=str)
    return 0


def _child(name: str, path: str) -> int:
    for case_name, kw in cases(np.random.default_rng(20261124)):
        if case_name == name:
            record, arrays = _run_and_record(name, kw)
            np.savez(path, **arrays, record=json.dumps(record, default=str))
            return 0
    return 1


if __name__ == "__main__":
    if len(sys.argv) == 4 and sys.argv[1] == "--case":
        sys.exit(_child(sys.argv[2], sys.argv[3]))
    sys.exit(main(sys.argv[1] if len(sys.argv) > 1 else "probe_out"))
