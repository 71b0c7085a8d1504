"""The tables and plots of the documentation, generated from the committed results JSON (no GPU needed).

``python benchmarks/tables.py COMMAND ...``, one command per page:

``gemm RESULTS.json [--host-overhead HOST.json] [--notes NOTES.md] [--plot PNG] [--out docs/benchmarks.md]``
    ``docs/benchmarks.md`` from ``python -m pycusparselt bench --json`` results (the page and plot are
    :func:`pycusparselt.bench.markdown_report` and :func:`pycusparselt.bench.plot`, which the benchmark command
    prints and draws too). The host-overhead measurement (``benchmarks/host_overhead.py --json``) comes from
    ``--host-overhead`` or from the results; ``--notes`` is markdown placed under the targets table. An existing
    PNG given with ``--plot`` is linked where matplotlib is missing.
``inference RESULTS.json [--plot PNG]``
    The tables of ``docs/inference.md`` (printed) from a ``benchmarks/bench_inference.py`` JSON, and its plot.
``decode RESULTS.json [--check]``
    The decode kernel's tables in ``docs/inference.md``, between the ``<!-- decode-tables:start -->`` and
    ``<!-- decode-tables:end -->`` markers, from a ``benchmarks/bench_decode.py`` JSON: one GEMM per shape and
    row count (ours, cuSPARSELt, dense cuBLAS) and the captured decode stack; backends the JSON lacks are
    "not measured". ``--check`` only reports (exit 1) when the page's tables are out of date.
``quantization [--check]``
    The accuracy and BERT FFN speed tables between the ``.. <name>:start`` / ``.. <name>:end`` markers of
    ``docs/quantization.rst`` (``accuracy-table``, ``speed-table``) and ``docs/linear.rst`` (``bert-ffn-table``),
    from ``benchmarks/results/accuracy_digits.json`` (``scripts/accuracy_table.py``) and
    ``benchmarks/results/bert_ffn_h100.json`` (``benchmarks/bench_bert_ffn.py --json``); ``--check`` only
    reports (exit 1) when a table is out of date.
``scaling-forms [--check]``
    The two-GPU table of the MLP block's forms (all-reduce, sequence-parallel, data-parallel) between the
    ``.. scaling-forms-table:start`` / ``:end`` markers of ``docs/distributed.rst``, from the newest
    ``benchmarks/results/mlp_scaling_2x*.json`` whose rows name their form (``benchmarks/mlp_scaling.py
    --forms ...``); while there is none every row reads "not measured". ``--check`` only reports (exit 1).
``support-matrix SUMMARY.json``
    ``docs/support_matrix.rst`` and the table between the support-matrix markers of ``README.md`` from a GPU
    check summary (``benchmarks/results/gpu_check_*.json``): each input -> output type pair, compute type and
    sparse side the GPU run verified, with the layouts that computed correctly and what was refused.

``tests/docs/test_docs_tables.py`` and ``tests/docs/test_quantization_docs.py`` check that the pages carry these
tables as generated from the committed results.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
ACCURACY = ROOT / "benchmarks" / "results" / "accuracy_digits.json"
SPEED = ROOT / "benchmarks" / "results" / "bert_ffn_h100.json"


# -- docs/benchmarks.md: the GEMM benchmark ---------------------------------------------------------------


def gemm_page(results_path: str, *, host_overhead: str | None = None, notes: str | None = None,
              plot: str | None = None, out: str = str(ROOT / "docs" / "benchmarks.md")) -> int:
    """Write the benchmark page (and its plot) from a ``python -m pycusparselt bench --json`` file."""
    from pycusparselt import bench

    with open(results_path, encoding="utf-8") as f:
        results = json.load(f)
    if host_overhead:
        try:
            with open(host_overhead, encoding="utf-8") as f:
                results["host_overhead"] = json.load(f)
        except (OSError, ValueError) as exc:
            print(f"--host-overhead not read ({exc}); the report goes without it", file=sys.stderr)
    note_text = Path(notes).read_text(encoding="utf-8") if notes else None
    plot_path = plot or str(Path(results_path).with_suffix(".png"))
    why = bench.plot(results, plot_path)
    if why and not os.path.isfile(plot_path):
        print(f"no plot: {why}", file=sys.stderr)
        plot_ref = None
    else:
        if why:
            print(f"plot not redrawn ({why}); linking the existing {plot_path}", file=sys.stderr)
        plot_ref = os.path.relpath(plot_path, os.path.dirname(os.path.abspath(out)))
    source = os.path.relpath(os.path.abspath(results_path), ROOT)
    page = bench.markdown_report(results, plot_path=plot_ref, notes=note_text, source=source, api=True)
    Path(out).write_text(page, encoding="utf-8")
    print(f"wrote {out}")
    return 0


# -- docs/inference.md: whole networks ------------------------------------------------------------------


#: The BERT variants in table order, and how the table names them.
BERT_VARIANTS = [("dense-fp16", "dense-fp16"), ("dense-int8", "dense-int8"), ("sparse-fp16", "sparse-fp16"),
                 ("sparse-int8", "sparse-int8"), ("sparse-fp8", "sparse-fp8"),
                 ("sparse-fp16-torch", "sparse-fp16 (PyTorch tensors)")]
#: The host table's columns: JSON key and heading.
HOST_COLUMNS = [("layer_us", "`SparseLinear(x)`"), ("layer_out_us", "`(x, out=)`"), ("layer_torch_us", "torch `x`"),
                ("bound_us", "`bind()()`"), ("graph_per_gemm_us", "graph per GEMM"), ("dense_cupy_us", "dense CuPy"),
                ("dense_torch_us", "dense PyTorch")]


def _ms(rows: list[dict], model: str, batch: int, variant: str, graph: bool) -> float:
    key = (model, batch, variant, graph)
    (ms,) = [r["ms"] for r in rows if (r["model"], r["batch"], r["variant"], r["graph"]) == key]
    return ms


def bert_table(result: dict) -> list[str]:
    """BERT-large FFN: each variant eager and captured, and its ratio to dense FP16 (eager to eager, graph to
    graph)."""
    rows = result["rows"]
    lines = ["| batch | variant | eager | graph | eager vs dense-fp16 eager | graph vs dense-fp16 graph |",
             "|---|---|---|---|---|---|"]
    for batch in sorted({r["batch"] for r in rows if r["model"] == "bert-large-ffn"}):
        base = [_ms(rows, "bert-large-ffn", batch, "dense-fp16", g) for g in (False, True)]
        for variant, name in BERT_VARIANTS:
            eager, graph = (_ms(rows, "bert-large-ffn", batch, variant, g) for g in (False, True))
            lines.append(f"| {batch} | {name} | {eager:.3f} ms | {graph:.3f} ms | {base[0] / eager:.2f}x | "
                         f"{base[1] / graph:.2f}x |")
    return lines


def llm_table(result: dict) -> list[str]:
    """LLM decode: dense and sparse FP16, eager and captured, with the speed-ups."""
    rows = result["rows"]
    lines = ["| M (tokens) | dense eager | sparse eager | speedup | dense graph | sparse graph | speedup |",
             "|---|---|---|---|---|---|---|"]
    for m in sorted({r["batch"] for r in rows if r["model"] == "llm-decode"}):
        cells = [f"| {m} "]
        for graph in (False, True):
            dense, sparse = (_ms(rows, "llm-decode", m, v, graph) for v in ("dense-fp16", "sparse-fp16"))
            cells.append(f"| {dense:.3f} ms | {sparse:.3f} ms | {dense / sparse:.2f}x ")
        lines.append("".join(cells) + "|")
    return lines


def host_table(result: dict) -> list[str]:
    """Per-layer host cost, microseconds per call."""
    lines = ["| M x out x in | " + " | ".join(h for _, h in HOST_COLUMNS) + " |",
             "|---" * (len(HOST_COLUMNS) + 1) + "|"]
    for entry in result["host"]:
        shape = " x ".join(str(s) for s in entry["shape"])
        lines.append(f"| {shape} | " + " | ".join(f"{entry[k]:.1f}" for k, _ in HOST_COLUMNS) + " |")
    return lines


def inference_tables(result: dict) -> list[list[str]]:
    """The page's three tables, in page order."""
    return [bert_table(result), llm_table(result), host_table(result)]


def plot_inference(src: str, dst: str) -> None:
    """Whole-stack time of every variant, eager and captured, per batch size (needs matplotlib)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    result = json.loads(Path(src).read_text())
    rows = [r for r in result["rows"] if r.get("ms") is not None and not r["variant"].endswith("-torch")]
    models = [("bert-large-ffn", "BERT-large FFN, 24 blocks (batch = sequences of 384)"),
              ("llm-decode", "LLM decode, 32 blocks 4096-11008-4096 (batch = tokens)")]
    fig, axes = plt.subplots(1, 2, figsize=(13, 4.6))
    for ax, (model, title) in zip(axes, models, strict=True):
        mine = [r for r in rows if r["model"] == model]
        batches = sorted({r["batch"] for r in mine})
        variants = sorted({r["variant"] for r in mine}, key=lambda v: (not v.startswith("dense"), v))
        series = [(v, g) for v in variants for g in (False, True)]
        width = 0.85 / len(series)
        for i, (variant, graph) in enumerate(series):
            ms = [next((r["ms"] for r in mine if r["batch"] == b and r["variant"] == variant and r["graph"] == graph),
                       0.0) for b in batches]
            ax.bar([j + i * width for j in range(len(batches))], ms, width,
                   label=f"{variant} {'graph' if graph else 'eager'}", hatch="//" if graph else None,
                   color=f"C{variants.index(variant)}", alpha=0.95 if graph else 0.55)
        ax.set_xticks([j + 0.85 / 2 - width / 2 for j in range(len(batches))], [str(b) for b in batches])
        ax.set_xlabel("batch")
        ax.set_ylabel("ms per forward pass (median)")
        ax.set_title(title, fontsize=10)
        ax.legend(fontsize=7, ncol=2)
    fig.suptitle(f"{result['device']}, cuSPARSELt {result['cusparselt']}, PyTorch {result['torch']}", fontsize=10)
    fig.tight_layout()
    fig.savefig(dst, dpi=110)


# -- docs/inference.md: the decode kernel against cuSPARSELt and cuBLAS -----------------------------------


DECODE_PAGE = ROOT / "docs" / "inference.md"
DECODE_REGION = "decode-tables"
NOT_MEASURED = "not measured"


def markdown_markers(name: str) -> tuple[str, str]:
    return f"<!-- {name}:start -->", f"<!-- {name}:end -->"


def markdown_region(text: str, name: str) -> str:
    """What a Markdown page holds between its ``<!-- name:start -->`` and ``<!-- name:end -->`` markers."""
    start, end = markdown_markers(name)
    if start not in text or end not in text:
        raise ValueError(f"the markers '{start}' and '{end}' are missing")
    return text.split(start, 1)[1].split(end, 1)[0]


def replace_markdown_region(text: str, name: str, body: list[str]) -> str:
    """``text`` with ``body`` (lines) between its ``<!-- name:start -->`` and ``<!-- name:end -->`` markers."""
    start, end = markdown_markers(name)
    head, rest = text.split(start, 1) if start in text else (None, None)
    if head is None or end not in rest:
        raise ValueError(f"the markers '{start}' and '{end}' are missing")
    _, tail = rest.split(end, 1)
    return head + start + "\n\n" + "\n".join(body) + "\n\n" + end + tail


def decode_labels(result: dict) -> list[str]:
    """The cuSPARSELt backends of a decode results JSON: the run's label first (``--backend-label``, default
    ``cusparselt``), then any other ``cusparselt*`` label its GEMM rows carry (rows merged from other runs)."""
    label = result.get("backend_label", "cusparselt")
    others = {r["backend"] for r in result.get("rows", []) if r["backend"].startswith("cusparselt")} - {label}
    return [label, *sorted(others)]


def _backend_name(label: str, result: dict) -> str:
    if label == result.get("backend_label", "cusparselt") and result.get("cusparselt"):
        return f"cuSPARSELt {result['cusparselt']}"
    return "cuSPARSELt" if label == "cusparselt" else label


def _us(row: dict | None) -> str:
    return NOT_MEASURED if row is None else f"{row['us']:.1f} us"


def _speedup(slow: dict | None, fast: dict | None, key: str = "us") -> str:
    return NOT_MEASURED if slow is None or fast is None else f"{slow[key] / fast[key]:.2f}x"


def decode_gemm_table(result: dict) -> list[str]:
    """One GEMM per (N, K) and m: ours at its fastest split (GB/s and share of the copy bandwidth), each
    cuSPARSELt label, dense cuBLAS, and the ratios to dense; "not measured" where the JSON has no row."""
    rows = [r for r in result.get("rows", []) if "split_k" not in r]
    labels = decode_labels(result)
    names = [_backend_name(label, result) for label in labels]
    by = {(r["n"], r["k"], r["m"], r["backend"]): r for r in rows}
    copy_gbps = result.get("copy_gbps")
    lines = ["| N x K | m | ours-best (splits) | ours GB/s | % of copy | " + " | ".join(names)
             + " | dense (cuBLAS) | ours vs dense | " + " | ".join(f"{name} vs dense" for name in names) + " |",
             "|---" * (7 + 2 * len(labels)) + "|"]
    for n, k in dict.fromkeys((r["n"], r["k"]) for r in rows):
        for m in sorted({r["m"] for r in rows if (r["n"], r["k"]) == (n, k)}):
            ours, dense = by.get((n, k, m, "ours-best")), by.get((n, k, m, "dense"))
            theirs = [by.get((n, k, m, label)) for label in labels]
            cells = [f"{n} x {k}", str(m)]
            if ours is None:
                cells += [NOT_MEASURED] * 3
            else:
                share = f"{100 * ours['gbps'] / copy_gbps:.0f} %" if copy_gbps else NOT_MEASURED
                cells += [f"{ours['us']:.1f} us ({ours['splits']})", f"{ours['gbps']:.0f}", share]
            cells += [_us(row) for row in theirs] + [_us(dense), _speedup(dense, ours)]
            cells += [_speedup(dense, row) for row in theirs]
            lines.append("| " + " | ".join(cells) + " |")
    return lines


def decode_stack_table(result: dict) -> list[str]:
    """The captured decode stack per m: dense, cuSPARSELt and ours, and the speed-ups."""
    name = _backend_name(result.get("backend_label", "cusparselt"), result)
    lines = [f"| m | dense | {name} | ours | ours vs dense | {name} vs dense | ours vs {name} |",
             "|---|---|---|---|---|---|---|"]
    for row in result.get("stack", []):
        ms = {b: row.get(f"{b}_ms") for b in ("dense", "cusparselt", "ours")}
        cells = [str(row["m"])] + [NOT_MEASURED if v is None else f"{v:.3f} ms" for v in ms.values()]
        for slow, fast in (("dense", "ours"), ("dense", "cusparselt"), ("cusparselt", "ours")):
            cells.append(NOT_MEASURED if ms[slow] is None or ms[fast] is None else f"{ms[slow] / ms[fast]:.2f}x")
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def decode_tables(result: dict) -> list[list[str]]:
    """The decode section's two tables, in page order."""
    return [decode_gemm_table(result), decode_stack_table(result)]


def decode_region(result: dict, source: str) -> list[str]:
    """The lines between the decode markers of ``docs/inference.md``: where the numbers come from, the two
    tables, and the run's notes."""
    version = f", cuSPARSELt {result['cusparselt']}" if result.get("cusparselt") else ""
    copy_gbps = result.get("copy_gbps")
    copy_text = f"{copy_gbps} GB/s" if copy_gbps else NOT_MEASURED
    lines = [
        f"Measured on the {result['gpu']} ({result['date']}{version}), FP16: `{result['command']}`, results "
        f"`{source}`; tables generated by `python benchmarks/tables.py decode {source}`.",
        "",
        f"One GEMM `y = x @ W.T`, microseconds per call in CUDA-graph replays over weight copies rotated past the "
        f"L2. ours-best is the decode kernel at its fastest split of K (in brackets); GB/s counts the packed weight "
        f"(0.5625 of dense) plus x and y, against the device-to-device copy bandwidth of the same run, "
        f"{copy_text} (bytes read + written). cuSPARSELt is `SparseLinear` (tuned; 1-16 rows padded to 16), dense "
        f"is cuBLAS through `torch.matmul`.",
        "",
        *decode_gemm_table(result),
        "",
    ]
    stack = result.get("stack")
    if stack:
        blocks, distinct = stack[0].get("blocks"), stack[0].get("distinct_weights")
        what = f"{blocks} blocks" if blocks else "blocks"
        lines += [f"The LLM decode stack, {what} of 4096 -> 11008 (bias, ReLU) -> 4096 (bias)"
                  + (f" ({distinct} distinct weight pairs)" if distinct else "")
                  + ", each backend captured whole in one CUDA graph, milliseconds per pass:", "",
                  *decode_stack_table(result)]
    else:
        lines.append(f"The LLM decode stack: {NOT_MEASURED}.")
    if result.get("notes"):
        lines += ["", f"Notes on the run: {result['notes']}"]
    return lines


def decode_page(results_path: str, check: bool = False, page: Path = DECODE_PAGE) -> int:
    """Rewrite (or, with ``check``, compare) the decode tables of ``page`` from a results JSON."""
    path = Path(results_path).resolve()
    source = path.relative_to(ROOT).as_posix() if path.is_relative_to(ROOT) else results_path
    result = json.loads(path.read_text())
    return _update_page(page, DECODE_REGION, lambda text: replace_markdown_region(
        text, DECODE_REGION, decode_region(result, source)), check)


def _update_page(page: Path, region: str, rewrite, check: bool) -> int:
    """Rewrite ``region`` of ``page`` with ``rewrite(text)``; with ``check`` only report a difference (1)."""
    text = page.read_text()
    new = rewrite(text)
    if new == text:
        return 0
    if check:
        print(f"out of date: {page.relative_to(ROOT) if page.is_relative_to(ROOT) else page}: {region}")
        return 1
    page.write_text(new)
    print(f"updated: {page}: {region}")
    return 0


# -- docs/quantization.rst and docs/linear.rst: accuracy and BERT FFN speed -------------------------------


def _table(header: list[str], rows: list[list[str]], widths: list[int] | None = None) -> list[str]:
    lines = [".. list-table::", "   :header-rows: 1"]
    if widths:
        lines.append("   :widths: " + " ".join(map(str, widths)))
    lines.append("")
    for row in [header, *rows]:
        lines.append(f"   * - {row[0]}")
        lines += [f"     - {cell}" for cell in row[1:]]
    return lines


def _diff(v: float) -> str:
    return "\\-" if abs(v) < 0.005 else f"{v:+.2f}"


def accuracy_table(result: dict) -> list[str]:
    header = ["Network (digits)", "Dense FP16", "Sparse FP16", "Δ", "Sparse INT8", "Δ", "Sparse FP8", "Δ"]
    rows = []
    for name, data in result["networks"].items():
        m = {k: 100 * v for k, v in data["mean"].items()}
        row = [name, f"{m['dense_fp16']:.2f}"]
        for col in ("sparse_fp16", "sparse_int8", "sparse_fp8"):
            row += [f"{m[col]:.2f}", _diff(m[col] - m["dense_fp16"])]
        rows.append(row)
    seeds = ", ".join(map(str, result["seeds"]))
    intro = [
        f"Test accuracy (%) on scikit-learn's digits, mean over seeds {seeds}; the columns after each sparse one "
        f"are the differences from dense FP16, as in the talk's tables. {result['epochs']} epochs of training "
        f"and of retraining; activation scales: {result['calibration']}; INT8: {result['int8']}; FP8: "
        f"{result['fp8']}. Generated by ``python benchmarks/tables.py quantization`` from "
        f"``benchmarks/results/accuracy_digits.json`` (``scripts/accuracy_table.py``).",
        "",
    ]
    per_seed = ["", "Per seed (dense FP16 / sparse FP16 / sparse INT8 / sparse FP8):", ""]
    for name, data in result["networks"].items():
        runs = "; ".join(
            " / ".join(f"{100 * r[c]:.1f}" for c in ("dense_fp16", "sparse_fp16", "sparse_int8", "sparse_fp8"))
            for r in data["per_seed"]
        )
        per_seed.append(f"- {name}: {runs}")
    return intro + _table(header, rows, [26, 11, 11, 7, 11, 7, 11, 7]) + per_seed


def _fmt(v: float | None, spec: str = ".0f") -> str:
    return "\\-" if v is None else format(v, spec)


def _pct(v: float | None) -> str:
    return "\\-" if v is None else f"{100 * v:+.0f} %"


def speed_table(result: dict) -> list[str]:
    header = ["Batch (sequences)", "Dense FP16", "Dense INT8", "Sparse FP16", "Sparse INT8", "Sparse FP8",
              "Sparse INT8 vs dense INT8", "Sparse FP16 vs dense FP16"]
    rows = []
    for row in result["rows"]:
        sps = row["samples_per_s"]
        rows.append([str(row["batch"])] + [_fmt(sps.get(k)) for k in
                                            ("dense_fp16", "dense_int8", "sparse_fp16", "sparse_int8", "sparse_fp8")]
                    + [_pct(row["sparse_int8_gain_over_dense_int8"]), _pct(row["sparse_fp16_gain_over_dense_fp16"])])
    intro = [
        f"Samples (sequences of {result['seq']} tokens) per second through the feed-forward networks of the "
        f"24 BERT-large encoder blocks ({result['hidden']} -> {result['ffn']} -> {result['hidden']}, ReLU), "
        f"measured on the {result['device']} with cuSPARSELt {result['cusparselt']} over a stack of "
        f"{result['layers']} blocks with their own weights (median of {result['repeat']} runs, CUDA events; "
        f"the stack's time scaled by 24 / {result['layers']}). Generated by ``python benchmarks/tables.py "
        f"quantization`` from "
        f"``benchmarks/results/bert_ffn_h100.json`` (``benchmarks/bench_bert_ffn.py``).",
        "",
    ]
    ms = ["", "Milliseconds per block (the stack's time / blocks), every variant measured:", ""]
    names = sorted({k for row in result["rows"] for k in row["ms"] if k not in ("dense_fp16", "dense_int8")})
    for row in result["rows"]:
        cells = ", ".join(f"{k} {row['ms'][k] / result['layers']:.3f}" for k in names if row["ms"].get(k))
        ms.append(f"- batch {row['batch']}: {cells}")
    if result.get("errors"):
        ms += ["", "Variants that did not run: " + "; ".join(f"{k}: {v}" for k, v in result["errors"].items())]
    return intro + _table(header, rows, [10, 10, 10, 10, 10, 10, 12, 12]) + ms


def bert_ffn_table(result: dict) -> list[str]:
    header = ["Batch", "Tokens", "Dense FP16, CuPy (ms/block)", "Dense FP16, PyTorch (ms/block)",
              "SparseLinear FP16 (ms/block)", "Speed-up vs CuPy", "Speed-up vs the faster dense",
              "Max rel. error"]
    rows = []
    layers = result["layers"]
    for row in result["rows"]:
        ms = row["ms"]
        cupy_ms, torch_ms, sparse_ms = ms.get("dense_fp16_cupy"), ms.get("dense_fp16_torch"), ms.get("sparse_fp16")
        best = ms.get("dense_fp16")
        rows.append([
            str(row["batch"]), str(row["tokens"]),
            _fmt(cupy_ms and cupy_ms / layers, ".3f"), _fmt(torch_ms and torch_ms / layers, ".3f"),
            _fmt(sparse_ms and sparse_ms / layers, ".3f"),
            _fmt(cupy_ms / sparse_ms if cupy_ms and sparse_ms else None, ".2f") + "x",
            _fmt(best / sparse_ms if best and sparse_ms else None, ".2f") + "x",
            _fmt(row["rel_error"].get("sparse_fp16"), ".1e"),
        ])
    intro = [
        f"One BERT-large feed-forward block ({result['hidden']} -> {result['ffn']} -> {result['hidden']}, ReLU, "
        f"sequence {result['seq']}) in FP16 on the {result['device']} (cuSPARSELt {result['cusparselt']}): "
        f"SparseLinear (bias and ReLU fused) against dense cuBLAS through CuPy (plus one bias-ReLU kernel) and "
        f"PyTorch's cuBLASLt bias-ReLU epilogue; max rel. error is the sparse output against the float32 product "
        f"of the same pruned weights. Generated by ``python benchmarks/tables.py quantization`` from "
        f"``benchmarks/results/bert_ffn_h100.json``.",
        "",
    ]
    return intro + _table(header, rows)


def _not_measured(source: Path) -> list[str]:
    script = "benchmarks/bench_bert_ffn.py" if source == SPEED else "scripts/accuracy_table.py"
    return [
        f"Not measured for this version yet: ``{source.relative_to(ROOT)}`` is written by "
        f"``python {script} --json {source.relative_to(ROOT)}`` (on the GPU for the speed tables); then "
        f"``python benchmarks/tables.py quantization`` fills this table.",
    ]


QUANTIZATION_TARGETS = [
    (ROOT / "docs" / "quantization.rst", "accuracy-table", ACCURACY, accuracy_table),
    (ROOT / "docs" / "quantization.rst", "speed-table", SPEED, speed_table),
    (ROOT / "docs" / "linear.rst", "bert-ffn-table", SPEED, bert_ffn_table),
]


def replace_region(text: str, name: str, body: list[str]) -> str:
    start, end = f".. {name}:start", f".. {name}:end"
    if start not in text or end not in text:
        raise ValueError(f"the markers '{start}' and '{end}' are missing")
    head, rest = text.split(start, 1)
    _, tail = rest.split(end, 1)
    return head + start + "\n\n" + "\n".join(body) + "\n\n" + end + tail


def render(check: bool = False) -> list[str]:
    """Rewrite (or, with ``check``, compare) every table; return the targets that were out of date."""
    stale = []
    texts: dict[Path, str] = {}
    for path, name, source, fn in QUANTIZATION_TARGETS:
        text = texts.get(path, path.read_text())
        body = fn(json.loads(source.read_text())) if source.exists() else _not_measured(source)
        texts[path] = replace_region(text, name, body)
        if texts[path] != text:
            stale.append(f"{path.relative_to(ROOT)}: {name}")
    for path, text in texts.items():
        if not check and text != path.read_text():
            path.write_text(text)
    return stale


# -- docs/distributed.rst: the MLP block's forms on two GPUs ------------------------------------------------


FORMS_PAGE = ROOT / "docs" / "distributed.rst"
FORMS_REGION = "scaling-forms-table"
FORMS_CASES = [("llm", 8192), ("llm", 2048), ("bert-large", 12288), ("bert-large", 3072)]
FORMS_ORDER = [("allreduce", "all-reduce (tensor)"), ("sequence", "sequence (tensor)"), ("data", "data")]
#: The speed-ups two GPUs should reach: (shape, tokens, form) -> at least.
FORMS_TARGETS = {("llm", 8192, "allreduce"): 1.75, ("llm", 8192, "sequence"): 1.75,
                 ("llm", 2048, "allreduce"): 1.5, ("llm", 2048, "sequence"): 1.5,
                 ("bert-large", 12288, "allreduce"): 1.3, ("bert-large", 12288, "sequence"): 1.3,
                 ("bert-large", 12288, "data"): 1.9}
FORMS_NAMES = {"llm": "LLM", "bert-large": "BERT-large"}
NOT_MEASURED_RUN = "not measured"


def forms_result_path(results: Path = ROOT / "benchmarks" / "results") -> Path | None:
    """The newest two-GPU scaling result whose rows name their form (by the date in its name), or None."""
    found = []
    for path in results.glob("mlp_scaling_2x*.json"):
        rows = json.loads(path.read_text()).get("rows", [])
        if any("form" in row for row in rows):
            found.append((path.stem.rsplit("_", 1)[-1], path.name, path))
    return max(found)[2] if found else None


def forms_table(result: dict | None, source: str | None = None) -> list[str]:
    """The region's lines: where the numbers come from and one row per case and form (the sequence form's best
    chunk count), or "not measured" rows without a result."""
    rows = [] if result is None else result["rows"]
    one = {(r["shape"], r["tokens"]): r for r in rows if r["gpus"] == 1 and r.get("form", "allreduce") == "allreduce"}
    best: dict[tuple, dict] = {}
    for r in rows:
        if r["gpus"] == 2 and "form" in r:
            key = (r["shape"], r["tokens"], r["form"])
            if key not in best or r["parallel_ms"] < best[key]["parallel_ms"]:
                best[key] = r
    if result is None:
        intro = ("Not measured yet: ``python benchmarks/mlp_scaling.py --gpus 1 2 --forms allreduce sequence data "
                 "--one-gpu-per-process --json benchmarks/results/mlp_scaling_2x<gpu>_<date>.json`` on two GPUs of "
                 "one host writes the result, and ``python benchmarks/tables.py scaling-forms`` fills this table.")
    else:
        env = result["environment"]
        intro = (f"{env['device']} x{env['visible_gpus']}, cuSPARSELt {env['cusparselt']}, NCCL {env['nccl']}, "
                 f"``{source}``; generated by ``python benchmarks/tables.py scaling-forms``.")
    out = [intro, "", ".. csv-table:: FP16 block on two GPUs by form, medians (ms)",
           "   :header: shape, tokens, form, 1 GPU, 2 GPUs, speed-up, exposed communication, target", ""]
    for shape, tokens in FORMS_CASES:
        base = one.get((shape, tokens))
        for form, label in FORMS_ORDER:
            row = best.get((shape, tokens, form))
            target = FORMS_TARGETS.get((shape, tokens, form))
            target_cell = f">= {target:.2f}x" if target else "-"
            if row is None or base is None:
                cells = [NOT_MEASURED_RUN] * 4
            else:
                cells = [f"{base['parallel_ms']:.3f}", f"{row['parallel_ms']:.3f}",
                         f"{base['parallel_ms'] / row['parallel_ms']:.2f}x", f"{row['exposed_ms']:.3f}"]
                if form == "sequence":
                    label = f"sequence (tensor; {row['chunks']} chunks)"
            out.append(f"   {FORMS_NAMES[shape]}, {tokens}, {label}, {', '.join(cells)}, {target_cell}")
    return out


def scaling_forms(check: bool = False, page: Path = FORMS_PAGE) -> int:
    """Rewrite (or, with ``check``, compare) the forms table of ``docs/distributed.rst``; 1 when out of date."""
    path = forms_result_path()
    result = None if path is None else json.loads(path.read_text())
    source = None if path is None else str(path.relative_to(ROOT))
    return _update_page(page, FORMS_REGION, lambda text: replace_region(text, FORMS_REGION,
                                                                       forms_table(result, source)), check)


# -- docs/support_matrix.rst and README.md: what the GPU check verified -----------------------------------


TYPE_NAMES = {"f16": "FP16", "bf16": "BF16", "f32": "FP32", "i8": "INT8", "i32": "INT32", "e4m3": "E4M3",
              "e5m2": "E5M2"}
DEFAULT_COMPUTE = {"f16": "32F", "bf16": "32F", "f32": "32F (TF32)", "i8": "32I", "e4m3": "32F", "e5m2": "32F"}
README_START, README_END = "<!-- support-matrix:start -->", "<!-- support-matrix:end -->"


def support_rows(summary: dict) -> list[tuple[str, ...]]:
    grouped: dict[tuple, dict] = defaultdict(lambda: defaultdict(list))
    for case in summary["combinations"]:
        key = (case["inp"], case["out"], case["compute"] or DEFAULT_COMPUTE[case["inp"]], case["side"])
        layout = f"A {case['a']}, B {case['b']}"
        grouped[key][(case["expect"], case["outcome"])].append(layout)
    table = []
    for (inp, out, compute, side), outcomes in grouped.items():
        works = outcomes[("ok", "passed")]
        refused = outcomes[("layout", "passed")]
        failed = [f"{layout} ({expect})" for (expect, outcome), layouts in outcomes.items()
                  if outcome != "passed" for layout in layouts]
        if outcomes[("refused", "passed")]:
            status = "refused by cuSPARSELt (clear error)"
        elif works:
            status = "verified: " + "; ".join(works)
        else:
            status = "not verified"
        if refused:
            status += f"; refused in Python: {'; '.join(refused)}"
        if failed:
            status += f"; FAILED: {'; '.join(failed)}"
        table.append((f"{TYPE_NAMES[inp]} -> {TYPE_NAMES[out]}", compute, side.upper(), status))
    return table


def support_markdown(summary: dict) -> str:
    head = (f"Verified on {summary.get('device', '?')} (SM {summary.get('compute_capability', '?')}) with cuSPARSELt "
            f"{summary.get('cusparselt', '?')}, {summary.get('date', '?')[:10]}; generated by "
            f"`python benchmarks/tables.py support-matrix` from the GPU check summary.\n\n")
    lines = ["| A, B -> C, D | compute | sparse | result (layouts: row = C-contiguous, col = F-contiguous) |",
             "|---|---|---|---|"]
    lines += [f"| {a} | {b} | {c} | {d} |" for a, b, c, d in support_rows(summary)]
    return head + "\n".join(lines) + "\n"


def support_rst(summary: dict) -> str:
    out = ["Support matrix", "==============", "",
           f"What the GPU check verified on {summary.get('device', '?')} (SM {summary.get('compute_capability', '?')})"
           f" with cuSPARSELt {summary.get('cusparselt', '?')} ({summary.get('date', '?')[:10]}): every",
           "combination of ``tests/gemm/test_plan_gpu.py::test_combination``, compared with the NumPy reference.",
           "Generated by ``python benchmarks/tables.py support-matrix``; do not edit by hand.", "",
           ".. list-table::", "   :header-rows: 1", "   :widths: 18 12 8 62", "",
           "   * - A, B -> C, D", "     - compute", "     - sparse", "     - result"]
    for row in support_rows(summary):
        out.append(f"   * - {row[0]}")
        out += [f"     - {cell}" for cell in row[1:]]
    return "\n".join(out) + "\n"


def support_matrix(path: str) -> int:
    """Rewrite the support matrix of the docs and the README from a GPU check summary."""
    summary = json.loads(Path(path).read_text())
    if not summary.get("combinations"):
        print(f"{path} has no combination results", file=sys.stderr)
        return 1
    (ROOT / "docs" / "support_matrix.rst").write_text(support_rst(summary))
    readme = ROOT / "README.md"
    text = readme.read_text()
    start, end = text.index(README_START) + len(README_START), text.index(README_END)
    readme.write_text(text[:start] + "\n" + support_markdown(summary) + text[end:])
    print(support_markdown(summary))
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    gemm = commands.add_parser("gemm", help="docs/benchmarks.md from python -m pycusparselt bench --json")
    gemm.add_argument("results", help="JSON written by python -m pycusparselt bench --json")
    gemm.add_argument("--host-overhead", metavar="JSON", help="JSON written by benchmarks/host_overhead.py")
    gemm.add_argument("--notes", metavar="MD", help="markdown placed under the targets table")
    gemm.add_argument("--plot", metavar="PNG", help="plot to write (or link); default: RESULTS with .png")
    gemm.add_argument("--out", default=str(ROOT / "docs" / "benchmarks.md"), help="the page to write")
    inference = commands.add_parser("inference", help="the tables (and plot) of docs/inference.md")
    inference.add_argument("results", help="JSON written by benchmarks/bench_inference.py")
    inference.add_argument("--plot", metavar="PNG", help="also draw the plot (needs matplotlib)")
    decode = commands.add_parser("decode", help="the decode kernel's tables of docs/inference.md")
    decode.add_argument("results", help="JSON written by benchmarks/bench_decode.py")
    decode.add_argument("--check", action="store_true", help="report out-of-date tables without writing")
    quant = commands.add_parser("quantization", help="the accuracy and speed tables of the quantization pages")
    quant.add_argument("--check", action="store_true", help="report out-of-date tables without writing")
    forms = commands.add_parser("scaling-forms", help="the two-GPU forms table of docs/distributed.rst")
    forms.add_argument("--check", action="store_true", help="report an out-of-date table without writing")
    support = commands.add_parser("support-matrix", help="docs/support_matrix.rst and README.md's table")
    support.add_argument("summary", help="a GPU check summary, benchmarks/results/gpu_check_*.json")
    args = parser.parse_args(argv)
    if args.command == "gemm":
        return gemm_page(args.results, host_overhead=args.host_overhead, notes=args.notes, plot=args.plot,
                         out=args.out)
    if args.command == "inference":
        result = json.loads(Path(args.results).read_text())
        print("\n\n".join("\n".join(table) for table in inference_tables(result)))
        if args.plot:
            plot_inference(args.results, args.plot)
        return 0
    if args.command == "decode":
        return decode_page(args.results, check=args.check)
    if args.command == "quantization":
        stale = render(check=args.check)
        for item in stale:
            print(("out of date: " if args.check else "updated: ") + item)
        return 1 if args.check and stale else 0
    if args.command == "scaling-forms":
        return scaling_forms(check=args.check)
    return support_matrix(args.summary)


if __name__ == "__main__":
    sys.exit(main())
