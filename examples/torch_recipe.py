"""The 2:4 recipe in PyTorch on scikit-learn's digits: train dense, prune (naive or permuted), retrain, run sparse.

For a small CNN and a small transformer, trained from scratch on the 8x8 digits (shipped with scikit-learn,
nothing downloaded), on the CPU:

1. train dense (Adam) and measure the test accuracy in float32 and float16;
2. prune 2:4 with :func:`pycusparselt.torch.prune_trained_model`, without and with channel permutations,
   each time from the same dense weights, and report the magnitude the masks keep;
3. retrain with the same recipe (the optimizer keeps the pruned weights at zero) and measure again;
4. run the permuted, retrained model through :func:`pycusparselt.torch.sparsify` in FP16 and in INT8
   (calibrated on training batches): on the CPU that is the NumPy reference of what the GPU computes.

Every run is deterministic: seeded (PyTorch, NumPy, ``random``), deterministic PyTorch algorithms, a fixed
number of CPU threads, and a permutation search bounded by its own convergence rather than by a clock. With
several seeds the table gives each column's mean and standard deviation over the seeds.

``python examples/torch_recipe.py [--epochs 30] [--seeds 0 1 2 3 4] [--json out.json] [--rst]``
(``--quick``: a few epochs; ``--from-json out.json --rst``: the table of a saved run). Needs PyTorch and
scikit-learn.
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import random
import statistics
import sys
import time

import numpy as np
import torch
from sklearn.datasets import load_digits
from torch import nn

import pycusparselt as psl
import pycusparselt.torch as pst


class CNN(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(1, 32, 3, padding=1), nn.BatchNorm2d(32)
        self.conv2, self.bn2 = nn.Conv2d(32, 64, 3, padding=1), nn.BatchNorm2d(64)
        self.conv3 = nn.Conv2d(64, 64, 1)
        self.fc1, self.fc2 = nn.Linear(64, 128), nn.Linear(128, 10)

    def forward(self, x):
        x = torch.relu(self.bn1(self.conv1(x)))
        x = torch.relu(self.bn2(self.conv2(x)))
        x = torch.relu(self.conv3(x)).mean(dim=(2, 3))
        return self.fc2(torch.relu(self.fc1(x)))


class Transformer(nn.Module):
    """The 8 image rows as 8 tokens of 8 pixels: an embedding, one pre-norm block, a mean-pooled classifier."""

    def __init__(self, d: int = 64, ffn: int = 256) -> None:
        super().__init__()
        self.embed = nn.Linear(8, d)
        self.pos = nn.Parameter(torch.zeros(8, d))
        self.ln1, self.ln2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.q, self.k, self.v, self.o = (nn.Linear(d, d) for _ in range(4))
        self.fc1, self.fc2 = nn.Linear(d, ffn), nn.Linear(ffn, d)
        self.head = nn.Linear(d, 10)
        self.scale = d ** -0.5

    def forward(self, x):
        x = self.embed(x.reshape(-1, 8, 8)) + self.pos
        h = self.ln1(x)
        att = torch.softmax(self.q(h) @ self.k(h).transpose(-1, -2) * self.scale, dim=-1)
        x = x + self.o(att @ self.v(h))
        x = x + self.fc2(torch.relu(self.fc1(self.ln2(x))))
        return self.head(x.mean(dim=1))


def _data(seed: int) -> tuple:
    digits = load_digits()
    x = torch.tensor(digits.images / 16.0, dtype=torch.float32)[:, None]
    y = torch.tensor(digits.target)
    order = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed))
    test, train = order[:360], order[360:]
    return (x[train], y[train]), (x[test], y[test])


def _train(model, optimizer, data, epochs: int, seed: int) -> None:
    x, y = data
    g = torch.Generator().manual_seed(seed)
    model.train()
    for _ in range(epochs):
        for idx in torch.randperm(len(y), generator=g).split(64):
            optimizer.zero_grad()
            nn.functional.cross_entropy(model(x[idx]), y[idx]).backward()
            optimizer.step()
    model.eval()


def _accuracy(model, data, dtype=torch.float32) -> float:
    x, y = data
    with torch.no_grad():
        return float((model(x.to(dtype)).argmax(1) == y).float().mean())


def _magnitude(model) -> float:
    """Sum of |weight| over the layers pruning touches."""
    with torch.no_grad():
        return sum(float(m.weight.abs().sum()) for m in model.modules() if isinstance(m, (nn.Linear, nn.Conv2d)))


THREADS = 1  # CPU reductions split over threads add in another order: one thread gives the same bits anywhere


def deterministic(seed: int, threads: int = THREADS) -> None:
    """Seed every generator the run draws from and make PyTorch's CPU arithmetic repeatable."""
    torch.manual_seed(seed)
    np.random.seed(seed)
    random.seed(seed)
    torch.use_deterministic_algorithms(True)
    torch.set_num_threads(threads)


def run(make, name: str, epochs: int, seed: int) -> dict:
    deterministic(seed)
    train, test = _data(seed)
    dense = make()
    _train(dense, torch.optim.Adam(dense.parameters(), lr=3e-3), train, epochs, seed)
    row = {"model": name, "params": sum(p.numel() for p in dense.parameters()),
           "dense_fp32": _accuracy(dense, test), "dense_fp16": _accuracy(copy.deepcopy(dense).half(), test, torch.half)}
    for permute in (False, True):
        model = copy.deepcopy(dense)
        optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
        before = _magnitude(model)
        report = pst.prune_trained_model(model, optimizer, permute=permute,
                                          permutation_time_budget=None)  # to convergence: no clock
        kept = _magnitude(model)
        key = "permuted" if permute else "naive"
        row[f"{key}_kept_magnitude"] = kept / before
        row[f"{key}_pruned_fp32"] = _accuracy(model, test)
        _train(model, optimizer, train, epochs, seed + 1)
        row[f"{key}_retrained_fp32"] = _accuracy(model, test)
        if permute:
            row["permuted_spaces"] = [s.name for s in report.permutations.permuted]
            row["layers_pruned"] = report.pruned
            fp16 = copy.deepcopy(model).half()
            pst.remove_masks(fp16)
            sparse = pst.sparsify(fp16, "fp16", autotune=False)
            row["sparse_fp16"] = _accuracy(fp16, test, torch.half)
            int8 = copy.deepcopy(model)
            pst.remove_masks(int8)
            calibration = [train[0][i: i + 256] for i in range(0, 1024, 256)]
            pst.sparsify(int8, "int8", calibration=calibration, autotune=False)
            row["sparse_int8"] = _accuracy(int8, test)
            row["sparse_layers"] = sparse.replaced
            row["dense_layers"] = sparse.dense
    return row


COLUMNS = ("dense_fp32", "dense_fp16", "naive_retrained_fp32", "permuted_retrained_fp32", "sparse_fp16",
           "sparse_int8")
HEADERS = ("dense FP32", "dense FP16", "naive 2:4, retrained", "permuted 2:4, retrained", "sparse FP16",
           "sparse INT8", "magnitude kept, naive / permuted")


def _spread(values: list[float]) -> dict[str, float]:
    return {"mean": statistics.fmean(values), "std": statistics.stdev(values) if len(values) > 1 else 0.0,
            "min": min(values), "max": max(values)}


def summarize(runs: list[dict]) -> dict:
    """Per model: mean, sample standard deviation, min and max over the seeds of every measured number, and of
    the permuted-minus-naive difference of the retrained accuracy (with the seeds where it is positive)."""
    summary = {}
    for model in dict.fromkeys(r["model"] for r in runs):
        rows = [r for r in runs if r["model"] == model]
        keys = [k for k, v in rows[0].items() if isinstance(v, float)]
        entry = {"params": rows[0]["params"], "seeds": [r["seed"] for r in rows]}
        entry.update({k: _spread([r[k] for r in rows]) for k in keys})
        gain = [r["permuted_retrained_fp32"] - r["naive_retrained_fp32"] for r in rows]
        entry["permutation_gain"] = {**_spread(gain), "seeds_positive": sum(g > 0 for g in gain),
                                     "seeds_negative": sum(g < 0 for g in gain)}
        summary[model] = entry
    return summary


def _cell(spread: dict, n: int) -> str:
    return f"{spread['mean']:.1%} ± {spread['std']:.1%}" if n > 1 else f"{spread['mean']:.1%}"


def rst_table(result: dict) -> str:
    """The accuracy table of docs/pytorch.rst, from a result of :func:`main` (mean ± standard deviation)."""
    lines = [".. list-table::", "   :header-rows: 1", ""]
    lines += [("   * - " if i == 0 else "     - ") + "model" * (i == 0) + h * (i > 0)
              for i, h in enumerate(("",) + HEADERS)]
    for model, s in result["summary"].items():
        n = len(s["seeds"])
        lines.append(f"   * - {model} ({s['params']:,} parameters)")
        lines += [f"     - {_cell(s[k], n)}" for k in COLUMNS]
        lines.append(f"     - {s['naive_kept_magnitude']['mean']:.3f} / {s['permuted_kept_magnitude']['mean']:.3f}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--quick", action="store_true", help="3 epochs (a smoke run)")
    parser.add_argument("--json", default=None, help="write the results here")
    parser.add_argument("--from-json", default=None, help="read a saved result instead of running")
    parser.add_argument("--rst", action="store_true", help="print the table as on the PyTorch page")
    args = parser.parse_args(argv)
    if args.from_json:
        with open(args.from_json) as f:
            result = json.load(f)
    else:
        result = measure(args.seeds, 3 if args.quick else args.epochs, " ".join(["python", *sys.argv]))
    if args.rst:
        print(rst_table(result))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)
            f.write("\n")
    return 0


def measure(seeds: list[int], epochs: int, command: str) -> dict:
    """Both models for every seed, printed as they finish, and their summary over the seeds."""
    t0 = time.perf_counter()
    result = {"example": "torch_recipe", "command": command, "epochs": epochs, "seeds": seeds,
              "threads": THREADS, "deterministic_algorithms": True, "torch": torch.__version__,
              "pycusparselt": psl.__version__, "python": platform.python_version(), "rows": []}
    for seed in seeds:
        for make, name in ((CNN, "CNN"), (Transformer, "transformer")):
            t1 = time.perf_counter()
            row = {"seed": seed, **run(make, name, epochs, seed)}
            result["rows"].append(row)
            print(f"seed {seed} {name}: dense {row['dense_fp32']:.1%} (fp16 {row['dense_fp16']:.1%}); naive 2:4 "
                  f"retrained {row['naive_retrained_fp32']:.1%}, permuted {row['permuted_retrained_fp32']:.1%}; "
                  f"sparse fp16 {row['sparse_fp16']:.1%}, int8 {row['sparse_int8']:.1%}; kept magnitude "
                  f"{row['naive_kept_magnitude']:.3f} naive, {row['permuted_kept_magnitude']:.3f} permuted "
                  f"({time.perf_counter() - t1:.0f} s)", flush=True)
    result["summary"] = summarize(result["rows"])
    result["seconds"] = round(time.perf_counter() - t0, 1)
    return result


if __name__ == "__main__":
    raise SystemExit(main())
