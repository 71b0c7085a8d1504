"""Accuracy of dense FP16, sparse FP16, sparse INT8 and sparse FP8 inference, in the seed talk's table format.

Two model families, trained here from scratch on scikit-learn's digits (no download), on the CPU:

- **MLP**: the network of ``examples/recipe_digits.py`` (64 -> 256 -> 128 -> 10, ReLU);
- **CNN**: conv 3x3 (1 -> 16) -> conv 3x3 (16 -> 32) -> linear (512 -> 10), ReLU, valid padding, on the 8x8
  images; the convolutions run as GEMMs over image patches (channels innermost, so 2:4 groups run along input
  channels). The first convolution (9 inputs) stays dense FP16 in every column, as first layers commonly do.

For every seed: train dense (step 1), prune 2:4 and retrain with the masks fixed (steps 2-3, no channel
permutations, as the talk's tables), then quantize the sparse network (step 4: INT8 with per-channel weight
scales, FP8 E4M3 with per-tensor scales; activation scales calibrated on 512 training images). Inference runs
through :class:`pycusparselt.SparseLinear` on the NumPy reference, the arithmetic the GPU performs: dense FP16 is
each layer as an FP16 GEMM (float32 accumulation) with the dense weights; sparse FP16/INT8/FP8 are
SparseLinear layers in those modes (INT8 layers pass int8 activations to each other). Test accuracy on the
fixed 25 % split, mean over seeds.

``python scripts/accuracy_table.py [--seeds 0 1 2] [--json benchmarks/results/accuracy_digits.json]``
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import platform
import sys
import time
from pathlib import Path

import numpy as np

from pycusparselt import SparseLinear, reference
from pycusparselt.nn import masks, quantization
from pycusparselt.nn.linear import calibrate_chain

ROOT = Path(__file__).resolve().parent.parent
CALIBRATION = 512
COLUMNS = ("dense_fp16", "sparse_fp16", "sparse_int8", "sparse_fp8")


def _recipe():
    spec = importlib.util.spec_from_file_location("recipe_digits", ROOT / "examples" / "recipe_digits.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _fp16_gemm(w: np.ndarray, b: np.ndarray, h: np.ndarray, relu: bool) -> np.ndarray:
    """One dense FP16 layer as the GPU runs it: float16 operands, float32 accumulation, float16 output."""
    y_t = reference.matmul(w.astype(np.float16), h.astype(np.float16).T, bias=b.astype(np.float16),
                           activation="relu" if relu else None)
    return y_t.T


def _sparse_layers(weights, biases, mode, relus, fp8_format="e4m3"):
    """SparseLinear layers (weights already 2:4) in ``mode``; int8 layers pass int8 to the next one."""
    layers = []
    for i, (w, b, relu) in enumerate(zip(weights, biases, relus, strict=True)):
        kwargs = {"mode": mode, "prune": None, "activation": "relu" if relu else None}
        if mode == "int8" and i < len(weights) - 1:
            kwargs["out_dtype"] = np.int8
        if mode == "fp8":
            kwargs["fp8_format"] = fp8_format
        layers.append(SparseLinear(w.astype(np.float32), b.astype(np.float32), allow_zero_channels=True, **kwargs))
    return layers


# -- MLP -------------------------------------------------------------------------------------------


def mlp_accuracies(recipe, seed: int, epochs: int) -> dict[str, float]:
    dense, (x_train, y_train, x_test, y_test) = recipe.train_dense(seed, epochs)
    pruned, weight_masks = recipe.prune(dense)
    sparse = recipe.train([p.copy() for p in pruned], x_train, y_train, epochs=epochs, seed=seed + 1,
                          weight_masks=weight_masks)
    ws, bs = sparse[0::2], sparse[1::2]
    relus = [True] * (len(ws) - 1) + [False]

    def accuracy(logits):
        return float((np.asarray(logits).astype(np.float32).argmax(axis=1) == y_test).mean())

    h = x_test
    for w, b, relu in zip(dense[0::2], dense[1::2], relus, strict=True):
        h = _fp16_gemm(w, b, h, relu)
    result = {"dense_fp16": accuracy(h), "dense_fp32": recipe.accuracy(dense, x_test, y_test),
              "sparse_fp32": recipe.accuracy(sparse, x_test, y_test)}
    calibration = [x_train[:CALIBRATION].astype(np.float16)]
    for mode in ("fp16", "int8", "fp8"):
        layers = _sparse_layers(ws, bs, mode, relus)
        if mode != "fp16":
            calibrate_chain(layers, calibration)
        h = x_test.astype(np.float16)
        for layer in layers:
            h = layer(h)
        result[f"sparse_{mode}"] = accuracy(h)
    return result


# -- CNN (convolutions as GEMMs over patches) ------------------------------------------------------

C1, C2, CLASSES = 16, 32, 10


def patches(a: np.ndarray) -> np.ndarray:
    """(N, H, W, C) -> (N * (H-2) * (W-2), 9 * C): 3x3 valid patches, ordered (dy, dx, channel)."""
    n, h, w, c = a.shape
    win = np.lib.stride_tricks.sliding_window_view(a, (3, 3), axis=(1, 2))  # (N, H-2, W-2, C, 3, 3)
    return np.ascontiguousarray(win.transpose(0, 1, 2, 4, 5, 3)).reshape(n * (h - 2) * (w - 2), 9 * c)


def unpatch(d: np.ndarray, shape: tuple[int, int, int, int]) -> np.ndarray:
    """The adjoint of :func:`patches`: scatter-add patch gradients back to (N, H, W, C)."""
    n, h, w, c = shape
    oh, ow = h - 2, w - 2
    d = d.reshape(n, oh, ow, 3, 3, c)
    out = np.zeros(shape, dtype=d.dtype)
    for dy in range(3):
        for dx in range(3):
            out[:, dy:dy + oh, dx:dx + ow, :] += d[:, :, :, dy, dx, :]
    return out


def cnn_init(seed: int) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    shapes = [(C1, 9), (C2, 9 * C1), (CLASSES, 16 * C2)]
    params = []
    for out, inp in shapes:
        params.append((rng.standard_normal((out, inp)) * np.sqrt(2 / inp)).astype(np.float32))
        params.append(np.zeros(out, dtype=np.float32))
    return params


def cnn_forward(params, x):
    """Logits and what the backward pass needs; x is (N, 64) pixels in [0, 1]."""
    w1, b1, w2, b2, w3, b3 = params
    n = len(x)
    p1 = patches(x.reshape(n, 8, 8, 1))
    a1 = np.maximum(p1 @ w1.T + b1, 0).reshape(n, 6, 6, C1)
    p2 = patches(a1)
    a2 = np.maximum(p2 @ w2.T + b2, 0).reshape(n, 16 * C2)
    return a2 @ w3.T + b3, (p1, a1, p2, a2)


def cnn_gradients(params, x, y, weight_decay):
    w1, b1, w2, b2, w3, b3 = params
    logits, (p1, a1, p2, a2) = cnn_forward(params, x)
    p = np.exp(logits - logits.max(axis=1, keepdims=True))
    p /= p.sum(axis=1, keepdims=True)
    p[np.arange(len(y)), y] -= 1
    d3 = p / len(y)
    g3 = d3.T @ a2 + weight_decay * w3
    d2 = ((d3 @ w3) * (a2 > 0)).reshape(-1, C2)
    g2 = d2.T @ p2 + weight_decay * w2
    d1 = unpatch(d2 @ w2, a1.shape) * (a1 > 0)
    d1 = d1.reshape(-1, C1)
    g1 = d1.T @ p1 + weight_decay * w1
    return [g1, d1.sum(axis=0), g2, d2.sum(axis=0), g3, d3.sum(axis=0)]


def cnn_train(params, x, y, *, epochs, seed, weight_masks=None, lr=2e-3, batch=64, weight_decay=1e-4):
    """Adam, in place; with ``weight_masks`` (None for a dense layer) pruned weights stay exactly zero."""
    rng = np.random.default_rng(seed)
    m = [np.zeros_like(p) for p in params]
    v = [np.zeros_like(p) for p in params]
    t = 0
    for _ in range(epochs):
        order = rng.permutation(len(y))
        for start in range(0, len(y), batch):
            idx = order[start:start + batch]
            grads = cnn_gradients(params, x[idx], y[idx], weight_decay)
            t += 1
            for i, (p, g) in enumerate(zip(params, grads, strict=True)):
                mask = weight_masks[i // 2] if weight_masks is not None and i % 2 == 0 else None
                if mask is not None:
                    g = masks.apply_mask(g, mask)
                m[i] = 0.9 * m[i] + 0.1 * g
                v[i] = 0.999 * v[i] + 0.001 * g * g
                step = (-lr * (m[i] / (1 - 0.9**t)) / (np.sqrt(v[i] / (1 - 0.999**t)) + 1e-8)).astype(p.dtype)
                if mask is not None:
                    masks.masked_update(p, step, mask)
                else:
                    p += step
    return params


def cnn_accuracies(recipe, seed: int, epochs: int) -> dict[str, float]:
    x_train, y_train, x_test, y_test = recipe.load_data(seed)
    dense = cnn_train(cnn_init(seed), x_train, y_train, epochs=epochs, seed=seed + 1)
    weight_masks = [None, masks.compute_mask(dense[2]), masks.compute_mask(dense[4])]  # conv2 and linear
    sparse = [p.copy() for p in dense]
    for i, mask in enumerate(weight_masks):
        if mask is not None:
            masks.apply_mask(sparse[2 * i], mask, inplace=True)
    sparse = cnn_train(sparse, x_train, y_train, epochs=epochs, seed=seed + 1, weight_masks=weight_masks)
    assert reference.is_2to4(sparse[2]) and reference.is_2to4(sparse[4])
    n = len(x_test)

    def accuracy(logits):
        return float((np.asarray(logits).astype(np.float32).argmax(axis=1) == y_test).mean())

    def conv1(params, x):  # dense FP16 in every column
        return _fp16_gemm(params[0], params[1], patches(x.reshape(len(x), 8, 8, 1)), True).reshape(len(x), 6, 6, C1)

    h = patches(conv1(dense, x_test))
    h = _fp16_gemm(dense[2], dense[3], h, True).reshape(n, 16 * C2)
    result = {"dense_fp16": accuracy(_fp16_gemm(dense[4], dense[5], h, False)),
              "dense_fp32": accuracy(cnn_forward(dense, x_test)[0]),
              "sparse_fp32": accuracy(cnn_forward(sparse, x_test)[0])}
    a1_cal = patches(conv1(sparse, x_train[:CALIBRATION]))
    for mode in ("fp16", "int8", "fp8"):
        c2, fc = _sparse_layers(sparse[2:6:2], sparse[3:6:2], mode, [True, False])
        if mode == "int8":
            c2.calibrate([a1_cal])  # its input scale, and its int8 output's
            fc.input_scale = c2.output_scale  # the linear layer reads conv2's int8 output as it is
        elif mode == "fp8":
            c2.calibrate([a1_cal])
            fc.calibrate([quantization.float_forward(c2, a1_cal).reshape(-1, 16 * C2)])
        h = c2(patches(conv1(sparse, x_test)))
        result[f"sparse_{mode}"] = accuracy(fc(h.reshape(n, 16 * C2)))
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--epochs", type=int, default=40, help="epochs of dense training and of retraining")
    parser.add_argument("--json", default=None, help="write the results here")
    args = parser.parse_args(argv)
    recipe = _recipe()
    t0 = time.perf_counter()
    families = {"MLP 64-256-128-10": mlp_accuracies, "CNN conv16-conv32-fc10": cnn_accuracies}
    result = {"benchmark": "accuracy_digits", "dataset": "scikit-learn digits (1797 8x8 images, 25 % test split)",
              "seeds": args.seeds, "epochs": args.epochs, "calibration": f"max over {CALIBRATION} training images",
              "int8": "per-channel weight scales, int8 activations between layers",
              "fp8": "E4M3, per-tensor scales", "python": platform.python_version(), "networks": {}}
    for name, fn in families.items():
        runs = [fn(recipe, seed, args.epochs) for seed in args.seeds]
        mean = {k: float(np.mean([r[k] for r in runs])) for k in runs[0]}
        result["networks"][name] = {"per_seed": runs, "mean": mean}
    result["seconds"] = time.perf_counter() - t0
    print(render_text(result))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1) + "\n")
    return 0


def render_text(result: dict) -> str:
    head = f"{'network':<26}{'dense FP16':>11}{'sparse FP16':>13}{'diff':>7}{'sparse INT8':>13}{'diff':>7}" \
           f"{'sparse FP8':>12}{'diff':>7}"
    lines = [f"test accuracy (%), mean over seeds {result['seeds']}", head]
    for name, data in result["networks"].items():
        m = {k: 100 * v for k, v in data["mean"].items()}
        cells = f"{m['dense_fp16']:>11.2f}"
        for col, width in (("sparse_fp16", 13), ("sparse_int8", 13), ("sparse_fp8", 12)):
            cells += f"{m[col]:>{width}.2f}{m[col] - m['dense_fp16']:>+7.2f}"
        lines.append(f"{name:<26}{cells}")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
