"""End-to-end inference: 2:4 sparse layer stacks against dense, at the batch sizes served, eager and captured.

What a user runs, timed whole (CUDA events around the stack, median of ``--repeat`` runs, all variants of one
batch size side by side in one process):

- **bert-large-ffn**: ``--bert-blocks`` feed-forward blocks of BERT-large (1024 -> 4096 -> 1024, bias, ReLU;
  sequence 384) at batch 1, 8 and 32 sequences; variants ``dense-fp16`` (PyTorch ``addmm`` with cuBLASLt's
  bias+ReLU epilogue), ``dense-int8`` (the faster of ``cublasGemmEx`` int8 and ``torch._int_mm``, each with one
  fused requantization kernel per GEMM), ``sparse-fp16``, ``sparse-int8`` (int8 chained between fc1 and fc2)
  and ``sparse-fp8`` (E4M3) through :class:`pycusparselt.SparseLinear`; the layers and weights of
  ``benchmarks/bench_bert_ffn.py``.
- **llm-decode**: ``--llm-blocks`` MLP blocks 4096 -> 11008 -> 4096 (ReLU) at M = 1, 4, 16 and 64 tokens;
  ``dense-fp16`` (``torch.nn.functional.linear``) and ``sparse-fp16`` (SparseLinear on PyTorch tensors).

Each variant runs eagerly (``graph: false``) and as one CUDA graph of the whole stack (``graph: true``:
:func:`pycusparselt.capture`, which uses ``torch.cuda.graph`` for PyTorch tensors). Then the per-layer host
cost: wall time per call of one layer in a loop with one synchronisation at the end.

``python benchmarks/bench_inference.py --json benchmarks/results/inference_<gpu>_<date>.json``
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from typing import Any, Callable

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bench_bert_ffn as bert  # noqa: E402  (the BERT FFN stack's weights, calibration and dense variants)

LLM_HIDDEN, LLM_FFN = 4096, 11008
HOST_SHAPES = [(1, 4096, 1024), (16, 11008, 4096), (384, 4096, 1024), (384, 1024, 4096), (3072, 4096, 1024)]


#: Median milliseconds of ``fn()`` between CUDA events on the legacy default stream (CuPy's and PyTorch's current
#: stream here): the BERT benchmark's timer.
time_ms = bert._time_ms


def host_us(fn: Callable[[], Any], calls: int = 300) -> float:
    """Wall microseconds per call over a loop with one synchronisation at the end: the host's cost where it
    exceeds the GPU's time (then the GPU idles), the GPU's otherwise."""
    import cupy as cp

    for _ in range(20):
        fn()
    cp.cuda.Device().synchronize()
    t0 = time.perf_counter()
    for _ in range(calls):
        fn()
    cp.cuda.Device().synchronize()
    return (time.perf_counter() - t0) / calls * 1e6


#: Called after every row (writes the JSON so far: a crash keeps the rows measured before it).
_checkpoint: Callable[[], None] = lambda: None  # noqa: E731


def _row(rows: list, model: str, batch: int, variant: str, graph: bool, ms: float, **extra: Any) -> None:
    rows.append({"model": model, "batch": batch, "variant": variant, "graph": graph, "ms": ms, **extra})
    _checkpoint()
    print(f"  {model:15s} batch {batch:4d} {variant:12s} {'graph' if graph else 'eager':5s} {ms:9.3f} ms", flush=True)


def _both(rows, model, batch, variant, fn, x, repeat, **extra) -> None:
    """Time ``fn(x)`` eagerly and as a captured graph of the whole stack."""
    _row(rows, model, batch, variant, False, time_ms(lambda: fn(x), repeat), **extra)
    _capture_row(rows, model, batch, variant, fn, x, repeat, **extra)


def _capture_row(rows, model, batch, variant, fn, x, repeat, **extra) -> None:
    """Time ``fn(x)`` captured whole in one CUDA graph."""
    import pycusparselt as psl

    try:
        graph = psl.capture(fn, x)
    except Exception as exc:  # noqa: BLE001 - e.g. CuPy refuses cuBLAS calls during capture: reported
        rows.append({"model": model, "batch": batch, "variant": variant, "graph": True, "ms": None,
                     "error": f"{type(exc).__name__}: {exc}", **extra})
        print(f"  {model:15s} batch {batch:4d} {variant:12s} graph not capturable: {exc}", flush=True)
        return
    _row(rows, model, batch, variant, True, time_ms(graph.replay, repeat), **extra)
    graph.close()


# -- BERT-large FFN ------------------------------------------------------------------------------------------


def bench_bert(blocks: int, batches: list[int], repeat: int, tune_budget: float, rows: list) -> dict:
    import cupy as cp
    import torch

    stack = bert.Stack(blocks, tune_budget=tune_budget)
    rng = cp.random.default_rng(1)
    calibration = rng.standard_normal((2 * bert.SEQ, bert.HIDDEN), dtype=cp.float32).astype(cp.float16)
    t0 = time.perf_counter()
    stack.build(calibration)
    build_s = time.perf_counter() - t0
    tw = [[torch.from_dlpack(blk[k]) for k in ("w1", "b1", "w2", "b2")] for blk in stack.blocks]

    def dense_fp16(t: Any) -> Any:
        for w1, b1, w2, b2 in tw:
            t = torch.addmm(b2, torch._addmm_activation(b1, t, w1.t()), w2.t())
        return t

    errors: dict[str, float] = {}
    configs: dict[str, list] = {}
    for batch in batches:
        x = rng.standard_normal((batch * bert.SEQ, bert.HIDDEN), dtype=cp.float32).astype(cp.float16)
        xt = torch.from_dlpack(x)
        t0 = time.perf_counter()
        for mode in ("fp16", "int8", "fp8"):
            stack.tune(mode, x)
        tune_s = time.perf_counter() - t0
        ref = stack.reference(x, "pruned")
        for mode in ("fp16", "int8", "fp8"):
            errors[f"sparse-{mode}@{batch}"] = bert._rel_error(stack.sparse(mode, x), ref)
            configs[f"sparse-{mode}@{batch}"] = [layer.tuned_configs for layer in stack.blocks[0][mode]]
        dense_ref = stack.reference(x, "dense")
        errors[f"dense-int8@{batch}"] = bert._rel_error(cp.from_dlpack(stack.dense_int8_tensors(xt)), dense_ref)
        errors[f"dense-fp16@{batch}"] = bert._rel_error(cp.from_dlpack(dense_fp16(xt)), dense_ref)
        _both(rows, "bert-large-ffn", batch, "dense-fp16", dense_fp16, xt, repeat)
        # dense INT8 eager: the faster of cublasGemmEx (CuPy) and torch._int_mm; captured: torch._int_mm on
        # tensors (CuPy refuses cuBLAS calls during capture)
        int8 = {"cublas": time_ms(lambda x=x: stack.dense_int8(x, "cublas"), repeat),
                "torch": time_ms(lambda xt=xt: stack.dense_int8_tensors(xt), repeat)}
        best = min(int8, key=int8.get)
        _row(rows, "bert-large-ffn", batch, "dense-int8", False, int8[best], impl=best, impls_ms=int8)
        _capture_row(rows, "bert-large-ffn", batch, "dense-int8", stack.dense_int8_tensors, xt, repeat, impl="torch")
        for mode in ("fp16", "int8", "fp8"):
            _both(rows, "bert-large-ffn", batch, f"sparse-{mode}", lambda v, mode=mode: stack.sparse(mode, v), x,
                  repeat, prepare_s=round(tune_s, 1))
        _both(rows, "bert-large-ffn", batch, "sparse-fp16-torch", lambda v: stack.sparse("fp16", v), xt, repeat)
    return {"build_s": build_s, "rel_error": errors, "configs": configs}


# -- LLM decode ----------------------------------------------------------------------------------------------


def _two_four(rng: Any, shape: tuple, scale: float) -> Any:
    """A random 2:4 float16 weight made on the GPU (the 2 largest magnitudes of every 4 along the inputs)."""
    import cupy as cp

    w = (rng.standard_normal(shape, dtype=cp.float32) * scale).reshape(-1, 4)
    rank = cp.argsort(cp.argsort(cp.abs(w), axis=1), axis=1)  # 0 for the smallest magnitude of each group
    w[rank < 2] = 0
    return w.reshape(shape).astype(cp.float16)


def bench_llm(blocks: int, tokens: list[int], repeat: int, tune_budget: float, rows: list) -> dict:
    import cupy as cp
    import torch

    import pycusparselt as psl

    rng = cp.random.default_rng(2)
    layers, dense = [], []
    t0 = time.perf_counter()
    for _ in range(blocks):
        w1 = _two_four(rng, (LLM_FFN, LLM_HIDDEN), LLM_HIDDEN ** -0.5)
        w2 = _two_four(rng, (LLM_HIDDEN, LLM_FFN), LLM_FFN ** -0.5)
        b1 = (0.1 * rng.standard_normal(LLM_FFN, dtype=cp.float32)).astype(cp.float16)
        b2 = (0.1 * rng.standard_normal(LLM_HIDDEN, dtype=cp.float32)).astype(cp.float16)
        t = {"budget_s": tune_budget}
        layers.append((psl.SparseLinear(w1, b1, prune=None, activation="relu", autotune=t),
                       psl.SparseLinear(w2, b2, prune=None, autotune=t)))
        dense.append([torch.from_dlpack(a) for a in (w1, b1, w2, b2)])
    build_s = time.perf_counter() - t0
    F = torch.nn.functional

    def dense_fp16(t: Any) -> Any:
        for w1, b1, w2, b2 in dense:
            t = F.linear(torch.relu(F.linear(t, w1, b1)), w2, b2)
        return t

    def sparse_fp16(t: Any) -> Any:
        for fc1, fc2 in layers:
            t = fc2(fc1(t))
        return t

    errors = {}
    for m in tokens:
        x = torch.randn(m, LLM_HIDDEN, device="cuda", dtype=torch.float16)
        t0 = time.perf_counter()
        fc1, fc2 = layers[0]
        fc2(fc1(x))
        for pair in layers[1:]:
            for layer, tuned in zip(pair, (fc1, fc2), strict=True):
                layer.tuned_configs = tuned.tuned_configs
        sparse_fp16(x)
        prepare_s = time.perf_counter() - t0
        y, want = sparse_fp16(x).float(), dense_fp16(x).float()  # noqa: B023 (called in this iteration)  # the same 2:4 weights: the same function
        errors[f"sparse-fp16@{m}"] = float((y - want).abs().max() / want.abs().max())
        _both(rows, "llm-decode", m, "dense-fp16", dense_fp16, x, repeat)
        _both(rows, "llm-decode", m, "sparse-fp16", sparse_fp16, x, repeat, prepare_s=round(prepare_s, 1))
    return {"build_s": build_s, "rel_error": errors,
            "compressed_bytes_per_layer": [layers[0][0].compressed_nbytes, layers[0][1].compressed_nbytes]}


# -- per-layer host cost -------------------------------------------------------------------------------------


def bench_host(tune_budget: float) -> list[dict]:
    import cupy as cp

    rng = cp.random.default_rng(3)
    table = []
    for m, out_f, in_f in HOST_SHAPES:
        entry = _host_row(rng, m, out_f, in_f, tune_budget)
        table.append(entry)
        print("  host " + " ".join(f"{k}={v:.1f}" if isinstance(v, float) else f"{k}={v}" for k, v in entry.items()),
              flush=True)
    return table


def _host_row(rng: Any, m: int, out_f: int, in_f: int, tune_budget: float) -> dict:
    import cupy as cp
    import torch

    import pycusparselt as psl
    from pycusparselt.nn.linear import SMALL_BATCH_ROWS

    w = _two_four(rng, (out_f, in_f), in_f ** -0.5)
    b = (0.1 * rng.standard_normal(out_f, dtype=cp.float32)).astype(cp.float16)
    x = rng.standard_normal((m, in_f), dtype=cp.float32).astype(cp.float16)
    xt = torch.from_dlpack(x)
    layer = psl.SparseLinear(w, b, prune=None, activation="relu", autotune={"budget_s": tune_budget})
    out = cp.empty((m, out_f), cp.float16)
    layer(x)
    cfg = layer.tuned_configs[0]["config"]
    # the bound call of a plan with the layer's configuration (padded to 16 rows as the layer pads)
    rows = max(m, SMALL_BATCH_ROWS)
    xp = cp.zeros((rows, in_f), cp.float16)
    xp[:m] = x
    plan = psl.SparseMatmulPlan(xp, w.T, sparse="b", bias=True, activation="relu")
    plan.config = psl.PlanConfig(**cfg)
    comp = plan.compress(w.T)
    bound = plan.bind(xp, comp, bias=b)
    calls = 10

    def ten(v: Any) -> None:
        for _ in range(calls):
            layer(v, out=out)

    graph = psl.capture(ten, x)
    wt, tb = torch.from_dlpack(w), torch.from_dlpack(b)
    entry = {
        "shape": [m, out_f, in_f],
        "layer_us": host_us(lambda: layer(x)),
        "layer_out_us": host_us(lambda: layer(x, out=out)),
        "layer_torch_us": host_us(lambda: layer(xt)),
        "bound_us": host_us(bound),
        "graph_per_gemm_us": host_us(graph.replay, 100) / calls,
        "dense_cupy_us": host_us(lambda: cp.maximum(x @ w.T + b, 0)),
        "dense_torch_us": host_us(lambda: torch.relu(torch.nn.functional.linear(xt, wt, tb))),
    }
    graph.close()
    comp.close()
    plan.close()
    layer.close()
    return entry


def _isolated(args: argparse.Namespace, argv: list[str]) -> int:
    """``--isolate``: one process per (part, batch size), results merged into one JSON. A process that dies
    (an error left sticky on the device) costs its own rows only; they are reported with its exit status."""
    import subprocess
    import tempfile

    base = [a for a in argv if a != "--isolate"]
    runs = []
    for part in args.parts:
        sizes = {"bert": ("--batches", args.batches), "llm": ("--tokens", args.tokens)}.get(part)
        for size in ([None] if sizes is None else sizes[1]):
            extra = ["--parts", part] + ([] if size is None else [sizes[0], str(size)])
            runs.append((part, size, extra))
    merged: dict[str, Any] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for i, (part, size, extra) in enumerate(runs):
            path = os.path.join(tmp, f"{i}.json")
            # later flags win: the part and size given here replace the command line's
            cmd = [sys.executable, os.path.abspath(__file__), *base, *extra, "--json", path]
            rc = subprocess.run(cmd).returncode
            got = json.load(open(path)) if os.path.exists(path) else {"rows": []}
            if not merged:
                merged.update(rows=[], host=[], isolated=True)
            for k, v in got.items():  # the machine's description, from the first run that wrote one
                if k not in ("rows", "host", "bert", "llm", "seconds"):
                    merged.setdefault(k, v)
            merged["rows"] += got.get("rows", [])
            merged["host"] += got.get("host", [])
            for name in ("bert", "llm"):
                if name in got:
                    into = merged.setdefault(name, {})
                    for k, v in got[name].items():
                        if isinstance(v, dict):
                            into.setdefault(k, {}).update(v)
                        else:
                            into.setdefault(k, v)
            if rc != 0:
                merged.setdefault("failed_runs", []).append({"part": part, "size": size, "returncode": rc})
                print(f"  {part} {size}: the process ended with status {rc}", flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(merged, f, indent=1)
    return 0 if "failed_runs" not in merged else 1


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bert-blocks", type=int, default=24)
    parser.add_argument("--llm-blocks", type=int, default=32)
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--tokens", type=int, nargs="+", default=[1, 4, 16, 64])
    parser.add_argument("--repeat", type=int, default=20)
    parser.add_argument("--tune-budget", type=float, default=2.0, help="seconds of tuning per layer shape")
    parser.add_argument("--parts", nargs="+", default=["host", "llm", "bert"], choices=["host", "llm", "bert"])
    parser.add_argument("--json", default=None)
    parser.add_argument("--isolate", action="store_true",
                        help="run each part and batch size in a process of its own and merge the results")
    args = parser.parse_args(argv)
    if args.isolate:
        return _isolated(args, argv if argv is not None else sys.argv[1:])

    import cupy as cp
    import torch

    import pycusparselt as psl

    props = cp.cuda.runtime.getDeviceProperties(cp.cuda.Device().id)
    name = props["name"].decode() if isinstance(props["name"], bytes) else str(props["name"])
    result: dict[str, Any] = {
        "benchmark": "inference", "device": name, "cusparselt": ".".join(map(str, psl.library_version())),
        "torch": torch.__version__, "cupy": cp.__version__, "python": platform.python_version(),
        "bert_blocks": args.bert_blocks, "llm_blocks": args.llm_blocks, "repeat": args.repeat,
        "tune_budget_s": args.tune_budget, "rows": [], "host": [],
    }
    global _checkpoint

    def checkpoint() -> None:
        if args.json:
            with open(args.json, "w") as f:
                json.dump(result, f, indent=1)

    _checkpoint = checkpoint
    t0 = time.perf_counter()
    if "host" in args.parts:
        result["host"] = bench_host(args.tune_budget)
    if "llm" in args.parts:
        result["llm"] = bench_llm(args.llm_blocks, args.tokens, args.repeat, args.tune_budget, result["rows"])
        torch.cuda.empty_cache()
        cp.get_default_memory_pool().free_all_blocks()
    if "bert" in args.parts:
        result["bert"] = bench_bert(args.bert_blocks, args.batches, args.repeat, args.tune_budget, result["rows"])
    result["seconds"] = time.perf_counter() - t0
    print(f"{result['device']}, cuSPARSELt {result['cusparselt']}, torch {result['torch']}: {result['seconds']:.0f} s")
    checkpoint()
    return 0


if __name__ == "__main__":
    sys.exit(main())
