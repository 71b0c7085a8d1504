"""Benchmarks: pycusparselt's 2:4 sparse GEMMs against dense cuBLAS and PyTorch, on a fixed set of shapes.

``python -m pycusparselt bench [--quick] [--dtypes fp16,bf16,int8,e4m3] [--shapes ...] [--json PATH]
[--markdown PATH] [--plot PATH]``

The package: ``pycusparselt.bench.cases`` (shapes, types, columns, goals), ``pycusparselt.bench.environment``
(the machine), ``pycusparselt.bench.inputs`` (a case's data on the GPU and the float64 product it is checked
against), ``pycusparselt.bench.runner`` (timing the columns of each case, in isolated processes) and
``pycusparselt.bench.report`` (summaries, targets, tables and the plot); the command line is here.

Every case is a linear layer ``y (M, N) = x (M, K) @ W (N, K).T`` with W pruned 2:4 along K, in the form
:class:`~pycusparselt.nn.linear.SparseLinear` uses (``SparseMatmulPlan(x, W.T, sparse="b")``: TN, valid for every
type). All columns of a case multiply the same inputs (random, W pruned once by cuSPARSELt): dense baselines
(``cupy.matmul``, cuBLAS ``gemmEx`` through CuPy, PyTorch's ``mm`` / ``_int_mm`` / ``_scaled_mm``), PyTorch's
``_cslt_sparse_mm`` (default and searched), and ours with the default configuration, after
``cusparseLtMatmulSearch``, after our timed tuner, and replayed in a CUDA graph. Each column's result is
compared once with a float64 product of the same inputs, and a column that disagrees is reported and left out
of every comparison, so a broken path cannot post a fast time. Times are medians of CUDA-event timings
(:func:`pycusparselt.tuning.timing.time_gpu`); eager columns include the host's launch cost wherever it exceeds the
GPU's time, which is what the graph column removes.

Our three stages (default, search, timed tuner) are what the tuner's targets compare, so they are measured
without an order: each stage has its own plan (tuned, then given its own compressed weight) and output, and
their eager columns are timed in alternation, one sample of each per round with the first rotated
(:func:`pycusparselt.tuning.timing.time_gpu_interleaved`), as are their graph columns. Timed one after another,
the later stage read slower from clock and thermal drift alone.

The functions that turn results into tables and targets (:func:`markdown_report`, :func:`targets`) need
neither a GPU nor CuPy; ``python benchmarks/tables.py gemm`` writes ``docs/benchmarks.md`` with them.
"""


from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Any

from .cases import (
    DENSE_COLUMNS,
    DTYPES,
    NOISE,
    QUICK_SHAPES,
    SHAPES,
    SPARSE_COLUMNS,
    Shape,
    gemm_flops,
    is_large,
    json_default,
    parse_dtypes,
    parse_shapes,
    throughput,
)
from .environment import environment
from .report import markdown_report, markdown_tables, plot, summarize, targets
from .runner import run_benchmark, worker

__all__ = [
    "Shape",
    "SHAPES",
    "QUICK_SHAPES",
    "DTYPES",
    "DENSE_COLUMNS",
    "SPARSE_COLUMNS",
    "NOISE",
    "parse_shapes",
    "parse_dtypes",
    "gemm_flops",
    "throughput",
    "is_large",
    "environment",
    "run_benchmark",
    "summarize",
    "targets",
    "markdown_tables",
    "markdown_report",
    "plot",
    "add_arguments",
    "cmd_bench",
    "main",
]


# -- command line ------------------------------------------------------------------------------------


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The ``bench`` subcommand's options."""
    parser.add_argument("--quick", action="store_true",
                        help="a few shapes and fewer repetitions, for development (under a minute)")
    parser.add_argument("--dtypes", default=",".join(DTYPES), help="comma-separated input types (default: all)")
    parser.add_argument("--shapes", default=None,
                        help="comma-separated: all, quick, square, bert, llm, shape names, or MxNxK "
                        "(default: all; --quick: quick)")
    parser.add_argument("--repeats", type=int, default=None, help="timed runs per column (default 20; quick 10)")
    parser.add_argument("--warmup", type=int, default=None, help="untimed calls first (default 5; quick 3)")
    parser.add_argument("--tune-budget", type=float, default=None,
                        help="seconds for the timed tuner per case (default 2; quick 1): the default config and the "
                        "search's choice are always timed, then as many algorithm ids as fit")
    parser.add_argument("--time-limit", type=float, default=None,
                        help="seconds after which no new case starts (the rest is recorded as not run)")
    parser.add_argument("--no-torch", action="store_true", help="leave out PyTorch's columns")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", metavar="PATH", help="write all results (raw medians) as JSON")
    parser.add_argument("--markdown", metavar="PATH", help="write the tables and targets as markdown")
    parser.add_argument("--plot", metavar="PATH", help="write a PNG plot of the speedups (needs matplotlib)")
    parser.add_argument("--host-overhead", metavar="PATH",
                        help="JSON written by benchmarks/host_overhead.py, included in the results and report")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar or lines")
    parser.add_argument("--in-process", action="store_true",
                        help="run every case in this process (by default worker processes run them, so that a "
                        "crash costs one column, not the run)")


def cmd_bench(args: argparse.Namespace) -> int:
    """Run the benchmark as the options say; print the tables and the targets."""
    try:
        shapes = parse_shapes(args.shapes or ("quick" if args.quick else "all"))
        dtypes = parse_dtypes(args.dtypes)
    except ValueError as exc:
        print(f"pycusparselt bench: {exc}", file=sys.stderr)
        return 2
    repeats = args.repeats if args.repeats is not None else (10 if args.quick else 20)
    warmup = args.warmup if args.warmup is not None else (3 if args.quick else 5)
    tune_budget = args.tune_budget if args.tune_budget is not None else (1.0 if args.quick else 2.0)
    host = None
    if args.host_overhead:
        try:
            with open(args.host_overhead, encoding="utf-8") as f:
                host = json.load(f)
        except (OSError, ValueError) as exc:  # a failed measurement must not cost the benchmark
            print(f"pycusparselt bench: --host-overhead not read ({exc}); going on without it", file=sys.stderr)
    def save(results: dict[str, Any]) -> None:
        if host is not None:
            results["host_overhead"] = host
        if args.json:  # rewritten after every case: a run cut short keeps what it measured
            tmp = f"{args.json}.tmp"
            with open(tmp, "w", encoding="utf-8") as f:
                json.dump(results, f, indent=1, default=json_default, allow_nan=False)
            os.replace(tmp, args.json)

    try:
        results = run_benchmark(shapes, dtypes, repeats=repeats, warmup=warmup, tune_budget=tune_budget,
                                use_torch=not args.no_torch, seed=args.seed, progress=not args.no_progress,
                                isolate=not args.in_process, checkpoint=save, time_limit=args.time_limit)
    except (RuntimeError, ValueError) as exc:
        print(f"pycusparselt bench: {exc}", file=sys.stderr)
        return 1
    save(results)
    plot_ref = None
    if args.plot:
        why = plot(results, args.plot)
        if why:
            print(f"no plot: {why}", file=sys.stderr)
        elif args.markdown:
            plot_ref = os.path.relpath(args.plot, os.path.dirname(os.path.abspath(args.markdown)))
    report = markdown_report(results, plot_path=plot_ref)
    if args.markdown:
        with open(args.markdown, "w", encoding="utf-8") as f:
            f.write(report)
    print(report)
    return 0


def main(argv: list[str] | None = None) -> int:
    """``python -m pycusparselt.bench``: the same as ``python -m pycusparselt bench``."""
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--worker"] and len(argv) == 2:
        return worker(argv[1])
    parser = argparse.ArgumentParser(prog="pycusparselt bench", description=__doc__.splitlines()[0])
    add_arguments(parser)
    return cmd_bench(parser.parse_args(argv))
