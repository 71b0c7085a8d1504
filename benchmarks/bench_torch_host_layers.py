"""Host time per eager call over a model's worth of layers: BERT-large's 145 Linear layers (24 blocks of four
1024 x 1024, one 1024 x 4096 and one 4096 x 1024, and a 1024 x 1024 pooler), dense against sparse, on the GPU.

Usage::

    python benchmarks/bench_torch_host_layers.py [--json out.json] [--rows 384] [--tune-budget 0.3]

Each layer is called once in turn on an input of ``rows`` rows shaped (1, rows, features), as a model calls its
layers; the host's microseconds per call are the wall time of one pass over the layers divided by their count
(no synchronisation inside; medians of 30 passes). ``distinct`` passes call the 145 layers, each its own
object with its own plan (as in a model: what one layer's call leaves in the CPU's caches does not serve the
next); ``one`` calls the first layer 145 times. Columns: ``dense_module`` (``nn.Linear``), ``f_linear``
(``F.linear`` on its weight and bias), ``addmm`` (``torch.addmm`` on the 2-D input: what a compiled dense
graph calls), ``sparse_module`` (:class:`pycusparselt.torch.SparseLinear`) and ``sparse_op`` (the operator
``torch.ops.pycusparselt.linear`` on the 2-D input: what a compiled sparse graph calls). ``fast_path_misses``
counts, over one call of each sparse layer after warm-up, the lookups of a prepared product that found none
(0 where every call made identity checks only).
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
from bench_hf import save  # noqa: E402

SHAPES = [(1024, 1024)] * 4 + [(1024, 4096), (4096, 1024)]  # (in, out) of one BERT-large block's layers
BLOCKS = 24
PASSES = 30


def shapes() -> list:
    """(in, out) of BERT-large's Linear layers in order: 24 blocks, then the pooler."""
    return SHAPES * BLOCKS + [(1024, 1024)]


def _pass_us(calls: list) -> float:
    import torch

    samples = []
    for _ in range(PASSES):
        torch.cuda.synchronize()
        began = time.perf_counter()
        for call in calls:
            call()
        samples.append((time.perf_counter() - began) / len(calls) * 1e6)
    torch.cuda.synchronize()
    return round(statistics.median(samples), 2)


def layers(torch, tune_budget: float | None) -> tuple:
    """(dense layers, their sparsified copies): BERT-large's Linear shapes, FP16, on the GPU."""
    import pycusparselt.torch as pst

    torch.manual_seed(0)
    dense = torch.nn.ModuleList([torch.nn.Linear(i, o) for i, o in shapes()]).cuda().half().eval()
    sparse = copy.deepcopy(dense)
    pst.sparsify(sparse, "fp16", autotune=True if tune_budget is None else {"budget_s": tune_budget})
    return list(dense), list(sparse)


def _calls(torch, chosen: list, kind: str, inputs: dict) -> list:
    import torch.nn.functional as F

    op = torch.ops.pycusparselt.linear.default
    made = []
    for m in chosen:
        x = inputs[m.in_features]
        flat = x.view(-1, m.in_features)
        if kind in ("dense_module", "sparse_module"):
            made.append(lambda m=m, x=x: m(x))
        elif kind == "f_linear":
            made.append(lambda m=m, x=x: F.linear(x, m.weight, m.bias))
        elif kind == "addmm":
            transposed = m.weight.t()
            made.append(lambda m=m, flat=flat, wt=transposed: torch.addmm(m.bias, flat, wt))
        else:  # sparse_op
            made.append(lambda m=m, flat=flat: op(flat, m.layer_id))
    return made


def fast_path_misses(torch, sparse: list, inputs: dict) -> int:
    """Over one call of each layer, the lookups of a prepared product (``SparseLinear._prepared``) that found
    none."""
    import pycusparselt.torch as pst

    misses = 0
    prepared = pst.SparseLinear._prepared

    def counting(self, x, sp, device):
        nonlocal misses
        y = prepared(self, x, sp, device)
        misses += y is None
        return y

    pst.SparseLinear._prepared = counting
    try:
        for m in sparse:
            m(inputs[m.in_features])
    finally:
        pst.SparseLinear._prepared = prepared
    torch.cuda.synchronize()
    return misses


def run(rows: int, tune_budget: float | None, command: str = "") -> dict:
    import torch

    from pycusparselt import library_version

    dense, sparse = layers(torch, tune_budget)
    inputs = {f: torch.randn(1, rows, f, device="cuda", dtype=torch.half) for f in (1024, 4096)}
    op = torch.ops.pycusparselt.linear.default
    with torch.no_grad():
        # prepares (and tunes) each sparse layer's product for this shape
        for d, s in zip(dense, sparse, strict=True):
            for _ in range(2):
                d(inputs[d.in_features])
                s(inputs[s.in_features])
                op(inputs[s.in_features].view(rows, -1), s.layer_id)
        results = {"device": torch.cuda.get_device_name(), "torch": torch.__version__,
                   "cusparselt": ".".join(map(str, library_version())), "python": platform.python_version(),
                   "date": time.strftime("%Y-%m-%d"), "command": command, "rows": rows, "layers": len(dense),
                   "tune_budget_s": tune_budget, "passes": PASSES, "host_us": {}}
        kinds = {"dense_module": dense, "f_linear": dense, "addmm": dense, "sparse_module": sparse,
                 "sparse_op": sparse}
        for label in ("one", "distinct"):
            found = {}
            for kind, chosen in kinds.items():
                chosen = [chosen[0]] * len(chosen) if label == "one" else chosen
                found[kind] = _pass_us(_calls(torch, chosen, kind, inputs))
            results["host_us"][label] = found
            print(json.dumps({label: found}), flush=True)
        results["fast_path_misses"] = fast_path_misses(torch, sparse, inputs)
    return results


def main(argv: list | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--json", help="write the results here")
    parser.add_argument("--rows", type=int, default=384)
    parser.add_argument("--tune-budget", type=float, default=None, help="tuning seconds per problem")
    args = parser.parse_args(argv)
    if args.rows <= 0:
        parser.error(f"--rows: expected a positive number of rows, got {args.rows}")
    command = " ".join(["python", "benchmarks/bench_torch_host_layers.py", *(sys.argv[1:] if argv is None else argv)])
    results = run(args.rows, args.tune_budget, command)
    print(json.dumps(results))
    save(results, args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
