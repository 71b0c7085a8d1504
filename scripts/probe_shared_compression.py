"""Is cuSPARSELt's compressed form the same for every plan of one sparse matrix? An experiment for the GPU.

One weight is compressed once, by a plan with 64 dense rows under configuration 0. Then, for plans with other
dense shapes (``--rows``) and every configuration id of each, the product read from that one compressed weight
is compared, bit for bit, with the product read from the weight compressed by the plan itself; the compressed
sizes are compared too. Run it under compute-sanitizer with ``--no-pool`` (every buffer its own allocation, so
a read past one is caught)::

    compute-sanitizer --error-exitcode 3 python scripts/probe_shared_compression.py --no-pool --json out.json

Exit status 0 when every product matched and every size was equal (H200, 1024 x 512, rows 16 and 128: it
did; ``benchmarks/results/probe_shared_compression_h200_2026-11-29.json``). The package no longer relies on it:
larger problems sharing one compressed weight across dense shapes ended long runs with an illegal instruction,
so plans now accept only operands compressed for the same dense and output geometry
(``SparseMatmulPlan.compressed_key``) and refuse the shared operand this script passes. Run it against the
package at commit 65b057d, which accepted it.
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import ml_dtypes
import numpy as np


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dtypes", nargs="+", default=["fp16", "int8", "e4m3"])
    parser.add_argument("--out-features", type=int, default=2048)
    parser.add_argument("--in-features", type=int, default=1024)
    parser.add_argument("--rows", type=int, nargs="+", default=[16, 128, 384])
    parser.add_argument("--no-pool", action="store_true", help="CuPy allocates each buffer with cudaMalloc")
    parser.add_argument("--json", default=None)
    args = parser.parse_args(argv)
    import cupy as cp

    import pycusparselt as psl
    from pycusparselt import reference

    if args.no_pool:
        cp.cuda.set_allocator(None)
    rng = np.random.default_rng(0)
    shape = (args.out_features, args.in_features)
    results, failures, t0 = [], 0, time.perf_counter()
    for name in args.dtypes:
        if name == "fp16":
            w_h = reference.prune_2to4(rng.standard_normal(shape).astype(np.float16))
            make_x = lambda m: cp.asarray(rng.standard_normal((m, shape[1])).astype(np.float16))  # noqa: E731
            kw: dict = {}
        elif name == "int8":
            w_h = reference.prune_2to4(rng.integers(-127, 128, size=shape).astype(np.int8))
            make_x = lambda m: cp.asarray(rng.integers(-127, 128, size=(m, shape[1])).astype(np.int8))  # noqa: E731
            kw = {}
        else:
            w_h = reference.prune_2to4(rng.standard_normal(shape).astype(ml_dtypes.float8_e4m3fn)).view(np.uint8)
            make_x = lambda m: cp.asarray(  # noqa: E731
                rng.standard_normal((m, shape[1])).astype(ml_dtypes.float8_e4m3fn).view(np.uint8))
            kw = {"input_dtype": ml_dtypes.float8_e4m3fn, "out_dtype": np.float16}
        w = cp.asarray(w_h)
        with psl.SparseMatmulPlan(make_x(64), w.T, sparse="b", **kw) as first:
            shared = first.compress(w.T)
            for m in args.rows:
                x = make_x(m)
                with psl.SparseMatmulPlan(x, w.T, sparse="b", **kw) as plan:
                    for alg in range(plan.max_alg_id):
                        plan.config = alg
                        with plan.compress(w.T) as own:
                            a = cp.asnumpy(plan.matmul(x, own))
                            again = cp.asnumpy(plan.matmul(x, own))
                            b = cp.asnumpy(plan.matmul(x, shared))
                            cp.cuda.Device().synchronize()
                            same = bool(np.array_equal(a.view(np.uint8), b.view(np.uint8)))
                            # a configuration whose own products differ run to run (split-K reductions) says
                            # nothing about the compressed form: compared within its own spread instead
                            deterministic = bool(np.array_equal(a.view(np.uint8), again.view(np.uint8)))
                            spread = float(np.abs(a.astype(np.float64) - again.astype(np.float64)).max())
                            gap = float(np.abs(a.astype(np.float64) - b.astype(np.float64)).max())
                            sizes = (own.nbytes, shared.nbytes)
                        ok = (same or (not deterministic and gap <= 2 * spread)) and sizes[0] == sizes[1]
                        failures += not ok
                        results.append({"dtype": name, "rows": m, "alg_id": alg, "identical": same,
                                        "deterministic": deterministic, "spread": spread, "gap": gap,
                                        "own_bytes": sizes[0], "shared_bytes": sizes[1]})
                        if not same:
                            print(f"{'MISMATCH' if not ok else 'differs'} {name} rows {m} config {alg}: "
                                  f"deterministic={deterministic} spread={spread} gap={gap} sizes={sizes}", flush=True)
                    count = plan.max_alg_id
                print(f"{name} rows {m}: {count} configurations done ({time.perf_counter() - t0:.0f} s)", flush=True)
            shared.close()
    summary = {"shape": list(shape), "rows": args.rows, "no_pool": args.no_pool, "cases": len(results),
               "failures": failures, "device": cp.cuda.runtime.getDeviceProperties(0)["name"].decode(),
               "cusparselt": ".".join(map(str, psl.library_version())), "results": results}
    print(f"{len(results)} cases, {failures} mismatches, {time.perf_counter() - t0:.0f} s")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(summary, f, indent=1)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
