"""A BERT-large feed-forward block (1024 -> 4096 -> 1024, ReLU instead of GELU) with SparseLinear vs dense CuPy.

For each batch size (sequence length 384), the block ``y = relu(x @ W1.T + b1) @ W2.T + b2`` runs three ways
on the GPU: dense CuPy with the original weights, dense CuPy with the 2:4-pruned weights, and SparseLinear
with the same pruned weights. Times are CUDA-event medians; the sparse output is compared with the dense
output of the same pruned weights (they must agree to FP16 accuracy). ``benchmarks/bench_bert_ffn.py`` times a
stack of such blocks in FP16, INT8 and FP8, sparse and dense.

Needs a GPU: ``python examples/bert_ffn.py [--batches 1 8] [--repeat 30]``.
"""

from __future__ import annotations

import argparse

import pycusparselt as psl

psl.require_gpu(exit=True)  # one line instead of a CUDA traceback where no GPU is usable

import cupy as cp  # noqa: E402
import numpy as np  # noqa: E402


HIDDEN, FFN, SEQ = 1024, 4096, 384


def median_ms(fn, repeat: int) -> float:
    fn()  # warm-up (plans, tuning, kernel loading)
    start, stop = cp.cuda.Event(), cp.cuda.Event()
    times = []
    for _ in range(repeat):
        start.record()
        fn()
        stop.record()
        stop.synchronize()
        times.append(cp.cuda.get_elapsed_time(start, stop))
    return float(np.median(times))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--repeat", type=int, default=30)
    parser.add_argument("--tune-budget", type=float, default=5.0, help="seconds of timed tuning per plan")
    args = parser.parse_args()

    rng = cp.random.default_rng(0)
    w1 = (rng.standard_normal((FFN, HIDDEN), dtype=cp.float32) / HIDDEN**0.5).astype(cp.float16)
    w2 = (rng.standard_normal((HIDDEN, FFN), dtype=cp.float32) / FFN**0.5).astype(cp.float16)
    b1 = (0.1 * rng.standard_normal(FFN, dtype=cp.float32)).astype(cp.float16)
    b2 = (0.1 * rng.standard_normal(HIDDEN, dtype=cp.float32)).astype(cp.float16)

    tune = {"budget_s": args.tune_budget}
    fc1 = psl.SparseLinear(w1, b1, activation="relu", autotune=tune)
    fc2 = psl.SparseLinear(w2, b2, autotune=tune)
    p1, p2 = fc1.weight, fc2.weight  # pruned when the layers are made: the weights they multiply by

    def dense(x, a, b, c, d):
        return cp.maximum(x @ a.T + b, 0) @ c.T + d

    print(f"BERT-large FFN block {HIDDEN} -> {FFN} -> {HIDDEN}, sequence {SEQ}, FP16, {cp.cuda.Device().id}: "
          f"{cp.cuda.runtime.getDeviceProperties(0)['name'].decode()}")
    print(f"{'batch':>5} {'tokens':>7} {'dense ms':>9} {'dense 2:4 ms':>13} {'sparse ms':>10} {'speedup':>8} "
          f"{'max |diff|':>11}")
    for batch in args.batches:
        x = rng.standard_normal((batch * SEQ, HIDDEN), dtype=cp.float32).astype(cp.float16)
        t_dense = median_ms(lambda x=x: dense(x, w1, b1, w2, b2), args.repeat)
        t_pruned = median_ms(lambda x=x: dense(x, p1, b1, p2, b2), args.repeat)
        t_sparse = median_ms(lambda x=x: fc2(fc1(x)), args.repeat)
        diff = float(cp.abs(fc2(fc1(x)).astype(cp.float32) - dense(x, p1, b1, p2, b2).astype(cp.float32)).max())
        print(f"{batch:>5} {batch * SEQ:>7} {t_dense:>9.3f} {t_pruned:>13.3f} {t_sparse:>10.3f} "
              f"{t_dense / t_sparse:>7.2f}x {diff:>11.4f}")
        assert diff < 0.05, "the sparse block disagrees with the dense block of the same pruned weights"


if __name__ == "__main__":
    main()
