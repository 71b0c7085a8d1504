"""The 2:4 recipe in PyTorch on scikit-learn's digits: train dense, prune (naive or permuted), retrain, run sparse.

For a small CNN and a small transformer, trained from scratch on the 8x8 digits (shipped with scikit-learn,
nothing downloaded), on the CPU:

1. train dense (Adam) and measure the test accuracy in float32 and float16;
2. prune 2:4 with :func:`pycusparselt.torch.prune_trained_model`, without and with channel permutations,
   each time from the same dense weights, and report the magnitude the masks keep;
3. retrain with the same recipe (the optimizer keeps the pruned weights at zero) and measure again;
4. run the permuted, retrained model through :func:`pycusparselt.torch.sparsify` in FP16 and in INT8
   (calibrated on training batches): on the CPU that is the NumPy reference of what the GPU computes.

``python examples/torch_recipe.py [--epochs 30] [--json out.json] [--markdown]`` (``--quick``: a few epochs).
Needs PyTorch and scikit-learn.
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import time

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


def run(make, name: str, epochs: int, seed: int) -> dict:
    torch.manual_seed(seed)
    train, test = _data(seed)
    dense = make()
    _train(dense, torch.optim.Adam(dense.parameters(), lr=3e-3), train, epochs, seed)
    row = {"model": name, "params": sum(p.numel() for p in dense.parameters()),
           "dense_fp32": _accuracy(dense, test), "dense_fp16": _accuracy(copy.deepcopy(dense).half(), test, torch.half)}
    for permute in (False, True):
        model = copy.deepcopy(dense)
        optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
        before = _magnitude(model)
        report = pst.prune_trained_model(model, optimizer, permute=permute, permutation_time_budget=2.0)
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


def markdown(result: dict) -> str:
    lines = ["| model | dense FP32 | dense FP16 | naive 2:4, retrained | permuted 2:4, retrained | sparse FP16 | "
             "sparse INT8 | magnitude kept: naive / permuted |", "|---|---|---|---|---|---|---|---|"]
    for r in result["rows"]:
        lines.append(
            f"| {r['model']} ({r['params']:,} parameters) | {r['dense_fp32']:.1%} | {r['dense_fp16']:.1%} | "
            f"{r['naive_retrained_fp32']:.1%} | {r['permuted_retrained_fp32']:.1%} | {r['sparse_fp16']:.1%} | "
            f"{r['sparse_int8']:.1%} | {r['naive_kept_magnitude']:.3f} / {r['permuted_kept_magnitude']:.3f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quick", action="store_true", help="3 epochs (a smoke run)")
    parser.add_argument("--json", default=None)
    parser.add_argument("--markdown", action="store_true", help="print the table as markdown")
    args = parser.parse_args(argv)
    epochs = 3 if args.quick else args.epochs
    torch.set_num_threads(min(8, torch.get_num_threads()))
    t0 = time.perf_counter()
    result = {"example": "torch_recipe", "epochs": epochs, "seed": args.seed, "torch": torch.__version__,
              "pycusparselt": psl.__version__, "python": platform.python_version(), "rows": []}
    for make, name in ((CNN, "CNN"), (Transformer, "transformer")):
        row = run(make, name, epochs, args.seed)
        result["rows"].append(row)
        print(f"{name}: dense {row['dense_fp32']:.1%} (fp16 {row['dense_fp16']:.1%}); naive 2:4 retrained "
              f"{row['naive_retrained_fp32']:.1%}, permuted {row['permuted_retrained_fp32']:.1%}; sparse fp16 "
              f"{row['sparse_fp16']:.1%}, int8 {row['sparse_int8']:.1%}; kept magnitude "
              f"{row['naive_kept_magnitude']:.3f} naive, {row['permuted_kept_magnitude']:.3f} permuted", flush=True)
    result["seconds"] = round(time.perf_counter() - t0, 1)
    if args.markdown:
        print(markdown(result))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
