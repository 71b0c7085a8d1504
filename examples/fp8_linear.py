"""FP8 (E4M3) sparse inference with SparseLinear: per-tensor scales fused, per-channel scales after the product.

A feed-forward block ``fc2(relu(fc1(x)))`` (512 -> 2048 -> 512) in mode "fp8": the weights are pruned 2:4 and
quantized to E4M3, calibration picks the activation scales, and each layer quantizes its float16 input. With
per-tensor weight scales (the default) the whole dequantization is one alpha in cuSPARSELt's epilogue, with
the bias and ReLU; with ``weight_granularity="channel"`` the GEMM writes float32 and one elementwise pass
applies the per-channel scales, bias and ReLU. Both are compared with the float32 block of the same pruned
weights. FP8 Sparse Tensor Cores need SM 8.9 or newer; elsewhere (or with ``--cpu``) the example runs on
the NumPy reference, with the same arithmetic.

``python examples/fp8_linear.py [--cpu]``
"""

from __future__ import annotations

import argparse

import numpy as np

import pycusparselt as psl
from pycusparselt import SparseLinear
from pycusparselt.nn.linear import calibrate_chain


def array_module(cpu: bool):
    """CuPy where a GPU of SM 8.9+ is usable (and not --cpu), else NumPy."""
    if not cpu:
        reason = psl.gpu_unavailable_reason()
        if reason is None:
            import cupy

            if cupy.cuda.Device().compute_capability >= "89":
                return cupy
            reason = f"SM {cupy.cuda.Device().compute_capability} has no FP8 Tensor Cores"
        print(f"no FP8 GPU ({reason}): running on the NumPy reference")
    return np


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cpu", action="store_true", help="run on the NumPy reference")
    args = parser.parse_args(argv)
    xp = array_module(args.cpu)

    rng = np.random.default_rng(0)
    # output channels of very different magnitudes: FP8's exponent covers them even with one scale per tensor
    w1 = (rng.standard_normal((2048, 512)) * np.exp(rng.uniform(-3, 3, (2048, 1))) / 512**0.5).astype(np.float16)
    w2 = (rng.standard_normal((512, 2048)) / 2048**0.5).astype(np.float16)
    b1, b2 = (0.1 * rng.standard_normal(2048)).astype(np.float16), (0.1 * rng.standard_normal(512)).astype(np.float16)
    batches = [xp.asarray(rng.standard_normal((64, 512)).astype(np.float16)) for _ in range(8)]
    x = batches[7]

    f32 = xp.float32
    for granularity in ("tensor", "channel"):
        # a bounded tuning time per plan (the default configuration and the library's pick are always timed)
        tune = {"budget_s": 5.0}
        fc1 = SparseLinear(xp.asarray(w1), xp.asarray(b1), mode="fp8", activation="relu",
                           weight_granularity=granularity, autotune=tune)
        fc2 = SparseLinear(xp.asarray(w2), xp.asarray(b2), mode="fp8", weight_granularity=granularity, autotune=tune)
        calibrate_chain([fc1, fc2], batches[:6])
        y = fc2(fc1(x))
        h_ref = xp.maximum(x.astype(f32) @ fc1.weight.astype(f32).T + xp.asarray(b1).astype(f32), 0)
        y_ref = h_ref @ fc2.weight.astype(f32).T + xp.asarray(b2).astype(f32)
        err = float(xp.abs(y.astype(f32) - y_ref).max() / xp.abs(y_ref).max())
        print(f"E4M3, {granularity:>7} weight scales: output {y.dtype} {tuple(y.shape)}, input scales "
              f"{fc1.input_scale:.3g} / {fc2.input_scale:.3g}, relative error vs float32 {err:.4f}")
        assert err < 0.1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
