"""Quick GPU pass over SparseMatmulPlan's main paths, each checked against the NumPy reference.

Prints one line per case (ok, or the exception) and exits non-zero if any failed. The full suite is
tests/test_plan_gpu.py; this script is for a fast look during development: ``python scripts/plan_smoke.py``.
"""

from __future__ import annotations

import sys
import traceback

import cupy as cp
import ml_dtypes
import numpy as np

import pycusparselt as psl
from pycusparselt import reference as ref

rng = np.random.default_rng(0)
F16, BF16, I8 = np.float16, ml_dtypes.bfloat16, np.int8
E4M3 = ml_dtypes.float8_e4m3fn


def dev(x, order="C"):
    if x.dtype.itemsize == 1 and x.dtype != np.int8:  # float8: CuPy holds the bytes
        x = x.view(np.uint8)
    return cp.asarray(np.asfortranarray(x) if order == "F" else np.ascontiguousarray(x))


def vals(shape, dtype):
    if np.dtype(dtype) == np.int8:
        return rng.integers(-8, 8, shape).astype(np.int8)
    return (rng.standard_normal(shape)).astype(dtype)


def case(name, m, n, k, dtype, *, a_order="C", b_order="C", sparse="a", out_dtype=None, batch=None, c=False,
         beta=0.0, alpha=1.0, bias=False, activation=None, alpha_vector=False, compute=None, prune=None, **act):
    shape_a = ((batch,) if batch else ()) + (m, k)
    shape_b = ((batch,) if batch else ()) + (k, n)
    a_h, b_h = vals(shape_a, dtype), vals(shape_b, dtype)
    if prune is None and sparse == "a":
        a_h = ref.prune_2to4(a_h, axis=-1)
    elif prune is None:
        b_h = ref.prune_2to4(b_h, axis=-2)
    a_d, b_d = dev(a_h, a_order), dev(b_h, b_order)
    if batch and a_order == "F":
        a_d = cp.asarray(a_h.swapaxes(-1, -2).copy()).swapaxes(-1, -2)
    if batch and b_order == "F":
        b_d = cp.asarray(b_h.swapaxes(-1, -2).copy()).swapaxes(-1, -2)
    idt = dtype if np.dtype(dtype).itemsize == 1 and np.dtype(dtype) != np.int8 else None
    plan = psl.SparseMatmulPlan(a_d, b_d, None, sparse=sparse, out_dtype=out_dtype, bias=bias, activation=activation,
                                alpha_vector=alpha_vector, compute=compute, input_dtype=idt, **act) if not c else None
    od = np.dtype(out_dtype) if out_dtype is not None else (np.int32 if np.dtype(dtype) == np.int8 else
                                                           (np.float16 if np.dtype(dtype).itemsize == 1 else dtype))
    c_h = c_d = None
    if c:
        c_h = vals(((batch,) if batch else ()) + (m, n), od if od != np.int32 else np.int8).astype(od)
        c_d = dev(c_h)
        plan = psl.SparseMatmulPlan(a_d, b_d, c_d, sparse=sparse, out_dtype=out_dtype, bias=bias,
                                    activation=activation, alpha_vector=alpha_vector, compute=compute,
                                    input_dtype=idt, **act)
    bias_h = None
    if bias:
        length = m if sparse == "a" else n
        bias_h = vals((length,), psl.dtypes.bias_dtype(od))
    if alpha_vector:
        alpha = (rng.integers(1, 5, m) / 8).astype(np.float32)
    comp = plan.compress(a_d if sparse == "a" else b_d, prune=prune)
    if prune is not None:  # the reference multiplies what the GPU pruned
        pruned = cp.asnumpy(plan.prune(a_d if sparse == "a" else b_d, prune))
        if sparse == "a":
            a_h = pruned.view(a_h.dtype)
        else:
            b_h = pruned.view(b_h.dtype)
        print(f"      {name}: GPU-pruned nonzeros {np.count_nonzero(pruned)} of {pruned.size}")
    args = (comp, b_d) if sparse == "a" else (a_d, comp)
    d = plan.matmul(*args, c_d, alpha=cp.asarray(alpha) if alpha_vector else alpha, beta=beta,
                    bias=None if bias_h is None else cp.asarray(bias_h))
    got = cp.asnumpy(d)
    if sparse == "b":
        # reference: D^T = B^T A^T, bias per row of D^T
        desired = ref.matmul(b_h.swapaxes(-1, -2), a_h.swapaxes(-1, -2), None if c_h is None else c_h.swapaxes(-1, -2),
                             alpha=alpha, beta=beta, bias=bias_h, activation=activation, out_dtype=od, **act)
        ref.assert_close(got.swapaxes(-1, -2), desired, a=b_h.swapaxes(-1, -2), b=a_h.swapaxes(-1, -2),
                         c=None if c_h is None else c_h.swapaxes(-1, -2), alpha=alpha, beta=beta, bias=bias_h,
                         activation=activation, out_dtype=od, compute=compute, **act)
    else:
        desired = ref.matmul(a_h, b_h, c_h, alpha=alpha, beta=beta, bias=bias_h, activation=activation, out_dtype=od,
                             **act)
        ref.assert_close(got, desired, a=a_h, b=b_h, c=c_h, alpha=alpha, beta=beta, bias=bias_h,
                         activation=activation, out_dtype=od, compute=compute, **act)
    plan.close()


CASES = [
    ("fp16 row/row", dict(m=128, n=64, k=128, dtype=F16)),
    ("fp16 row/col", dict(m=128, n=64, k=128, dtype=F16, b_order="F")),
    ("fp16 col/row", dict(m=128, n=64, k=128, dtype=F16, a_order="F")),
    ("fp16 col/col", dict(m=128, n=64, k=128, dtype=F16, a_order="F", b_order="F")),
    ("fp16 sparse b", dict(m=64, n=128, k=128, dtype=F16, sparse="b")),
    ("fp16 padded 33x50x70", dict(m=33, n=50, k=72, dtype=F16)),
    ("fp16 padded K=68", dict(m=33, n=50, k=68, dtype=F16)),
    ("fp16 prune tile", dict(m=64, n=64, k=64, dtype=F16, prune="tile")),
    ("fp16 bias relu", dict(m=128, n=64, k=128, dtype=F16, bias=True, activation="relu", relu_threshold=0.5,
                            relu_upper_bound=4.0)),
    ("fp16 c beta", dict(m=128, n=64, k=128, dtype=F16, c=True, beta=0.5, alpha=2.0)),
    ("fp16 batch 3", dict(m=64, n=64, k=64, dtype=F16, batch=3)),
    ("fp16 compute 16F", dict(m=128, n=64, k=128, dtype=F16, compute="16F")),
    ("bf16", dict(m=128, n=64, k=128, dtype=BF16)),
    ("int8 TN -> int32", dict(m=128, n=64, k=128, dtype=I8, b_order="F")),
    ("int8 TN -> int8 gelu", dict(m=128, n=64, k=128, dtype=I8, b_order="F", out_dtype=I8, activation="gelu",
                                  alpha=0.25)),
    ("int8 alpha vector fp16", dict(m=128, n=64, k=128, dtype=I8, b_order="F", out_dtype=F16, alpha_vector=True)),
    ("int8 sparse b", dict(m=64, n=128, k=128, dtype=I8, sparse="b", a_order="C", b_order="F")),
    ("int8 padded", dict(m=40, n=24, k=96, dtype=I8, b_order="F")),
    ("e4m3 -> bf16", dict(m=128, n=64, k=128, dtype=E4M3, b_order="F", out_dtype=BF16)),
    ("fp32 TN (library prune)", dict(m=64, n=32, k=64, dtype=np.float32, b_order="F", prune="strip")),
    ("e5m2 -> fp16 sparse b", dict(m=64, n=128, k=64, dtype=ml_dtypes.float8_e5m2, sparse="b", b_order="F")),
]


def debug_batch() -> None:
    """Which batches of a batched product are wrong, and how big the compressed operand is."""
    from pycusparselt import bindings as bd

    a_h = ref.prune_2to4(vals((3, 64, 64), F16))
    b_h = vals((3, 64, 64), F16)
    a_d, b_d = cp.asarray(a_h), cp.asarray(b_h)
    with psl.SparseMatmulPlan(a_d, b_d) as plan:
        ca = plan.compress(a_d)
        size2 = bd.spmma_compressed_size2(plan._handle.raw, plan._s_desc)
        size1 = bd.spmma_compressed_size(plan._handle.raw, plan._plan)
        d = plan.matmul(ca, b_d).get().astype(float)
        want = (a_h.astype(float) @ b_h.astype(float))
        bad = [int(np.abs(d[i] - want[i]).max() > 0.1) for i in range(3)]
        # plan-based compress instead of the descriptor-only one
        buf = cp.empty(size1[0], cp.uint8)
        scratch = cp.empty(max(size1[1], 1), cp.uint8)
        bd.spmma_compress(plan._handle.raw, plan._plan, a_d.data.ptr, buf.data.ptr, scratch.data.ptr, 0)
        ca._buffer = buf
        d1 = plan.matmul(ca, b_d).get().astype(float)
        bad1 = [int(np.abs(d1[i] - want[i]).max() > 0.1) for i in range(3)]
        # one batch compressed alone, at offset 0
        print(f"debug batch: compressed size2 {size2}, size (plan) {size1}, single matrix "
              f"{ref.compressed_nbytes((64, 64), F16)}; wrong batches (Compress2) {bad}, (Compress) {bad1}")


def main() -> int:
    try:
        debug_batch()
    except Exception as exc:
        print(f"debug batch failed: {type(exc).__name__}: {exc}")
    failed = 0
    for name, kw in CASES:
        try:
            case(name, **kw)
            print(f"ok    {name}")
        except Exception as exc:
            failed += 1
            print(f"FAIL  {name}: {type(exc).__name__}: {str(exc)[:300]}")
            traceback.print_exc(limit=3, file=sys.stdout)
    # autotune, config, one-shot
    try:
        a = cp.asarray(ref.prune_2to4(vals((256, 256), F16)))
        b = cp.asarray(vals((256, 128), F16))
        with psl.SparseMatmulPlan(a, b) as plan:
            ca = plan.compress(a)
            d0 = plan.matmul(ca, b).get()
            cfg = plan.autotune(ca, b)
            d1 = plan.matmul(ca, b).get()
            plan.config = psl.PlanConfig((cfg.alg_id + 1) % plan.max_alg_id)
            d2 = plan.matmul(ca, b).get()
            assert np.array_equal(d0, d1) or np.abs(d0.astype(float) - d1).max() < 0.05, "autotune changed results"
            assert np.abs(d0.astype(float) - d2).max() < 0.05
            print(f"ok    autotune -> {cfg}, max_alg_id {plan.max_alg_id}, workspace {plan.workspace_size}")
        d3 = psl.matmul(a, b).get()
        d4 = psl.matmul(a, b).get()
        assert np.array_equal(d3, d4) and psl.plan_cache_info().hits == 1, psl.plan_cache_info()
        x = cp.asarray(vals((256, 256), F16))
        with psl.SparseMatmulPlan(x, b) as plan:
            pruned = plan.prune(x).get()
            assert np.array_equal(pruned, ref.prune_2to4(x.get())), "prune differs from the reference"
            assert plan.is_2to4(pruned) and not plan.is_2to4(x)
            try:
                plan.compress(x)
                raise AssertionError("compress of non-2:4 data did not raise")
            except ValueError:
                pass
        print("ok    one-shot matmul, cache, prune, is_2to4, compress check")
    except Exception as exc:
        failed += 1
        print(f"FAIL  extras: {type(exc).__name__}: {exc}")
        traceback.print_exc(limit=4, file=sys.stdout)
    print(f"{len(CASES) + 1 - failed} passed, {failed} failed")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
