"""The three-step 2:4 recipe on scikit-learn's digits, with and without channel permutations.

1. Train a small dense MLP (64 -> 256 -> 128 -> 10, ReLU, softmax cross-entropy, Adam; NumPy only).
2. Prune every weight 2:4 along its inputs (pycusparselt.nn.masks), optionally after channel
   permutations (pycusparselt.nn.permutation) applied so that the dense network is unchanged.
3. Retrain with the masks fixed: the same training procedure and hyper-parameters again.

It prints the test accuracy after each step, for plain and permuted pruning, and runs the final
sparse network once through the NumPy oracle of cuSPARSELt's GEMM (``reference.matmul``). The data
ship inside scikit-learn (no download); everything is seeded. Runs on one CPU core in about
10-20 s: ``python examples/recipe_digits.py``.
"""

from __future__ import annotations

import argparse
import time

import numpy as np
from sklearn.datasets import load_digits

from pycusparselt import reference
from pycusparselt.nn import masks
from pycusparselt.nn import permutation

LAYERS = (64, 256, 128, 10)
EPOCHS = 40
BATCH = 64
LR = 1e-3
WEIGHT_DECAY = 1e-4  # L2: weights of input pixels that never light up decay instead of staying random


def load_data(seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Digits (8x8 images, 1797 samples) scaled to [0, 1]; a fixed 75/25 train/test split."""
    digits = load_digits()
    x = (digits.data / 16.0).astype(np.float32)
    y = digits.target.astype(np.int64)
    order = np.random.default_rng(seed).permutation(len(y))
    n_test = len(y) // 4
    test, train = order[:n_test], order[n_test:]
    return x[train], y[train], x[test], y[test]


def init_params(seed: int = 0) -> list[np.ndarray]:
    """He-initialised weights (outputs x inputs) and zero biases: [W1, b1, W2, b2, W3, b3]."""
    rng = np.random.default_rng(seed)
    params = []
    for fan_in, fan_out in zip(LAYERS[:-1], LAYERS[1:], strict=True):
        params.append((rng.standard_normal((fan_out, fan_in)) * np.sqrt(2 / fan_in)).astype(np.float32))
        params.append(np.zeros(fan_out, dtype=np.float32))
    return params


def forward(params: list[np.ndarray], x: np.ndarray) -> tuple[np.ndarray, list[np.ndarray]]:
    """Logits (batch x 10) and the inputs of each layer (for the backward pass)."""
    acts = [x]
    h = x
    n = len(params) // 2
    for i in range(n):
        w, b = params[2 * i], params[2 * i + 1]
        h = h @ w.T + b
        if i < n - 1:
            h = np.maximum(h, 0)
            acts.append(h)
    return h, acts


def accuracy(params: list[np.ndarray], x: np.ndarray, y: np.ndarray) -> float:
    return float((forward(params, x)[0].argmax(axis=1) == y).mean())


def gradients(params: list[np.ndarray], x: np.ndarray, y: np.ndarray) -> list[np.ndarray]:
    """Gradients of the mean softmax cross-entropy plus the L2 term, for every parameter."""
    logits, acts = forward(params, x)
    p = np.exp(logits - logits.max(axis=1, keepdims=True))
    p /= p.sum(axis=1, keepdims=True)
    p[np.arange(len(y)), y] -= 1
    delta = p / len(y)
    grads = [None] * len(params)
    for i in reversed(range(len(params) // 2)):
        w = params[2 * i]
        grads[2 * i] = delta.T @ acts[i] + WEIGHT_DECAY * w
        grads[2 * i + 1] = delta.sum(axis=0)
        if i:
            delta = (delta @ w) * (acts[i] > 0)
    return grads


def train(params: list[np.ndarray], x: np.ndarray, y: np.ndarray, *, epochs: int = EPOCHS,
          seed: int = 1, weight_masks: list[np.ndarray] | None = None) -> list[np.ndarray]:
    """Adam with mini-batches, in place. With ``weight_masks`` (one per weight matrix) the
    gradients are masked and every update goes through ``masks.masked_update``: pruned weights
    stay exactly zero (step 3 of the recipe)."""
    rng = np.random.default_rng(seed)
    m = [np.zeros_like(p) for p in params]
    v = [np.zeros_like(p) for p in params]
    b1, b2, eps = 0.9, 0.999, 1e-8
    t = 0
    for _ in range(epochs):
        order = rng.permutation(len(y))
        for start in range(0, len(y), BATCH):
            idx = order[start:start + BATCH]
            grads = gradients(params, x[idx], y[idx])
            t += 1
            for i, (p, g) in enumerate(zip(params, grads, strict=True)):
                mask = weight_masks[i // 2] if weight_masks is not None and i % 2 == 0 else None
                if mask is not None:
                    g = masks.apply_mask(g, mask)  # pruned weights get no gradient, no moments
                m[i] = b1 * m[i] + (1 - b1) * g
                v[i] = b2 * v[i] + (1 - b2) * g * g
                step = (-LR * (m[i] / (1 - b1**t)) / (np.sqrt(v[i] / (1 - b2**t)) + eps)).astype(p.dtype)
                if mask is not None:
                    masks.masked_update(p, step, mask)
                else:
                    p += step
    return params


def train_dense(seed: int = 0, epochs: int = EPOCHS) -> tuple[list[np.ndarray], tuple]:
    """Step 1: the dense network and the data (used by benchmarks/bench_permutation.py too)."""
    data = load_data(seed)
    params = train(init_params(seed), data[0], data[1], epochs=epochs, seed=seed + 1)
    return params, data


def permute_network(params: list[np.ndarray], *, time_budget: float | None, seed: int = 0
                    ) -> tuple[list[np.ndarray], np.ndarray, list[permutation.PermutationReport]]:
    """Channel permutations for every weight's inputs, applied so the network is unchanged.

    Hidden layers: the consumer's inputs and the producer's outputs (``permute_pair``). The first
    layer's inputs are the pixels: its columns are permuted and so is the data (returned as
    ``pixel_perm``, to index the inputs with)."""
    w1, b1, w2, b2, w3, b3 = (p.copy() for p in params)
    reports = []
    p1, r1 = permutation.find_permutation(w1, time_budget=time_budget, seed=seed)
    w1 = permutation.permute_consumer(w1, p1)  # the "producer" is the data: x[:, p1]
    p2, r2 = permutation.find_permutation(w2, time_budget=time_budget, seed=seed)
    w1, b1, w2 = permutation.permute_pair(w1, b1, w2, p2)
    p3, r3 = permutation.find_permutation(w3, time_budget=time_budget, seed=seed)
    w2, b2, w3 = permutation.permute_pair(w2, b2, w3, p3)
    reports = [r1, r2, r3]
    return [w1, b1, w2, b2, w3, b3], p1, reports


def prune(params: list[np.ndarray]) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """Step 2: 2:4 strip pruning of every weight along its inputs; the masks are kept fixed."""
    weight_masks = [masks.compute_mask(params[2 * i]) for i in range(len(params) // 2)]
    pruned = [p.copy() for p in params]
    for i, mask in enumerate(weight_masks):
        masks.apply_mask(pruned[2 * i], mask, inplace=True)
    return pruned, weight_masks


def oracle_predictions(params: list[np.ndarray], x: np.ndarray) -> np.ndarray:
    """Inference with cuSPARSELt's semantics on the NumPy oracle: each layer is the sparse GEMM
    D = act(W @ H + bias) with the 2:4 weight W as the sparse operand A (M = outputs, K = inputs)
    and the activations H (K x batch) as B, float32 in and out, bias per row."""
    h = np.ascontiguousarray(x.T)
    n = len(params) // 2
    for i in range(n):
        w, b = params[2 * i], params[2 * i + 1]
        assert reference.is_2to4(w), "the sparse operand must be 2:4 along K"
        h = reference.matmul(w, h, bias=b, activation="relu" if i < n - 1 else None)
    return h.argmax(axis=0)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--epochs", type=int, default=EPOCHS, help="epochs of steps 1 and 3")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--time-budget", type=float, default=None,
                        help="seconds per permutation search (default: none, run to convergence)")
    args = parser.parse_args(argv)
    t0 = time.perf_counter()

    # Step 1: dense training
    dense, (x_train, y_train, x_test, y_test) = train_dense(args.seed, args.epochs)
    acc_dense = accuracy(dense, x_test, y_test)

    rows = {}
    kept = {}
    final = {}
    for name in ("no permutation", "channel permutations"):
        params, xtr, xte = dense, x_train, x_test
        if name == "channel permutations":
            params, pixel_perm, reports = permute_network(dense, time_budget=args.time_budget,
                                                          seed=args.seed)
            xtr, xte = x_train[:, pixel_perm], x_test[:, pixel_perm]
            # the permuted dense network computes the same function
            np.testing.assert_allclose(forward(params, xte)[0], forward(dense, x_test)[0],
                                       rtol=1e-4, atol=1e-4)
            assert accuracy(params, xte, y_test) == acc_dense
            kept[name] = [r.kept_fraction_after for r in reports]
        else:
            kept[name] = [permutation.kept_magnitude(w) / np.abs(w).astype(np.float64).sum()
                          for w in params[::2]]
        # Step 2: prune (one mask per weight, computed once)
        pruned, weight_masks = prune(params)
        acc_pruned = accuracy(pruned, xte, y_test)
        # Step 3: retrain with the masks fixed, the same procedure and hyper-parameters
        retrained = train([p.copy() for p in pruned], xtr, y_train, epochs=args.epochs,
                          seed=args.seed + 1, weight_masks=weight_masks)
        assert all(not w[~mask].any() for w, mask in zip(retrained[::2], weight_masks, strict=True))
        rows[name] = (acc_dense, acc_pruned, accuracy(retrained, xte, y_test))
        final[name] = (retrained, xte)

    print(f"2:4 recipe on digits: MLP {' -> '.join(map(str, LAYERS))}, {args.epochs} epochs of Adam "
          f"(lr {LR}), {len(y_train)} train / {len(y_test)} test samples, seed {args.seed}")
    print()
    print("test accuracy           dense    2:4 pruned   2:4 retrained")
    for name, (a, b, c) in rows.items():
        print(f"{name:<22} {100 * a:6.2f}%    {100 * b:6.2f}%      {100 * c:6.2f}%")
    print()
    print("magnitude kept by 2:4 pruning (fraction of sum |W|), per layer:")
    for name, fractions in kept.items():
        print(f"{name:<22} " + "  ".join(f"W{i + 1} {100 * f:6.2f}%" for i, f in enumerate(fractions)))

    # The oracle path: the final sparse network through reference.matmul (cuSPARSELt's semantics)
    retrained, xte = final["channel permutations"]
    oracle = oracle_predictions(retrained, xte)
    numpy_pred = forward(retrained, xte)[0].argmax(axis=1)
    print()
    print(f"reference.matmul (cuSPARSELt's GEMM on the NumPy oracle), permuted 2:4 network: "
          f"accuracy {100 * float((oracle == y_test).mean()):.2f}%, "
          f"{int((oracle == numpy_pred).sum())}/{len(y_test)} predictions as in NumPy")
    print(f"total time {time.perf_counter() - t0:.1f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
