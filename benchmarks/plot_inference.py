"""Plot a ``bench_inference.py`` JSON: whole-stack time of every variant, eager and captured, per batch size.

``python benchmarks/plot_inference.py benchmarks/results/inference_<gpu>_<date>.json docs/images/inference.png``
(needs matplotlib).
"""

from __future__ import annotations

import json
import sys


def main(argv: list[str]) -> int:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    src, dst = argv
    result = json.load(open(src))
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
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
