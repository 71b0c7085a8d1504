"""Where a Hugging Face model's forward spends its GPU time, dense against sparse: GEMM kernels and the rest.

Usage::

    python benchmarks/profile_hf.py --json out.json [--tune-budget 0.3] [--cases bert:eager:1,8 ...]

The models of ``bench_hf.py``, the pruned model dense and its sparsified copy, profiled under ``torch.profiler``
after warm-up. A case is ``model:mode:sizes``; the default cases are BERT-large eager at batch 1 and 8
(sequence 384), BERT-large under ``torch.compile`` at batch 8 and 32, the Llama-shaped LM eager at 2048 tokens,
and the Llama's ``generate()`` with a static cache (compiled by ``transformers``) at batch 1.

Forward modes (``eager``, ``compile``: ``torch.compile(dynamic=False)``, compiled for each size), per side: the
kernels' summed GPU time per forward (``gpu_ms``), the part in GEMM kernels (``gemm_ms``: cuBLAS, cuSPARSELt
and the decode kernel), the rest (``other_ms``), the count of GPU activities (``kernels``: kernels, copies and
fills), the host's time to enqueue one forward (``enqueue_ms``, no synchronisation; medians of 30, dense and
sparse alternating; the results of 2026-12-06 took 10 per side, one side after the other) and the kernels
that took longest (``top``). ``bound`` gives the whole forward's speed-up if the sparse GEMMs ran ``k`` times
as fast as the dense ones and the rest stayed as dense ran it: what the GEMMs alone can give the model.

``generate-compiled`` (``bench_hf.py``'s mode: 16 prompt tokens, 32 new ones): per side, the wall time of one
``generate()`` (``wall_ms``, synchronised, median of 5, dense and sparse alternating; the results of
2026-12-06 took 3 per side, one side after the other) beside the kernels' summed time in a profiled one;
``idle_ms`` estimates the wall time the kernels leave (the host's work in the generation loop, in which the
GPU waits); ``ms_per_step`` is the wall time per step, one new token for each sequence of the batch, the
prompt's forward included (``ms_per_token`` in the results of 2026-12-06, at batch 1); ``bound`` is the wall
time's speed-up with GEMMs ``k`` times as fast and the rest, idle time included, as dense's.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # also under python -P
from bench_hf import (  # noqa: E402
    LLAMA, NEW_TOKENS, PROMPT, build_models, environment, generate_options, inputs, save)

#: Kernel-name fragments of GEMMs: cuBLAS (nvjet, cutlass, gemm, and its split-K reduction, which the results
#: of 2026-12-06 counted with the rest), cuSPARSELt (xmma sparse, nvjet ``_sp_``) and the decode kernel.
GEMM_NAMES = ("gemm", "nvjet", "cutlass", "xmma", "splitkreduce")
#: model:mode:sizes (batch sizes for BERT and generate, tokens for the Llama's forward)
CASES = ("bert:eager:1,8", "bert:compile:8,32", "llama:eager:2048", "llama:generate-compiled:1")
MODES = ("eager", "compile", "generate-compiled")
PROFILED = 3
ENQUEUE_SAMPLES = 30
GENERATE_SAMPLES = 5
TOP = 6


def is_gemm(name: str) -> bool:
    low = name.lower()
    if any(part in low for part in ("fmha", "flash", "attention")):  # attention kernels built on CUTLASS
        return False
    return any(part in low for part in GEMM_NAMES)


def _kernel_times(torch, prof, runs: int) -> dict:
    """GPU activities of a profile, per run: summed time, GEMMs' part, the rest, their count, the longest."""
    gemm = other = 0.0
    kernels = 0
    by_name: dict = {}
    for event in prof.events():
        if event.device_type != torch.autograd.DeviceType.CUDA:
            continue
        kernels += 1
        by_name[event.name] = by_name.get(event.name, 0.0) + event.device_time
        if is_gemm(event.name):
            gemm += event.device_time
        else:
            other += event.device_time
    scale = 1e-3 / runs  # us over the runs -> ms per run
    top = sorted(by_name.items(), key=lambda item: -item[1])[:TOP]
    return {"gpu_ms": round((gemm + other) * scale, 4), "gemm_ms": round(gemm * scale, 4),
            "other_ms": round(other * scale, 4), "kernels": kernels // runs,
            "top": [[name[:100], round(t * scale, 4)] for name, t in top]}


def _alternating_ms(torch, calls: dict, samples: int, finished: bool) -> dict:
    """Median host milliseconds of each call, per name: ``samples`` each, the calls alternating (the host's speed
    drifts; alternation gives every call the same), until the call returns or, where ``finished``, until the
    GPU has finished its work too."""
    times: dict = {name: [] for name in calls}
    for _ in range(samples):
        for name, call in calls.items():
            torch.cuda.synchronize()
            began = time.perf_counter()
            call()
            if finished:
                torch.cuda.synchronize()
            times[name].append((time.perf_counter() - began) * 1e3)
    torch.cuda.synchronize()
    return {name: statistics.median(found) for name, found in times.items()}


def _enqueue_ms(torch, models: dict, ids, samples: int = ENQUEUE_SAMPLES) -> dict:
    """The host's milliseconds to enqueue one forward (no synchronisation inside), per model: medians of
    ``samples``, the models alternating."""
    found = _alternating_ms(torch, {name: (lambda m=model: m(ids)) for name, model in models.items()}, samples,
                            finished=False)
    return {name: round(ms, 4) for name, ms in found.items()}


def _profile(torch, model, ids) -> dict:
    from torch.profiler import ProfilerActivity, profile

    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(PROFILED):
            model(ids)
        torch.cuda.synchronize()
    return _kernel_times(torch, prof, PROFILED)


def _generate_walls(torch, models: dict, ids, options: dict, samples: int = GENERATE_SAMPLES) -> dict:
    """Milliseconds of one ``generate()`` per model (synchronised): medians of ``samples``, the models
    alternating."""
    return _alternating_ms(torch, {name: (lambda m=model: m.generate(ids, **options))
                                   for name, model in models.items()}, samples, finished=True)


def _profile_generate(torch, model, ids, options: dict, wall: float) -> dict:
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        model.generate(ids, **options)
        torch.cuda.synchronize()
    return generation_figures(_kernel_times(torch, prof, 1), wall, steps=NEW_TOKENS)


def generation_figures(kernels: dict, wall: float, steps: int) -> dict:
    """A generation's figures from its kernels' times and its wall time: ``idle_ms`` estimates the time the GPU
    waits on the host as the wall time less the kernels' summed time (of another, profiled generation; the
    model's kernels run on one stream, one after the other); ``ms_per_step`` is the wall time per step (one
    new token for each sequence of the batch; the prompt's forward included)."""
    return {"wall_ms": round(wall, 4), **kernels, "idle_ms": round(wall - kernels["gpu_ms"], 4),
            "ms_per_step": round(wall / steps, 4)}


def bound(dense: dict, k: float) -> float:
    """The speed-up with GEMMs ``k`` times as fast as dense's and the rest as dense's: of the kernels' time, or
    of the wall time where ``dense`` has one (``generate()``: the GPU's idle time is part of the rest)."""
    total = dense.get("wall_ms", dense["gpu_ms"])
    return round(total / (total - dense["gemm_ms"] + dense["gemm_ms"] / k), 3)


def parse_case(case: str) -> tuple:
    """``"bert:compile:8,32"`` -> ("bert", "compile", (8, 32))."""
    try:
        name, mode, sizes = case.split(":")
        parsed = (name, mode, tuple(int(size) for size in sizes.split(",")))
    except ValueError:
        raise ValueError(f"case: expected model:mode:sizes such as bert:eager:1,8, got {case!r}") from None
    if min(parsed[2]) <= 0:
        raise ValueError(f"case: expected positive sizes, got {case!r}")
    if name not in ("bert", "llama") or mode not in MODES or (mode == "generate-compiled" and name != "llama"):
        raise ValueError(f"case: expected a model of bert, llama and a mode of {', '.join(MODES)} "
                         f"(generate-compiled: llama only), got {case!r}")
    return parsed


def _row(torch, name: str, mode: str, size: int, dense, sparse) -> dict:
    if mode == "generate-compiled":
        ids = torch.randint(0, LLAMA["vocab_size"], (size, PROMPT), device="cuda")
        options = generate_options(torch, ids, mode)
        for model in (dense, sparse):  # tuning, compilation and CUDA graph capture
            for _ in range(2):
                model.generate(ids, **options)
        walls = _generate_walls(torch, {"dense": dense, "sparse": sparse}, ids, options)
        sides = {side: _profile_generate(torch, model, ids, options, walls[side])
                 for side, model in (("dense", dense), ("sparse", sparse))}
        speed = {"wall_speedup": round(sides["dense"]["wall_ms"] / sides["sparse"]["wall_ms"], 3)}
    else:
        ids = inputs(torch, name, size)
        if mode == "compile":
            torch._dynamo.reset()  # each size compiled for itself, as a model serving one shape is
            dense, sparse = torch.compile(dense, dynamic=False), torch.compile(sparse, dynamic=False)
        for model in (dense, sparse):
            for _ in range(3):
                model(ids)
        enqueue = _enqueue_ms(torch, {"dense": dense, "sparse": sparse}, ids)
        sides = {side: {**_profile(torch, model, ids), "enqueue_ms": enqueue[side]}
                 for side, model in (("dense", dense), ("sparse", sparse))}
        speed = {}
    row = {"model": name, "mode": mode, "size": size, **sides, **speed,
           "gemm_speedup": round(sides["dense"]["gemm_ms"] / sides["sparse"]["gemm_ms"], 3),
           "gpu_speedup": round(sides["dense"]["gpu_ms"] / sides["sparse"]["gpu_ms"], 3),
           "bound": {str(k): bound(sides["dense"], k) for k in (1.5, 1.7, 2.0)}}
    return row


def run(cases: list, tune_budget: float | None, command: str, path: str | None = None) -> dict:
    """The profile; with ``path``, the results so far are written there after each row (a case that fails is a
    row that says why)."""
    import torch
    import transformers

    results = {**environment(torch, transformers), "command": command, "tune_budget_s": tune_budget, "rows": []}
    parsed = [parse_case(case) for case in cases]
    with torch.no_grad():
        for name in dict.fromkeys(case[0] for case in parsed):
            dense, sparse = build_models(torch, transformers, name, tune_budget)[:2]
            for _, mode, sizes in [case for case in parsed if case[0] == name]:
                for size in sizes:
                    try:
                        row = _row(torch, name, mode, size, dense, sparse)
                    except Exception as exc:  # noqa: BLE001 - the other cases still run
                        row = {"model": name, "mode": mode, "size": size,
                               "error": f"{type(exc).__name__}: {str(exc)[:300]}"}
                    print(json.dumps(row), flush=True)
                    results["rows"].append(row)
                    save(results, path)
            del dense, sparse  # one model on the GPU at a time
            torch._dynamo.reset()
            torch.cuda.empty_cache()
    return results


def main(argv: list | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--json", help="write the results here")
    parser.add_argument("--tune-budget", type=float, default=None, help="tuning seconds per problem")
    parser.add_argument("--cases", nargs="+", default=list(CASES), help="model:mode:sizes (default: %(default)s)")
    args = parser.parse_args(argv)
    for case in args.cases:
        try:
            parse_case(case)
        except ValueError as exc:
            parser.error(str(exc))
    command = " ".join(["python", "benchmarks/profile_hf.py", *(sys.argv[1:] if argv is None else argv)])
    run(args.cases, args.tune_budget, command, args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
