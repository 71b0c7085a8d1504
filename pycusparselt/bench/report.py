"""What a benchmark's results say (no GPU needed): per-case summaries, the targets and whether they are
met, markdown tables and reports, and the plot."""

from __future__ import annotations

import statistics
from typing import Any

import numpy as np
from .cases import DENSE_COLUMNS, DTYPES, GOALS, HOST_OVERHEAD_GOAL_US, NOISE, throughput


# -- summaries and targets (no GPU needed) ---------------------------------------------------------


def _ms(column: dict | None) -> float | None:
    """A column's median if it ran and agreed with the reference, else None."""
    if not column or "median_ms" not in column or column.get("ok") is False:
        return None
    return float(column["median_ms"])


def summarize(case: dict[str, Any]) -> dict[str, Any]:
    """Derived figures of one case: best dense, our headline column, speedups, TFLOP/s, host-bound flag.

    Only columns that ran and agreed with the reference count. Our headline is the timed tuner's eager column,
    else the search's, else the default's.
    """
    columns = case.get("columns", {})
    dense = {key: _ms(columns.get(key)) for key in DENSE_COLUMNS}
    dense = {key: ms for key, ms in dense.items() if ms is not None}
    best_key = min(dense, key=dense.get) if dense else None
    ours_key = next((f"ours_{s}" for s in ("timed", "search", "default") if _ms(columns.get(f"ours_{s}"))), None)
    ours = _ms(columns.get(ours_key)) if ours_key else None
    graph = _ms(columns.get(f"{ours_key}_graph")) if ours_key else None
    cslt = [ms for ms in (_ms(columns.get("cslt_default")), _ms(columns.get("cslt_search"))) if ms is not None]
    m, n, k = case["m"], case["n"], case["k"]
    best = dense.get(best_key) if best_key else None

    def ratio(a: float | None, b: float | None) -> float | None:
        return a / b if a is not None and b is not None and b > 0 else None

    failed = sorted(key for key, col in columns.items() if col.get("ok") is False)
    return {
        "best_dense": best_key,
        "best_dense_ms": best,
        "ours": ours_key,
        "ours_ms": ours,
        "ours_graph_ms": graph,
        "cslt_best_ms": min(cslt) if cslt else None,
        "speedup": ratio(best, ours),
        "vs_cslt": ratio(min(cslt) if cslt else None, ours),
        "tflops": throughput(m, n, k, ours) if ours else None,
        "tflops_graph": throughput(m, n, k, graph) if graph else None,
        # the GPU finishes a replayed GEMM in under half the eager time: the eager figure is host time
        "host_bound": bool(graph is not None and ours is not None and graph < 0.5 * ours),
        "failed_checks": failed,
    }


def _tuner_times(case: dict) -> tuple[dict[str, float | None], str]:
    """Per-config times for the tuner comparison: graph replays (GPU time alone) when all three exist, else
    the eager columns."""
    columns = case.get("columns", {})
    graph = {s: _ms(columns.get(f"ours_{s}_graph")) for s in ("default", "search", "timed")}
    if all(v is not None for v in graph.values()):
        return graph, "graph"
    return {s: _ms(columns.get(f"ours_{s}")) for s in ("default", "search", "timed")}, "eager"


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}{'' if n == 1 else 's'}"


def _fmt_x(value: float | None) -> str:
    if value is None:
        return "n/a"
    return f"{value:.0f}x" if value >= 100 else f"{value:.2f}x"


def _fmt_time(ms: float) -> str:
    """Three significant digits (trailing zeros kept: 1.00, 0.180), whole numbers from 100 on."""
    return f"{ms:#.3g}" if ms < 100 else f"{ms:.0f}"


def _case_label(case: dict) -> str:
    return f"{case['dtype']} {case['shape']}"


def targets(results: dict[str, Any], noise: float = NOISE) -> list[dict[str, Any]]:
    """The project's speed targets, judged on ``results`` (and ``results["host_overhead"]`` when present).

    Returns one dict per target: ``target``, ``goal``, ``measured`` (text), ``met`` (True, False or None when
    it could not be judged) and ``details`` (the cases that missed, with their figures).
    """
    # summaries recomputed from the raw medians, never read back from the file
    cases = [dict(c, derived=summarize(c)) for c in results.get("cases", []) if "error" not in c]
    rows: list[dict[str, Any]] = []

    for dtype, goal in GOALS.items():
        large = [c for c in cases if c["dtype"] == dtype and c.get("large")]
        speedups = [(c, c["derived"]["speedup"]) for c in large if c["derived"]["speedup"] is not None]
        what = "best dense int8 GEMM" if dtype == "int8" else "best dense GEMM"
        row = {"target": f"{dtype}: median speedup over the {what}, large shapes", "goal": f">= {goal:.2f}x"}
        if not speedups:
            row.update(measured="n/a (no large case measured)", met=None, details=[])
        else:
            median = statistics.median(s for _, s in speedups)
            below = [f"{_case_label(c)}: {s:.2f}x" for c, s in speedups if s < goal]
            row.update(
                measured=f"{median:.2f}x over {_count(len(speedups), 'shape')} "
                f"(range {min(s for _, s in speedups):.2f}x - {max(s for _, s in speedups):.2f}x)",
                met=median >= goal,
                details=[f"{len(below)} of {len(speedups)} shapes below {goal:.2f}x: " + "; ".join(below)]
                if below else [],
            )
        rows.append(row)

    for other in ("default", "search"):
        judged, late, kinds = 0, [], set()
        for case in cases:
            times, kind = _tuner_times(case)
            if times["timed"] is None or times[other] is None:
                continue
            judged += 1
            kinds.add(kind)
            if times["timed"] > times[other] * (1 + noise):
                late.append(f"{_case_label(case)}: tuned {times['timed']:.4g} ms vs {other} {times[other]:.4g} ms "
                            f"({times['timed'] / times[other]:.3f}x, {kind})")
        label = "the default config" if other == "default" else "cusparseLtMatmulSearch"
        row = {"target": f"timed tuner never slower than {label}",
               "goal": f"0 cases slower by more than {noise:.0%} (timing noise)"}
        if not judged:
            row.update(measured="n/a (the timed tuner did not run)", met=None, details=[])
        else:
            row.update(measured=f"{len(late)} of {_count(judged, 'case')} slower (compared on "
                       f"{' and '.join(sorted(kinds))} times)", met=not late, details=late)
        rows.append(row)

    slower = []
    judged = 0
    for case in cases:
        d = case["derived"]
        if d["vs_cslt"] is None:
            continue
        judged += 1
        if d["vs_cslt"] <= 1.0:
            slower.append(f"{_case_label(case)}: ours {d['ours_ms']:.4g} ms vs {d['cslt_best_ms']:.4g} ms")
    row = {"target": "faster than torch._cslt_sparse_mm (its better of default and searched) on every case",
           "goal": "0 cases slower"}
    if not judged:
        row.update(measured="n/a (PyTorch's cuSPARSELt did not run)", met=None, details=[])
    else:
        ratios = [c["derived"]["vs_cslt"] for c in cases if c["derived"]["vs_cslt"] is not None]
        row.update(measured=f"{len(slower)} of {_count(judged, 'case')} slower; median advantage "
                   f"{statistics.median(ratios):.2f}x", met=not slower, details=slower)
    rows.append(row)

    failed = [f"{_case_label(c)}: {', '.join(c['derived']['failed_checks'])}" for c in cases
              if c["derived"]["failed_checks"]]
    rows.append({"target": "every column agrees with the float64 reference", "goal": "0 failed checks",
                 "measured": f"{_count(len(failed), 'case')} with a failed check", "met": not failed,
                 "details": failed})

    rows += _host_targets(results.get("host_overhead"))
    return rows


def _host_targets(host: dict | None) -> list[dict[str, Any]]:
    if not host or not host.get("problems"):
        return [{"target": "host time per call within 3 us of the C library's own", "goal": "<= 3 us",
                 "measured": "n/a (no host-overhead measurement)", "met": None, "details": []}]
    rows = []
    for key, label in (("py_matmul_host_us", "plan.matmul"), ("py_bind_host_us", "plan.bind(...)()")):
        diffs = [(p, p[key] - p["c_host_us"]) for p in host["problems"]
                 if p.get(key) is not None and p.get("c_host_us") is not None]
        row = {"target": f"host time per call of {label} within {HOST_OVERHEAD_GOAL_US:g} us of the C loop",
               "goal": f"<= {HOST_OVERHEAD_GOAL_US:g} us"}
        if not diffs:
            why = host.get("c_reason") or "not measured"
            row.update(measured=f"n/a ({why})", met=None, details=[])
        else:
            worst = max(d for _, d in diffs)
            row.update(
                measured=f"{worst:+.1f} us at worst (" + "; ".join(
                    f"{p['m']}x{p['n']}x{p['k']}: {p[key]:.1f} vs {p['c_host_us']:.1f} us" for p, _ in diffs) + ")",
                met=worst <= HOST_OVERHEAD_GOAL_US,
                details=[],
            )
        rows.append(row)
    smallest = min(host["problems"], key=lambda p: p["m"] * p["n"] * p["k"])
    graph, eager = smallest.get("graph_gpu_us"), smallest.get("py_matmul_gpu_us")
    row = {"target": "CUDA graph replay removes the host overhead (smallest problem)",
           "goal": "replayed GEMM faster than the host time per eager call"}
    host_us = smallest.get("c_host_us") or smallest.get("py_matmul_host_us")
    if graph is None or host_us is None:
        row.update(measured="n/a", met=None, details=[])
    else:
        eager_text = f", eager {eager:.1f} us of GPU time per call" if eager is not None else ""
        row.update(measured=f"{smallest['m']}x{smallest['n']}x{smallest['k']}: graph {graph:.1f} us per GEMM vs "
                   f"host {host_us:.1f} us per call{eager_text}", met=graph < host_us, details=[])
    rows.append(row)
    return rows


# -- markdown and plot -----------------------------------------------------------------------------


def _fmt_ms(column: dict | None) -> str:
    if not column:
        return "-"
    if "na" in column:
        return "n/a"
    text = _fmt_time(column["median_ms"])
    return text if column.get("ok", True) else f"{text} (wrong result)"


def _fmt_num(value: float | None, spec: str = ".3g") -> str:
    return "n/a" if value is None else format(value, spec)


def markdown_tables(results: dict[str, Any]) -> str:
    """One markdown table per input type: milliseconds per GEMM (medians), our TFLOP/s and speedups."""
    lines: list[str] = []
    cases = results.get("cases", [])
    for dtype in DTYPES:
        rows = [c for c in cases if c["dtype"] == dtype]
        if not rows:
            continue
        unit = "TOPS" if dtype == "int8" else "TFLOP/s"
        lines += [
            f"### {dtype} -> {DTYPES[dtype]}",
            "",
            f"| shape | M x N x K | best dense (ms) | cslt default / searched (ms) | ours default | ours search "
            f"| ours tuned | ours graph | tuned {unit} | speedup | vs cslt |",
            "|---|---|---|---|---|---|---|---|---|---|---|",
        ]
        for case in rows:
            if "error" in case:
                error = case["error"] if case["error"].startswith("not run") else f"case failed: {case['error']}"
                cells = [case["shape"], f"{case['m']} x {case['n']} x {case['k']}", error]
                lines.append("| " + " | ".join(cells + [""] * 8) + " |")
                continue
            d = summarize(case)
            col = case["columns"]
            dense = f"{_fmt_time(d['best_dense_ms'])} ({DENSE_COLUMNS[d['best_dense']]})" if d["best_dense"] else "n/a"
            mark = " *" if d["host_bound"] else ""
            graph = col.get((d["ours"] or "ours_timed") + "_graph")
            lines.append(
                f"| {case['shape']} | {case['m']} x {case['n']} x {case['k']} | {dense} | "
                f"{_fmt_ms(col.get('cslt_default'))} / {_fmt_ms(col.get('cslt_search'))} | "
                f"{_fmt_ms(col.get('ours_default'))} | {_fmt_ms(col.get('ours_search'))} | "
                f"{_fmt_ms(col.get('ours_timed'))}{mark} | {_fmt_ms(graph)} | "
                f"{_fmt_num(d['tflops'], '.0f')} | {_fmt_x(d['speedup'])} | "
                f"{_fmt_x(d['vs_cslt'])} |"
            )
        lines.append("")
    return "\n".join(lines)


def _na_reasons(results: dict[str, Any]) -> list[str]:
    """Each distinct reason a column did not run, with the columns and how many cases."""
    seen: dict[tuple[str, str], int] = {}
    for case in results.get("cases", []):
        for key, column in case.get("columns", {}).items():
            if "na" in column:
                seen[(key, column["na"])] = seen.get((key, column["na"]), 0) + 1
    return [f"`{key}` ({_count(count, 'case')}): {reason}" for (key, reason), count in sorted(seen.items())]


def _env_line(env: dict[str, Any]) -> str:
    parts = [
        f"{env.get('device', '?')} (SM {env.get('sm', '?')})",
        f"driver {env.get('driver') or '?'}",
        f"CUDA runtime {env.get('cuda_runtime', '?')}",
        f"cuSPARSELt {env.get('cusparselt', '?')}",
        f"CuPy {env.get('cupy') or '?'}",
        f"PyTorch {env.get('torch') or 'absent'}",
        f"pycusparselt {env.get('pycusparselt', '?')}",
    ]
    return ", ".join(parts) + f"; {env.get('date', '?')}"


def _host_table(host: dict[str, Any]) -> list[str]:
    lines = [
        "| problem (M x N x K, fp16) | C loop host (us/call) | plan.matmul host | plan.bind()() host | "
        "bind()() host, ABI call | bindings.matmul host | matmul - C | bind - C | GPU per call, eager | "
        "GPU per GEMM, graph |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    def us(p: dict, key: str) -> str:
        return _fmt_num(p.get(key), ".1f")

    def diff(p: dict, key: str) -> str:
        if p.get(key) is None or p.get("c_host_us") is None:
            return "n/a"
        return f"{p[key] - p['c_host_us']:+.1f}"

    for p in host.get("problems", []):
        lines.append(
            f"| {p['m']} x {p['n']} x {p['k']} | {us(p, 'c_host_us')} | {us(p, 'py_matmul_host_us')} | "
            f"{us(p, 'py_bind_host_us')} | {us(p, 'py_bind_abi_host_us')} | {us(p, 'py_bindings_host_us')} | "
            f"{diff(p, 'py_matmul_host_us')} | "
            f"{diff(p, 'py_bind_host_us')} | "
            f"{us(p, 'py_matmul_gpu_us')} | {us(p, 'graph_gpu_us')} |"
        )
    return lines


_RUNNING = """## Running the benchmarks

```bash
pip install "pycusparselt[cu13,bench]"        # matplotlib and tqdm: the plot and the progress bar
python -m pycusparselt bench --quick           # a few shapes, under a minute
python benchmarks/host_overhead.py --json host.json          # needs nvcc: the C loop
python -m pycusparselt bench --json results.json --plot results.png --markdown results.md \\
    --host-overhead host.json                  # the whole set, a few minutes on an H100
python benchmarks/tables.py gemm results.json   # this page, from the JSON (no GPU needed)
```

`--dtypes fp16,bf16,int8,e4m3` and `--shapes` (`all`, `quick`, `square`, `bert`, `llm`, shape names such as
`llm-m16-4096to11008`, or `MxNxK`) choose the cases; `--repeats`, `--warmup` and `--tune-budget` the effort;
`--time-limit` stops starting cases after that many seconds (the large shapes run first); `--no-torch` leaves
PyTorch's columns out. The cases run in a worker process: a column that breaks the CUDA context (a sticky
error) is reported and left out of the remaining cases of its type, and the run goes on (`--in-process`
turns this off). The JSON holds every raw median, the configurations chosen, the tuning times and the
environment, and is rewritten after every case.

```{eval-rst}
.. automodule:: pycusparselt.bench
   :members: run_benchmark, summarize, targets, markdown_report, markdown_tables, plot, parse_shapes,
             parse_dtypes, gemm_flops, throughput, is_large, environment, Shape
```
"""


def _budget_text(budget: float | None) -> str:
    if budget is None:
        return "every candidate timed"
    return (f"a budget of {budget:g} s per case: the default config and the search's choice always, then the "
            "algorithm ids that fit")


def _ours_timing_text(settings: dict[str, Any]) -> str:
    """How our three stages were timed against each other (results written before interleaving say nothing)."""
    if settings.get("ours_timing") == "interleaved":
        return ("- Our three stages are timed in alternation: each has its own plan (tuned, then given its own "
                "compressed weight) and output, and each round takes one sample of each eager column, the first "
                "rotated from round to round; the graph columns likewise. Clock or thermal drift during a case "
                "thus favours no stage.")
    return ("- Our three stages were timed one after another (default, search, tuned) on one plan, so a later "
            "column can read slower from clock or thermal drift alone.")


def markdown_report(results: dict[str, Any], *, plot_path: str | None = None, notes: str | None = None,
                    source: str | None = None, api: bool = False) -> str:
    """The whole benchmark page (markdown): environment, method, targets, tables, plot, host overhead.

    Parameters
    ----------
    results : dict
        What :func:`run_benchmark` returns (or its JSON), optionally with ``"host_overhead"``.
    plot_path : str, optional
        The plot's path relative to the page, linked under "Results".
    notes : str, optional
        Markdown placed under the targets table (the reasons behind missed targets).
    source : str, optional
        The results file the page was generated from, named at the top.
    api : bool
        Add the "Running the benchmarks" section with the API reference (for the Sphinx page).
    """
    env = results.get("environment", {})
    settings = results.get("settings", {})
    lines = ["# Benchmarks", ""]
    if source:
        lines += [f"Generated from `{source}` by `benchmarks/tables.py gemm`; rerun with `python -m pycusparselt "
                  f"bench --json RESULTS.json` on a GPU.", ""]
    lines += [
        f"Measured on {_env_line(env)}.",
        "",
        "Every case is a linear layer y (M, N) = x (M, K) @ W (N, K).T with W pruned 2:4 along K, in the form "
        "`SparseLinear` uses. All columns of a case multiply the same inputs (random values, W pruned once by "
        "cuSPARSELt); each column's result is compared once with a float64 product of those inputs, and a column "
        "that disagrees is marked \"wrong result\" and left out of every comparison. Times are medians of "
        f"{settings.get('repeats', '?')} CUDA-event timings after {settings.get('warmup', '?')} warm-up calls, in "
        "milliseconds per GEMM. TFLOP/s count 2·M·N·K operations (the dense work), also for the sparse columns.",
        "",
        "- *best dense*: the fastest of `cupy.matmul` (cuBLAS), cuBLAS `gemmEx` called through CuPy (int8: "
        "CUDA_R_8I inputs, CUDA_R_32I output, CUBLAS_COMPUTE_32I), `torch.mm`, `torch._int_mm` and "
        "`torch._scaled_mm` (with and without fast accumulation), where each exists;",
        "- *cslt*: PyTorch's `torch._cslt_sparse_mm` with its default config and with the config its search picks;",
        "- *ours*: `SparseMatmulPlan.matmul` with the library's default config, after `cusparseLtMatmulSearch` "
        "(`autotune(method=\"search\")`), after our timed tuner (`autotune(method=\"timed\")`, tuning cache off, "
        f"{_budget_text(settings.get('tune_budget_s'))}), and the tuned product replayed from a CUDA graph "
        "(`plan.bind`, time per GEMM);",
        _ours_timing_text(settings),
        "- *speedup*: best dense time / our tuned eager time; *vs cslt*: PyTorch's better time / ours.",
        "- Eager columns include the host's launch cost wherever it is longer than the GPU's time (small "
        "problems); `*` marks those cases (the graph replay is under half the eager time).",
        f"- Large shapes (the speedup targets): every dimension >= 1024 and >= 1e11 operations. The tuner is "
        f"compared on graph replays (GPU time alone), with {settings.get('noise', NOISE):.0%} allowed for timing "
        "noise.",
        "",
        "## Targets",
        "",
        "| target | goal | measured | met |",
        "|---|---|---|---|",
    ]
    rows = targets(results, settings.get("noise", NOISE))
    for row in rows:
        met = {True: "yes", False: "**no**", None: "n/a"}[row["met"]]
        lines.append(f"| {row['target']} | {row['goal']} | {row['measured']} | {met} |")
    details = [(row["target"], d) for row in rows for d in row["details"]]
    if details:
        lines += ["", "Cases behind the misses:", ""]
        lines += [f"- {target}: {detail}" for target, detail in details]
    if notes:
        lines += ["", notes.strip()]
    lines += ["", "## Results", ""]
    if plot_path:
        lines += [f"![Speedup over the best dense GEMM]({plot_path})", ""]
    lines.append(markdown_tables(results))
    host = results.get("host_overhead")
    if host and host.get("problems"):
        lines += ["## Host overhead", "", host.get("description", "Host time per call (wall clock around a loop of "
                  "calls with no synchronisation inside), against a C program that loops cusparseLtMatmul on the "
                  "same problem."), ""]
        lines += _host_table(host)
        if host.get("c_reason"):
            lines += ["", f"C loop: {host['c_reason']}"]
        lines.append("")
    reasons = _na_reasons(results)
    if reasons:
        lines += ["## Columns that did not run", ""] + [f"- {r}" for r in reasons] + [""]
    if api:
        lines.append(_RUNNING)
    return "\n".join(lines).rstrip() + "\n"


def plot(results: dict[str, Any], path: str) -> str | None:
    """Write a PNG of the speedups over the best dense GEMM, one panel per input type.

    Returns None when written, else the reason it was not (matplotlib missing, nothing to plot).
    """
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "matplotlib is not installed (pip install 'pycusparselt[bench]')"
    cases = [c for c in results.get("cases", []) if "error" not in c]
    dtypes = [d for d in DTYPES if any(c["dtype"] == d for c in cases)]
    if not dtypes:
        return "no case to plot"
    fig, axes = plt.subplots(len(dtypes), 1, figsize=(14, 3.4 * len(dtypes)), squeeze=False)
    for ax, dtype in zip(axes[:, 0], dtypes, strict=True):
        rows = [c for c in cases if c["dtype"] == dtype]
        derived = [summarize(c) for c in rows]
        xs = np.arange(len(rows))
        width = 0.4
        # eager against eager: the same calls a user makes; a ratio that cannot be formed is left out
        series = (
            ("ours, tuned", [d["speedup"] for d in derived]),
            ("torch._cslt_sparse_mm (better of default, searched)",
             [d["best_dense_ms"] / d["cslt_best_ms"] if d["best_dense_ms"] and d["cslt_best_ms"] else None
              for d in derived]),
        )
        for i, (label, values) in enumerate(series):
            bars = ax.bar(xs + (i - 0.5) * width, [v if v else np.nan for v in values], width, label=label)
            ax.bar_label(bars, labels=[f"{v:.2f}" if v else "" for v in values], fontsize=6, padding=1)
        top = max([v for _, values in series for v in values if v] + [GOALS.get(dtype, 1.0)])
        ax.set_ylim(0, max(2.0, 1.2 * top))
        ax.axhline(1.0, color="black", linewidth=0.8)
        if dtype in GOALS:
            ax.axhline(GOALS[dtype], color="tab:red", linestyle="--", linewidth=0.8,
                       label=f"target {GOALS[dtype]:.2f}x (large shapes)")
        ax.set_xticks(xs)
        ax.set_xticklabels([c["shape"] for c in rows], rotation=35, ha="right", fontsize=7)
        ax.set_ylabel("speedup over best dense")
        ax.set_title(f"{dtype} -> {DTYPES[dtype]}")
        ax.legend(fontsize=7, loc="upper right", ncol=3)
    fig.suptitle(f"2:4 sparse vs best dense GEMM: {results.get('environment', {}).get('device', '')}")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return None


