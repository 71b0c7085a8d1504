"""``pycusparselt.torch.sparsify`` against the dense PyTorch model it replaces, end to end, on the GPU.

Usage::

    python benchmarks/bench_torch_sparsify.py [--json out.json] [--repeat 50] [--models ffn llm]
    python benchmarks/bench_torch_sparsify.py --report results.json     # the table again, no GPU needed

Each model is a stack of FP16 blocks ``Linear -> ReLU -> Linear`` (2:4-pruned with ``prune_trained_model``,
no permutation): ``ffn`` is four BERT-large feed-forward blocks (1024 -> 4096 -> 1024) at 384 tokens (one
sequence) and 12288 tokens (32 sequences); ``llm`` is two blocks of an 8B-parameter LLM's MLP width (4096 ->
14336 -> 4096) at 16 tokens (decode) and 2048 tokens (prefill). The dense model is the same pruned model
before ``sparsify``; the sparse one is a deep copy after it (tuned: ``autotune=True``). Both run forward passes
under ``torch.no_grad()``:

- *eager*: one forward pass per sample, timed with CUDA events from the host's enqueue of the first kernel
  (what a Python loop over inputs sees, the host's cost included where it exceeds the GPU's);
- *graph*: the forward pass captured once in ``torch.cuda.graph`` and replayed (the GPU's time).

Times are medians of ``--repeat`` samples after warm-up; the two models alternate sample by sample, so clock
drift does not favour either. Each row also checks the sparse output against the dense one (FP16 products of
the same pruned weights: they agree within the accumulated rounding, reported as ``max_rel_diff``).
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import statistics
import sys

MODELS = {
    "ffn": {"width": 1024, "hidden": 4096, "blocks": 4, "tokens": (384, 12288)},
    "llm": {"width": 4096, "hidden": 14336, "blocks": 2, "tokens": (16, 2048)},
}


def _model(torch, spec: dict, seed: int):
    nn = torch.nn
    torch.manual_seed(seed)
    layers = []
    for _ in range(spec["blocks"]):
        layers += [nn.Linear(spec["width"], spec["hidden"]), nn.ReLU(), nn.Linear(spec["hidden"], spec["width"])]
    return nn.Sequential(*layers).cuda().half().eval()


def time_alternating(torch, fns: dict, repeat: int, warmup: int = 5) -> dict:
    """Median CUDA-event milliseconds of each function, sampled in alternation."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    times: dict = {name: [] for name in fns}
    for _ in range(repeat):
        for name, fn in fns.items():
            start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            torch.cuda.synchronize()
            start.record()
            fn()
            stop.record()
            stop.synchronize()
            times[name].append(start.elapsed_time(stop))
    return {name: float(statistics.median(t)) for name, t in times.items()}


def _graphed(torch, model, x):
    """``model(x)`` captured in a CUDA graph; returns the replay function."""
    static = x.clone()
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):
            model(static)  # first calls (tuning, compression, allocation) outside the capture
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        model(static)
    return graph.replay


def run(models: list[str], repeat: int) -> dict:
    import torch

    from pycusparselt import library_version
    from pycusparselt import torch as pst

    rows = []
    with torch.no_grad():
        for name in models:
            spec = MODELS[name]
            dense = _model(torch, spec, seed=0)
            pst.prune_trained_model(dense, permute=False)
            pst.remove_masks(dense)  # the weights stay pruned; no mask hooks in the timed passes
            sparse = copy.deepcopy(dense)
            report = pst.sparsify(sparse, "fp16", autotune=True)
            for tokens in spec["tokens"]:
                x = torch.randn(tokens, spec["width"], device="cuda", dtype=torch.float16)
                want, got = dense(x).float(), sparse(x).float()
                rel = float((got - want).abs().max() / want.abs().max().clamp_min(1e-6))
                eager = time_alternating(
                    torch, {"dense": lambda d=dense, x=x: d(x), "sparse": lambda s=sparse, x=x: s(x)}, repeat)
                graph = time_alternating(
                    torch, {"dense": _graphed(torch, dense, x), "sparse": _graphed(torch, sparse, x)}, repeat)
                rows.append({
                    "model": name, "tokens": tokens, "layers": len(report.replaced),
                    "eager_dense_ms": eager["dense"], "eager_sparse_ms": eager["sparse"],
                    "graph_dense_ms": graph["dense"], "graph_sparse_ms": graph["sparse"],
                    "eager_speedup": eager["dense"] / eager["sparse"],
                    "graph_speedup": graph["dense"] / graph["sparse"],
                    "max_rel_diff": rel,
                })
                print(markdown_row(rows[-1]), flush=True)
            del dense, sparse
            torch.cuda.empty_cache()
    props = torch.cuda.get_device_properties(0)
    environment = {
        "device": props.name, "torch": torch.__version__, "cuda": torch.version.cuda,
        "cusparselt": ".".join(map(str, library_version())), "python": platform.python_version(),
    }
    return {"environment": environment, "repeat": repeat, "rows": rows}


HEADER = ("| model | tokens | eager dense ms | eager sparse ms | eager speed-up | graph dense ms | graph sparse ms "
          "| graph speed-up |\n|---|---:|---:|---:|---:|---:|---:|---:|")


def markdown_row(row: dict) -> str:
    """One table row of a result."""
    return (f"| {row['model']} | {row['tokens']} | {row['eager_dense_ms']:.3f} | {row['eager_sparse_ms']:.3f} "
            f"| {row['eager_speedup']:.2f}x | {row['graph_dense_ms']:.3f} | {row['graph_sparse_ms']:.3f} "
            f"| {row['graph_speedup']:.2f}x |")


def markdown(results: dict) -> str:
    """The results as a markdown table, with the machine they ran on."""
    env = results["environment"]
    lines = [f"{env['device']}, PyTorch {env['torch']}, cuSPARSELt {env['cusparselt']}; medians of "
             f"{results['repeat']} samples.", "", HEADER]
    lines += [markdown_row(row) for row in results["rows"]]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", choices=sorted(MODELS), default=sorted(MODELS))
    parser.add_argument("--repeat", type=int, default=50, help="timed samples per case (median)")
    parser.add_argument("--json", help="write the results here")
    parser.add_argument("--report", metavar="JSON", help="print the table of saved results (no GPU needed)")
    args = parser.parse_args(argv)
    if args.report:
        with open(args.report, encoding="utf-8") as f:
            print(markdown(json.load(f)), end="")
        return 0
    try:
        import torch
    except ImportError:
        raise SystemExit("bench_torch_sparsify: needs PyTorch with a GPU (pip install torch)") from None
    if not torch.cuda.is_available():
        raise SystemExit("bench_torch_sparsify: PyTorch sees no GPU")
    print(HEADER, flush=True)
    results = run(args.models, args.repeat)
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump(results, f, indent=1)
    print()
    print(markdown(results), end="")
    return 0


if __name__ == "__main__":
    sys.exit(main())
