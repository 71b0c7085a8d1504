"""Probe the tuner's building blocks on a GPU: the library search's choice as read back, against the plan it
leaves behind; every candidate's time; split-K settings the library accepts. Prints one JSON line per case.

    python -P scripts/probe_tuner.py
"""

from __future__ import annotations

import json

import cupy as cp
import ml_dtypes
import numpy as np

import pycusparselt as psl
from pycusparselt.tuning.timing import time_gpu

CASES = [("float16", 4096, 4096, 4096), ("float16", 16384, 1024, 4096), ("e4m3", 4096, 4096, 4096),
         ("int8", 2048, 11008, 4096), ("float16", 128, 4096, 4096)]


def operands(kind: str, m: int, n: int, k: int):
    if kind == "float16":
        x = cp.random.standard_normal((m, k), dtype=cp.float32).astype(cp.float16)
        w = cp.random.standard_normal((n, k), dtype=cp.float32).astype(cp.float16)
        return x, w, {}
    if kind == "int8":
        x = cp.random.randint(-8, 8, (m, k), dtype=cp.int8)
        w = cp.random.randint(-8, 8, (n, k), dtype=cp.int8)
        return x, w, {"out_dtype": np.int32}
    host = np.random.default_rng(0).standard_normal((m + n, k)).astype(ml_dtypes.float8_e4m3fn).view(np.uint8)
    both = cp.asarray(host)
    return both[:m], both[m:], {"input_dtype": ml_dtypes.float8_e4m3fn, "out_dtype": ml_dtypes.bfloat16}


def probe(kind: str, m: int, n: int, k: int) -> None:
    x, w, kwargs = operands(kind, m, n, k)
    with psl.SparseMatmulPlan(x, w.T, sparse="b", **kwargs) as plan:
        held = {"cw": plan.compress(w.T, prune="strip")}
        out = plan.matmul(x, held["cw"])

        def time_now(recompress: bool = False) -> float:
            if recompress:  # after a configuration change the compressed form may differ
                held["cw"].close()
                held["cw"] = plan.compress(w.T, prune="strip")
            cw = held["cw"]
            return time_gpu(lambda i: plan.matmul(x, cw, out=out), repeats=20, warmup=5).median_ms

        default_ms = time_now()
        plan.autotune(x, held["cw"], out=out, method="search")
        search_as_is = time_now()
        readback = plan.config
        plan.config = readback
        search_reapplied = time_now(recompress=True)
        plan.config = plan.default_config
        plan.autotune(x, held["cw"], out=out, cache=False)
        report = plan.tuning_report
        tuned_ms = time_now(recompress=True)
        print(json.dumps({
            "case": [kind, m, n, k], "default_config": list(plan.default_config), "default_ms": default_ms,
            "search_readback": list(readback), "search_as_is_ms": search_as_is,
            "search_reapplied_ms": search_reapplied, "tuned": list(report.best), "tuned_ms": tuned_ms,
            "tuning_s": report.seconds, "max_alg_id": plan.max_alg_id,
            "candidates": [[c.source, list(c.config), c.median_ms, c.error, c.setup_ms] for c in report.candidates],
        }), flush=True)
        held["cw"].close()


def main() -> None:
    for case in CASES:
        probe(*case)


if __name__ == "__main__":
    main()
