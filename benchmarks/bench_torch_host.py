"""Host time per eager call: ``pycusparselt.torch.SparseLinear`` against ``nn.Linear`` (``F.linear``), on the GPU.

Usage::

    python benchmarks/bench_torch_host.py [--json out.json] [--features 1024] [--calls 2000]

A (features x features) FP16 layer with bias, called eagerly on inputs of 1, 16 and 384 rows (prepared: after
its first call with that size). The host's microseconds per call are the wall time of ``calls`` back-to-back
calls divided by ``calls``: the module, ``F.linear``, ``nn.Linear`` and ``native`` (the checked call of the
:class:`pycusparselt.SparseLinear` beneath the module, which its prepared calls skip); the ``_3d`` columns call
the modules on the same input shaped (1, rows, features), as a model's layers are called. ``--tune-budget``
tunes the sparse layer first (the configuration decides how much host work cuSPARSELt's launch does). Each
product's GPU time (replayed from a CUDA graph) is reported beside: where it exceeds the host's, the GPU set the
pace and the host figure is a bound. Columns ending ``_fresh`` call on a new tensor each time (a clone, whose cost
they include), as an eager model's activations come. Medians of 5 rounds, the callables alternating.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time

ROWS = (1, 16, 384)


def _host_us(fn, x, calls: int) -> float:
    import torch

    torch.cuda.synchronize()
    began = time.perf_counter()
    for _ in range(calls):
        fn(x)
    elapsed = time.perf_counter() - began
    torch.cuda.synchronize()
    return elapsed / calls * 1e6


def _gpu_us(fn, x, calls: int) -> float:
    import torch

    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    graph = torch.cuda.CUDAGraph()
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        fn(x)  # prepares the capture stream's product outside the capture
    torch.cuda.current_stream().wait_stream(stream)
    with torch.cuda.graph(graph, stream=stream):
        for _ in range(20):
            fn(x)
    graph.replay()
    start.record()
    for _ in range(calls // 20):
        graph.replay()
    end.record()
    end.synchronize()
    return start.elapsed_time(end) * 1e3 / (calls // 20 * 20)


def run(features: int, calls: int, command: str = "", tune_budget: float | None = None) -> dict:
    import torch

    import pycusparselt.torch as pst

    torch.manual_seed(0)
    dense = torch.nn.Linear(features, features).cuda().half()
    pst.prune_trained_model(torch.nn.Sequential(dense), permute=False)
    sparse = pst.SparseLinear.from_dense(dense.weight, dense.bias, prune=None, autotune=False if tune_budget is None
                                         else {"budget_s": tune_budget}).cuda()
    from pycusparselt import library_version

    results = {"device": torch.cuda.get_device_name(), "torch": torch.__version__,
               "cusparselt": ".".join(map(str, library_version())), "date": time.strftime("%Y-%m-%d"),
               "command": command, "features": features, "calls": calls, "tune_budget_s": tune_budget, "rows": []}
    with torch.no_grad():
        for rows in ROWS:
            x = torch.randn(rows, features, device="cuda", dtype=torch.float16)
            native = sparse.native()
            x3 = x.view(1, rows, features)
            fns = {"dense": (dense, x), "sparse": (sparse, x), "f_linear": (lambda t: torch.nn.functional.linear(
                t, dense.weight, dense.bias), x), "native": (native, x),  # native: the checked call the module wraps
                "dense_3d": (dense, x3), "sparse_3d": (sparse, x3)}
            for fn, arg in fns.values():
                for _ in range(10):
                    fn(arg)
            # the same callables on a new tensor each call (as an eager model's activations come), the clone's
            # cost included in every column
            fns.update({f"{name}_fresh": ((lambda t, fn=fn: fn(t.clone())), arg)
                        for name, (fn, arg) in list(fns.items()) if not name.endswith("_3d")})
            host = {name: [] for name in fns}
            for _ in range(5):
                for name, (fn, arg) in fns.items():
                    host[name].append(_host_us(fn, arg, calls))
            row = {"rows": rows, **{f"{name}_host_us": round(statistics.median(v), 2) for name, v in host.items()},
                   "dense_gpu_us": round(_gpu_us(dense, x, calls), 2),
                   "sparse_gpu_us": round(_gpu_us(sparse, x, calls), 2)}
            print(json.dumps(row), flush=True)
            results["rows"].append(row)
    return results


def main(argv: list | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--json", help="write the results here")
    parser.add_argument("--features", type=int, default=1024)
    parser.add_argument("--calls", type=int, default=2000)
    parser.add_argument("--tune-budget", type=float, default=None, help="tune the sparse layer within this budget (s)")
    args = parser.parse_args(argv)
    command = " ".join(["python", "benchmarks/bench_torch_host.py", *(sys.argv[1:] if argv is None else argv)])
    results = run(args.features, args.calls, command, args.tune_budget)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
