"""Tune a 2:4 sparse GEMM, compress for the tuned plan, then run it through a bound call and a CUDA graph.

    python examples/tuned_graph.py [--m 4096 --n 4096 --k 4096]

Prints the tuner's report (default, library search, winner), checks the three ways of running the product
agree with a dense product of the pruned weight, and times them with CUDA events.
"""

from __future__ import annotations

import argparse

import pycusparselt as psl

psl.require_gpu(exit=True)  # one line instead of a CUDA traceback where no GPU is usable

import cupy as cp  # noqa: E402

from pycusparselt.tuning.timing import time_gpu  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--m", type=int, default=4096)
    parser.add_argument("--n", type=int, default=4096)
    parser.add_argument("--k", type=int, default=4096)
    args = parser.parse_args()
    w = cp.random.standard_normal((args.n, args.k), dtype=cp.float32).astype(cp.float16)  # weights (out, in)
    x = cp.random.standard_normal((args.m, args.k), dtype=cp.float32).astype(cp.float16)  # activations
    y = cp.empty((args.m, args.n), dtype=cp.float16)

    with psl.SparseMatmulPlan(x, w.T, sparse="b") as plan:  # y = x @ W.T with W 2:4 along its inputs
        plan.autotune(x, w.T, out=y)  # on the dense weight: tune first (cached on disk for the next run)
        report = plan.tuning_report
        if report.source == "cache":
            print(f"tuned configuration from the cache: {report.best}")
        else:
            print(f"tuner: {len(report.candidates)} candidates in {report.seconds:.1f} s; default "
                  f"{report.time_of('default'):.4f} ms, library search {report.time_of('search'):.4f} ms, "
                  f"kept {report.best} at {report.best_ms:.4f} ms")
        wc = plan.compress(w.T, prune="strip")  # for the tuned configuration
        pruned = plan.prune(w.T).T

        eager = plan.matmul(x, wc, out=y).copy()
        run = plan.bind(x, wc, out=y)
        bound = run().copy()
        stream = cp.cuda.Stream(non_blocking=True)
        with stream:
            run_on_stream = plan.bind(x, wc, out=y, stream=stream)
            run_on_stream()
            stream.begin_capture()
            for _ in range(10):
                run_on_stream()
            graph = stream.end_capture()
            graph.launch(stream)
            stream.synchronize()
        replayed = y.copy()

        ref = x.astype(cp.float32) @ pruned.astype(cp.float32).T
        for name, got in (("matmul", eager), ("bound call", bound), ("graph replay", replayed)):
            err = float(cp.linalg.norm(got.astype(cp.float32) - ref) / cp.linalg.norm(ref))
            assert err < 1e-3, (name, err)
            print(f"{name:12s}: relative error {err:.2e}")

        t_matmul = time_gpu(lambda i: plan.matmul(x, wc, out=y), repeats=20).median_ms
        t_bound = time_gpu(lambda i: run(), repeats=20).median_ms
        t_graph = time_gpu(lambda i: graph.launch(stream), repeats=20, stream=stream).median_ms / 10
        print(f"per GEMM: matmul {t_matmul:.4f} ms, bound call {t_bound:.4f} ms, graph replay {t_graph:.4f} ms")
        wc.close()


if __name__ == "__main__":
    main()
