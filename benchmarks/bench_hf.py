"""Hugging Face ``transformers`` models sparsified with ``pycusparselt.torch.sparsify``, against the same pruned
models dense, on the GPU (random weights from configs: nothing is downloaded).

Usage::

    python benchmarks/bench_hf.py --json out.json [--models bert llama] [--modes eager graph compile generate
                                  generate-compiled] [--repeat 20]
    python benchmarks/bench_hf.py --report results.json      # the docs table again, no GPU needed

Models (FP16): ``bert`` is BERT-large (24 layers, hidden 1024, FFN 4096, 16 heads) at sequence 384 and batch 1, 8
and 32; ``llama`` a Llama-shaped causal LM (hidden 4096, MLP 11008, 32 heads, 4 layers, vocabulary 32000) at 1,
16, 128 and 2048 tokens. Every ``nn.Linear`` is pruned 2:4 (``prune_trained_model(permute=False)``): the dense
model is that pruned model, the sparse one a deep copy after ``sparsify(copy, "fp16")`` (tuned).

``--tune-budget S`` limits tuning to S seconds per problem (the default tunes every configuration; a plan costs
cuSPARSELt about 0.15 s per configuration tried).

Modes: ``eager`` (one forward per sample, CUDA events around it: the host's cost included), ``compile``
(``torch.compile``, default mode), ``graph`` (the forward captured in ``torch.cuda.graph`` and replayed),
``generate`` (``model.generate`` with the default cache, greedy, 32 new tokens after 16 prompt tokens, at
batch 1 and 8: tokens per second) and ``generate-compiled`` (the same with a static cache, which
``transformers`` compiles). Dense and sparse samples alternate; times are medians. ``rel_err`` is
``||sparse - dense|| / ||dense||`` of the last hidden state (BERT) or the logits (Llama).

``--merge-siblings`` sparsifies with ``merge_siblings=True``. The JSON records ``memory_up_to_16_rows`` for
the Llama (after its 1- and 16-token rows): the dense Linear weights' bytes, and the sparse layers' state and
``product_nbytes``.

The JSON also records ``first_forward``: seconds of the first forward at a new batch size (BERT-large, batch 8),
dense and sparse, after ``sparsify`` (the sparse one prepares and tunes its layers then).
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # also under python -P
from bench_torch_sparsify import time_alternating  # noqa: E402

BERT = {"hidden_size": 1024, "num_hidden_layers": 24, "num_attention_heads": 16, "intermediate_size": 4096}
LLAMA = {"hidden_size": 4096, "intermediate_size": 11008, "num_hidden_layers": 4, "num_attention_heads": 32,
         "num_key_value_heads": 32, "vocab_size": 32000}
SEQUENCE = 384
BERT_BATCHES = (1, 8, 32)
LLAMA_TOKENS = (1, 16, 128, 2048)
GENERATE_BATCHES = (1, 8)
PROMPT, NEW_TOKENS = 16, 32
MODES = ("eager", "compile", "graph", "generate", "generate-compiled")
MODEL_NAMES = {"bert": "bert-large", "llama": "llama-4x4096"}


def build_models(torch, transformers, name: str, tune_budget: float | None = None, merge: bool = False):
    """(dense, sparse, sparsify seconds): the pruned model and its sparsified deep copy."""
    import pycusparselt.torch as pst

    torch.manual_seed(0)
    with torch.device("cuda"):  # initialised on the GPU: seconds, where the CPU takes minutes for the Llama
        if name == "bert":
            model = transformers.BertModel(transformers.BertConfig(**BERT))
        else:
            model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**LLAMA))
    model = model.half().eval()
    pst.prune_trained_model(model, permute=False)
    pst.remove_masks(model)
    sparse = copy.deepcopy(model)
    began = time.perf_counter()
    pst.sparsify(sparse, "fp16", autotune=True if tune_budget is None else {"budget_s": tune_budget},
                 merge_siblings=merge)
    return model, sparse, time.perf_counter() - began


def _output(result):
    return result.last_hidden_state if hasattr(result, "last_hidden_state") else result.logits


def _graphed(torch, model, ids):
    """A replay of ``model(ids)`` captured in a CUDA graph (after the shape's first calls outside it)."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(2):
            model(ids)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = model(ids)
    return graph.replay, out


def _rel(torch, got, want) -> float:
    return float((got.float() - want.float()).norm() / want.float().norm())


def inputs(torch, name: str, size: int):
    if name == "bert":
        return torch.randint(0, 30000, (size, SEQUENCE), device="cuda")
    return torch.randint(0, LLAMA["vocab_size"], (1, size), device="cuda")


def weight_memory(torch, dense, sparse) -> dict:
    """Bytes of the Linear weights: the dense model's, and the sparse model's state and what its products hold
    beside it (``SparseLinear.product_nbytes``)."""
    import pycusparselt.torch as pst

    layers = [m for m in sparse.modules() if isinstance(m, pst.SparseLinear)]
    dense_bytes = sum(m.weight.numel() * m.weight.element_size() for m in dense.modules()
                      if isinstance(m, torch.nn.Linear))
    state = sum(m.values.numel() * m.values.element_size() + m.indices.numel() for m in layers)
    product = sum(m.product_nbytes for m in layers)
    backends: dict = {}  # "1-8" -> {"decode": layers, "cusparselt": layers}
    for m in layers:
        for (low, high), choice in m.small_batch_choices.items():
            counts = backends.setdefault(f"{low}-{high}", {})
            counts[choice.backend] = counts.get(choice.backend, 0) + 1
    return {"dense_bytes": dense_bytes, "sparse_state_bytes": state, "sparse_product_bytes": product,
            "sparse_over_dense": round((state + product) / dense_bytes, 4), "small_batch_backends": backends}


def _forward_rows(torch, name: str, dense, sparse, modes: list, repeat: int, keep, memory=None) -> None:
    key = "batch" if name == "bert" else "tokens"
    sizes = BERT_BATCHES if name == "bert" else LLAMA_TOKENS
    model_name = MODEL_NAMES[name]
    compiled = {}
    for size in sizes:
        ids = inputs(torch, name, size)
        for mode in [m for m in modes if m in ("eager", "compile", "graph")]:
            row = {"model": model_name, key: size, "mode": mode}
            try:
                with torch.no_grad():
                    if mode == "eager":
                        fns = {"dense": lambda ids=ids: dense(ids), "sparse": lambda ids=ids: sparse(ids)}
                        want, got = _output(dense(ids)), _output(sparse(ids))
                    elif mode == "compile":
                        if not compiled:
                            compiled.update(dense=torch.compile(dense), sparse=torch.compile(sparse))
                        fns = {k: (lambda m=m, ids=ids: m(ids)) for k, m in compiled.items()}
                        want, got = _output(compiled["dense"](ids)), _output(compiled["sparse"](ids))
                    else:
                        replay_d, out_d = _graphed(torch, dense, ids)
                        replay_s, out_s = _graphed(torch, sparse, ids)
                        fns = {"dense": replay_d, "sparse": replay_s}
                        replay_d(), replay_s()
                        want, got = _output(out_d), _output(out_s)
                    times = time_alternating(torch, fns, repeat, warmup=3)
                row.update(dense_ms=round(times["dense"], 4), sparse_ms=round(times["sparse"], 4),
                           speedup=round(times["dense"] / times["sparse"], 3), rel_err=_rel(torch, got, want))
            except Exception as exc:  # noqa: BLE001 - a mode that fails is a row that says why
                row["error"] = f"{type(exc).__name__}: {str(exc)[:300]}"
            print(json.dumps(row), flush=True)
            keep(row)
        if memory is not None and size == 16:  # every input so far of 1 to 16 rows
            memory(weight_memory(torch, dense, sparse))


def generate_options(torch, ids, mode: str) -> dict:
    """``generate()``'s arguments for a mode: greedy, NEW_TOKENS new tokens; a static cache for
    ``generate-compiled``."""
    options = dict(max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS, do_sample=False,
                   attention_mask=torch.ones_like(ids), pad_token_id=0)
    if mode == "generate-compiled":
        options["cache_implementation"] = "static"
    return options


def _generate_rows(torch, dense, sparse, modes: list, keep) -> None:
    for mode in [m for m in modes if m.startswith("generate")]:
        for batch in GENERATE_BATCHES:
            row = {"model": "llama-4x4096", "batch": batch, "mode": mode}
            ids = torch.randint(0, LLAMA["vocab_size"], (batch, PROMPT), device="cuda")
            options = generate_options(torch, ids, mode)
            try:
                samples: dict = {"dense": [], "sparse": []}
                outs = {}
                with torch.no_grad():
                    for m in (dense, sparse):  # warm-up: tuning and compilation
                        m.generate(ids, **options)
                    for _ in range(3):
                        for name, m in (("dense", dense), ("sparse", sparse)):
                            torch.cuda.synchronize()
                            began = time.perf_counter()
                            outs[name] = m.generate(ids, **options)
                            torch.cuda.synchronize()
                            samples[name].append(time.perf_counter() - began)
                tok = {k: batch * NEW_TOKENS / statistics.median(v) for k, v in samples.items()}
                row.update(dense_tok_s=round(tok["dense"], 1), sparse_tok_s=round(tok["sparse"], 1),
                           speedup=round(tok["sparse"] / tok["dense"], 3),
                           same_tokens=float((outs["dense"] == outs["sparse"]).float().mean()))
            except Exception as exc:  # noqa: BLE001
                row["error"] = f"{type(exc).__name__}: {str(exc)[:300]}"
            print(json.dumps(row), flush=True)
            keep(row)


def _first_forward(torch, dense, sparse, batch: int = 8) -> dict:
    """Seconds of the first forward at a batch size neither model has seen."""
    ids = inputs(torch, "bert", batch)
    result = {}
    with torch.no_grad():
        for name, model in (("dense", dense), ("sparse", sparse)):
            torch.cuda.synchronize()
            began = time.perf_counter()
            model(ids)
            torch.cuda.synchronize()
            result[f"{name}_s"] = round(time.perf_counter() - began, 3)
    print(json.dumps({"first_forward": result}), flush=True)
    return result


def save(results: dict, path: str | None) -> None:
    """Write ``results`` to ``path`` as JSON (nothing where ``path`` is None)."""
    if path:
        with open(path, "w") as f:
            json.dump(results, f, indent=1)


def environment(torch, transformers) -> dict:
    """What a result was measured on: the GPU, the libraries, Python and the date."""
    from pycusparselt import library_version

    return {"device": torch.cuda.get_device_name(), "torch": torch.__version__,
            "transformers": transformers.__version__, "cusparselt": ".".join(map(str, library_version())),
            "python": platform.python_version(), "date": time.strftime("%Y-%m-%d")}


def run(models: list, modes: list, repeat: int, path: str | None = None, tune_budget: float | None = None,
        command: str = "", merge: bool = False) -> dict:
    """The benchmark; with ``path``, the results so far are written there after each row (a run cut short keeps
    what it measured)."""
    import torch
    import transformers

    results = {**environment(torch, transformers), "repeat": repeat, "rows": [], "sparsify_s": {},
               "tune_budget_s": tune_budget, "merge_siblings": merge, "command": command}
    for name in models:
        dense, sparse, seconds = build_models(torch, transformers, name, tune_budget, merge)
        results["sparsify_s"][name] = round(seconds, 2)
        if name == "bert":
            results["first_forward"] = _first_forward(torch, dense, sparse)
        def keep(row: dict) -> None:
            results["rows"].append(row)
            save(results, path)

        def memory(found: dict) -> None:
            print(json.dumps({"memory_up_to_16_rows": found}), flush=True)
            results["memory_up_to_16_rows"] = found
            save(results, path)

        _forward_rows(torch, name, dense, sparse, modes, repeat, keep, memory if name == "llama" else None)
        if name == "llama":
            _generate_rows(torch, dense, sparse, modes, keep)
        del dense, sparse
        torch.cuda.empty_cache()
    return results


def planned_rows() -> list:
    """Every row the benchmark has, as (model, size key, size, mode): both models, every mode."""
    rows = [("bert-large", "batch", b, m) for m in ("eager", "compile", "graph") for b in BERT_BATCHES]
    rows += [("llama-4x4096", "tokens", t, m) for m in ("eager", "compile", "graph") for t in LLAMA_TOKENS]
    rows += [("llama-4x4096", "batch", b, m) for m in ("generate", "generate-compiled") for b in GENERATE_BATCHES]
    return rows


def not_measured(results: dict) -> list:
    """The planned rows a results file lacks (or holds as failures), grouped: ["bert-large compile (batch 1, 8,
    32)", ...]."""
    measured = {(r["model"], "batch" if "batch" in r else "tokens", r.get("batch", r.get("tokens")), r["mode"])
                for r in results["rows"] if "error" not in r}
    ran = {MODEL_NAMES[name] for name in results.get("sparsify_s", {})}  # the models this file's run built
    groups: dict = {}
    for model, key, size, mode in planned_rows():
        if model in ran and (model, key, size, mode) not in measured:
            groups.setdefault((model, mode, key), []).append(str(size))
    return [f"{model} {mode} (batch {', '.join(sizes)})" if key == "batch" else
            f"{model} {mode} ({', '.join(sizes)} tokens)" for (model, mode, key), sizes in groups.items()]


def caption(results: dict) -> str:
    """The docs table's caption."""
    budget = results.get("tune_budget_s")
    tuning = "tuned in full" if budget is None else f"tuned {budget:g} s per problem"
    if results.get("merge_siblings"):
        tuning += ", sibling projections merged"
    return (f"Hugging Face models on {results['device']}, PyTorch {results['torch']}, transformers "
            f"{results['transformers']}, cuSPARSELt {results['cusparselt']}; {tuning}; medians of "
            f"{results['repeat']} samples")


def table_rows(results: dict) -> list:
    """The docs table's rows: model, batch or tokens, mode, dense, sparse, speed-up, relative difference."""
    rows = []
    for row in results["rows"]:
        size = f"batch {row['batch']}" if "batch" in row else f"{row['tokens']} tokens"
        if "error" in row:
            rows.append([row["model"], size, row["mode"], "", "", f"failed: {row['error'].split(':')[0]}", ""])
        elif "dense_tok_s" in row:
            rows.append([row["model"], size, row["mode"], f"{row['dense_tok_s']:.1f} tok/s",
                         f"{row['sparse_tok_s']:.1f} tok/s", f"{row['speedup']:.2f}x",
                         f"{row['same_tokens']:.0%} same tokens"])
        else:
            rows.append([row["model"], size, row["mode"], f"{row['dense_ms']:.3f} ms", f"{row['sparse_ms']:.3f} ms",
                         f"{row['speedup']:.2f}x", f"{row['rel_err']:.1e}"])
    return rows


def report(results: dict) -> str:
    """The docs table (an RST csv-table) of a results JSON."""
    lines = [f".. csv-table:: {caption(results)}",
             "   :header: model, size, mode, dense, sparse, speed-up, rel. difference (or tokens alike)", ""]
    lines += ["   " + ", ".join(row) for row in table_rows(results)]
    memory = results.get("memory_up_to_16_rows")
    if memory:
        lines += ["", f"Linear weights of the Llama after its inputs of 1 and 16 tokens: dense {memory['dense_bytes']} "
                      f"bytes; sparse state {memory['sparse_state_bytes']} bytes and "
                      f"{memory['sparse_product_bytes']} bytes beside it ({memory['sparse_over_dense']:.4f} of dense)."]
    first = results.get("first_forward")
    if first:
        lines += ["", f"First forward of BERT-large at a new batch size (8), after ``sparsify``: dense "
                      f"{first['dense_s']} s, sparse {first['sparse_s']} s."]
    missing = not_measured(results)
    if missing:
        lines += ["", f"Not measured: {'; '.join(missing)}."]
    return "\n".join(lines)


def main(argv: list | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--json", help="write the results here")
    parser.add_argument("--report", help="print the docs table of this results JSON and exit")
    parser.add_argument("--models", nargs="+", default=["bert", "llama"], choices=["bert", "llama"])
    parser.add_argument("--modes", nargs="+", default=list(MODES), choices=MODES)
    parser.add_argument("--repeat", type=int, default=20)
    parser.add_argument("--tune-budget", type=float, default=None,
                        help="seconds of tuning per problem (default: every configuration)")
    parser.add_argument("--merge-siblings", action="store_true",
                        help="sparsify(merge_siblings=True): Q/K/V and gate/up as one product each")
    args = parser.parse_args(argv)
    if args.report:
        with open(args.report) as f:
            print(report(json.load(f)))
        return 0
    command = " ".join(["python", "benchmarks/bench_hf.py", *(sys.argv[1:] if argv is None else argv)])
    results = run(args.models, args.modes, args.repeat, args.json, args.tune_budget, command, args.merge_siblings)
    print(report(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
