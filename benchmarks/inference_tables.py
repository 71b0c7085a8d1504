"""The tables of ``docs/inference.md``, in Markdown, from a ``bench_inference.py`` JSON.

``python benchmarks/inference_tables.py benchmarks/results/inference_<gpu>_<date>.json`` prints the BERT-large
FFN table, the LLM decode table and the per-layer host-cost table; ``tests/docs/test_docs_tables.py`` checks that the
page carries them as printed from the committed JSON.
"""

from __future__ import annotations

import json
import sys

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


def tables(result: dict) -> list[list[str]]:
    """The page's three tables, in page order."""
    return [bert_table(result), llm_table(result), host_table(result)]


def main(argv: list[str]) -> int:
    (path,) = argv
    with open(path) as f:
        result = json.load(f)
    print("\n\n".join("\n".join(table) for table in tables(result)))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
