"""Where a Hugging Face model's forward spends its GPU time, dense against sparse: GEMM kernels and the rest.

Usage::

    python benchmarks/profile_hf.py --json out.json [--tune-budget 0.3]

The models of ``bench_hf.py`` (BERT-large at batch 1 and 8, sequence 384; the Llama-shaped LM at 2048 tokens),
the pruned model dense and its sparsified copy, each forward run eagerly under ``torch.profiler`` after warm-up.
Per model, size and side: the kernels' summed GPU time per forward (``gpu_ms``), the part in GEMM kernels
(``gemm_ms``: cuBLAS, cuSPARSELt and the decode kernel), the rest (``other_ms``), the count of GPU activities
(``kernels``: kernels, copies and fills), and the host's time to enqueue one forward (``enqueue_ms``, no
synchronisation; medians of 10). ``bound`` gives the whole forward's speed-up if the sparse GEMMs ran ``k``
times as fast as the dense ones and the rest stayed as dense ran it: what the GEMMs alone can give the model.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # also under python -P
from bench_hf import build_models, environment, inputs, save  # noqa: E402

#: Kernel-name fragments of GEMMs: cuBLAS (nvjet, cutlass, gemm), cuSPARSELt (xmma sparse, nvjet ``_sp_``) and
#: the decode kernel.
GEMM_NAMES = ("gemm", "nvjet", "cutlass", "xmma")
CASES = {"bert": (1, 8), "llama": (2048,)}  # model -> batch sizes (BERT) or tokens (Llama)
PROFILED = 3


def is_gemm(name: str) -> bool:
    low = name.lower()
    if any(part in low for part in ("fmha", "flash", "attention")):  # attention kernels built on CUTLASS
        return False
    return any(part in low for part in GEMM_NAMES)


def _profile(torch, model, ids) -> dict:
    from torch.profiler import ProfilerActivity, profile

    hosts = []
    for _ in range(10):
        torch.cuda.synchronize()
        began = time.perf_counter()
        model(ids)
        hosts.append((time.perf_counter() - began) * 1e3)
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(PROFILED):
            model(ids)
        torch.cuda.synchronize()
    gemm = other = 0.0
    kernels = 0
    for event in prof.events():
        if event.device_type != torch.autograd.DeviceType.CUDA:
            continue
        kernels += 1
        if is_gemm(event.name):
            gemm += event.device_time
        else:
            other += event.device_time
    scale = 1e-3 / PROFILED  # us over PROFILED forwards -> ms per forward
    return {"gpu_ms": round((gemm + other) * scale, 4), "gemm_ms": round(gemm * scale, 4),
            "other_ms": round(other * scale, 4), "kernels": kernels // PROFILED,
            "enqueue_ms": round(statistics.median(hosts), 4)}


def bound(dense: dict, k: float) -> float:
    """The forward's speed-up with GEMMs ``k`` times as fast as dense's and the rest as dense's."""
    return round(dense["gpu_ms"] / (dense["gemm_ms"] / k + dense["other_ms"]), 3)


def run(tune_budget: float | None, command: str) -> dict:
    import torch
    import transformers

    results = {**environment(torch, transformers), "command": command, "tune_budget_s": tune_budget, "rows": []}
    with torch.no_grad():
        for name, sizes in CASES.items():
            dense, sparse = build_models(torch, transformers, name, tune_budget)[:2]
            for size in sizes:
                ids = inputs(torch, name, size)
                for model in (dense, sparse):
                    for _ in range(3):
                        model(ids)
                row = {"model": name, "size": size, "dense": _profile(torch, dense, ids),
                       "sparse": _profile(torch, sparse, ids)}
                row["gemm_speedup"] = round(row["dense"]["gemm_ms"] / row["sparse"]["gemm_ms"], 3)
                row["gpu_speedup"] = round(row["dense"]["gpu_ms"] / row["sparse"]["gpu_ms"], 3)
                row["bound"] = {str(k): bound(row["dense"], k) for k in (1.5, 1.7, 2.0)}
                print(json.dumps(row), flush=True)
                results["rows"].append(row)
            del dense, sparse  # one model on the GPU at a time
            torch.cuda.empty_cache()
    return results


def main(argv: list | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--json", help="write the results here")
    parser.add_argument("--tune-budget", type=float, default=None, help="tuning seconds per problem")
    args = parser.parse_args(argv)
    command = " ".join(["python", "benchmarks/profile_hf.py", *(sys.argv[1:] if argv is None else argv)])
    save(run(args.tune_budget, command), args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
