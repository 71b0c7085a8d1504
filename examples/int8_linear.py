"""INT8 sparse inference with SparseLinear: prune 2:4, quantize, calibrate, run, save and reload.

A feed-forward block ``fc2(relu(fc1(x)))`` (512 -> 2048 -> 512) in mode "int8": each weight is pruned 2:4 and
quantized per output channel; calibration picks the activation scales; fc1 writes int8 activations that fc2
reads as they are (the dequantization, bias and ReLU run in cuSPARSELt's epilogue). The result is compared
with the float32 block of the same pruned weights, and the prepared layers are saved and reloaded (no
pruning, calibration or tuning again). On a GPU it runs through cuSPARSELt; elsewhere (or with ``--cpu``) on
the NumPy reference, with the same arithmetic.

``python examples/int8_linear.py [--cpu]``
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import numpy as np

import pycusparselt as psl
from pycusparselt import SparseLinear, reference
from pycusparselt.nn.linear import calibrate_chain


def array_module(cpu: bool):
    """CuPy where a GPU is usable (and not --cpu), else NumPy."""
    if not cpu:
        reason = psl.gpu_unavailable_reason()
        if reason is None:
            import cupy

            return cupy
        print(f"no GPU ({reason}): running on the NumPy reference")
    return np


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cpu", action="store_true", help="run on the NumPy reference")
    args = parser.parse_args(argv)
    xp = array_module(args.cpu)

    rng = np.random.default_rng(0)
    w1 = rng.standard_normal((2048, 512)).astype(np.float16) / np.float16(512**0.5)
    w2 = rng.standard_normal((512, 2048)).astype(np.float16) / np.float16(2048**0.5)
    b1, b2 = (0.1 * rng.standard_normal(2048)).astype(np.float16), (0.1 * rng.standard_normal(512)).astype(np.float16)
    batches = [xp.asarray(rng.standard_normal((64, 512)).astype(np.float16)) for _ in range(8)]

    fc1 = SparseLinear(xp.asarray(w1), xp.asarray(b1), mode="int8", activation="relu", out_dtype=np.int8)
    fc2 = SparseLinear(xp.asarray(w2), xp.asarray(b2), mode="int8")
    calibrate_chain([fc1, fc2], batches[:6], method="max")  # activation scales from 6 batches
    print(f"{fc1}\n{fc2}")
    print(f"scales: input {fc1.input_scale:.4g}, hidden {fc1.output_scale:.4g} (= fc2's input scale "
          f"{fc2.input_scale:.4g}); weight scales per channel, e.g. {fc1.weight_scale[:3]}")
    host = (lambda a: a) if xp is np else xp.asnumpy
    print(f"quantized weights 2:4: {reference.is_2to4(host(fc1.weight_q)) and reference.is_2to4(host(fc2.weight_q))}")

    x = batches[7]  # not used for calibration
    h = fc1(x)
    y = fc2(h)
    print(f"hidden activations: {h.dtype}, output: {y.dtype} {tuple(y.shape)}")

    # the float32 block with the same pruned weights
    f32 = xp.float32
    h_ref = xp.maximum(x.astype(f32) @ fc1.weight.astype(f32).T + xp.asarray(b1).astype(f32), 0)
    y_ref = h_ref @ fc2.weight.astype(f32).T + xp.asarray(b2).astype(f32)
    err = float(xp.abs(y.astype(f32) - y_ref).max() / xp.abs(y_ref).max())
    print(f"relative error vs float32 (max |diff| / max |y|): {err:.4f}")
    assert err < 0.05

    with tempfile.TemporaryDirectory() as tmp:
        fc1.save(Path(tmp) / "fc1.npz")
        fc2.save(Path(tmp) / "fc2.npz")
        on_device = xp is not np
        g1 = SparseLinear.load(Path(tmp) / "fc1.npz", on_device=on_device)
        g2 = SparseLinear.load(Path(tmp) / "fc2.npz", on_device=on_device)
        same = bool(xp.array_equal(g2(g1(x)), y))
    print(f"saved and reloaded: {'identical outputs' if same else 'DIFFERENT outputs'}"
          f"{f', {len(fc1.tuned_configs)} tuned configuration(s) kept' if on_device else ''}")
    assert same
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
