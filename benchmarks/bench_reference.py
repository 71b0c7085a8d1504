"""Time the NumPy reference's pruning and compression on the CPU.

Usage::

    python benchmarks/bench_reference.py [--size 4096] [--repeat 5] [--dtypes float16,bfloat16,int8]
                                         [--json results.json]

Prints one row per (dtype, operation): the median and the minimum of ``--repeat`` runs
(``time.perf_counter``), and the throughput in dense elements per second.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from typing import Callable

import ml_dtypes
import numpy as np

from pycusparselt import reference as ref

DTYPES = {
    "float16": np.dtype(np.float16),
    "bfloat16": np.dtype(ml_dtypes.bfloat16),
    "float32": np.dtype(np.float32),
    "int8": np.dtype(np.int8),
    "float8_e4m3fn": np.dtype(ml_dtypes.float8_e4m3fn),
    "float8_e5m2": np.dtype(ml_dtypes.float8_e5m2),
}


def _matrix(size: int, dtype: np.dtype, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    if dtype == np.int8:
        return rng.integers(-128, 128, (size, size)).astype(np.int8)
    return rng.standard_normal((size, size), dtype=np.float32).astype(dtype)


def _time(fn: Callable[[], object], repeat: int) -> list[float]:
    fn()  # warm-up: first-touch page faults, lazy imports
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return times


def run(size: int, repeat: int, dtypes: list[str]) -> list[dict]:
    rows = []
    for name in dtypes:
        dt = DTYPES[name]
        dense = _matrix(size, dt)
        pruned = ref.prune_2to4(dense)
        values, indices = ref.compress(pruned)
        ops: dict[str, Callable[[], object]] = {
            "prune strip": lambda d=dense: ref.prune_2to4(d, method="strip"),
            "prune tile": lambda d=dense: ref.prune_2to4(d, method="tile"),
            "is_2to4": lambda p=pruned: ref.is_2to4(p),
            "compress": lambda p=pruned: ref.compress(p),
            "decompress": lambda v=values, i=indices: ref.decompress(v, i),
        }
        for op, fn in ops.items():
            times = _time(fn, repeat)
            med = statistics.median(times)
            rows.append({"dtype": name, "op": op, "shape": [size, size], "repeat": repeat,
                         "median_s": med, "min_s": min(times),
                         "elements_per_s": size * size / med})
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=4096, help="square matrix size (default 4096)")
    parser.add_argument("--repeat", type=int, default=5, help="timed runs per case (default 5)")
    parser.add_argument("--dtypes", default="float16,bfloat16,int8",
                        help="comma-separated: " + ", ".join(DTYPES))
    parser.add_argument("--json", metavar="PATH", help="also write the results as JSON")
    args = parser.parse_args(argv)
    names = [d.strip() for d in args.dtypes.split(",") if d.strip()]
    unknown = [d for d in names if d not in DTYPES]
    if unknown:
        parser.error(f"unknown dtype(s) {unknown}; choose from {', '.join(DTYPES)}")
    if args.size <= 0 or args.size % 4:
        parser.error("--size must be a positive multiple of 4")

    rows = run(args.size, args.repeat, names)
    machine = {
        "python": platform.python_version(),
        "numpy": np.__version__,
        "ml_dtypes": ml_dtypes.__version__,
        "machine": platform.machine(),
        "processor": platform.processor() or platform.machine(),
        "cpus": os.cpu_count(),
    }
    print(f"reference on the CPU: {args.size}x{args.size}, median of {args.repeat} "
          f"(NumPy {machine['numpy']}, {machine['cpus']} CPUs, {machine['machine']})")
    print(f"{'dtype':<14}{'operation':<14}{'median ms':>11}{'min ms':>9}{'Melem/s':>10}")
    for r in rows:
        print(f"{r['dtype']:<14}{r['op']:<14}{r['median_s'] * 1e3:>11.1f}{r['min_s'] * 1e3:>9.1f}"
              f"{r['elements_per_s'] / 1e6:>10.0f}")
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump({"machine": machine, "results": rows}, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
