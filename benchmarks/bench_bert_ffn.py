"""BERT-large feed-forward stack on the GPU: dense FP16, dense INT8, sparse FP16, sparse INT8 and sparse FP8.

Each encoder block of BERT-large has a feed-forward network ``y = fc2(act(fc1(x)))``, 1024 -> 4096 -> 1024,
run on every token (sequence length 384). The stack here is ``--layers`` such blocks with their own weights
(ReLU; residuals and LayerNorm are left out: they cost the same in every variant), timed end to end for
several batch sizes (a sample = one sequence of 384 tokens):

- dense FP16: cuBLAS through CuPy (``x @ W.T``) with one fused bias+ReLU kernel, and PyTorch's
  ``_addmm_activation`` (cuBLASLt's bias+ReLU epilogue) where PyTorch is installed; the faster is reported;
- dense INT8: ``cublasGemmEx`` (int8 x int8 -> int32, the "TN" form) through CuPy, and ``torch._int_mm``
  (cuBLASLt) where PyTorch is installed, each with one kernel after every GEMM for the per-channel
  dequantization, bias, ReLU and requantization; the faster is reported;
- sparse FP16 / INT8 / FP8: :class:`pycusparselt.SparseLinear` in modes "fp16", "int8" (fc1 outputs int8 that
  fc2 reads directly; scales, bias and ReLU in cuSPARSELt's epilogue) and "fp8" (E4M3, per-tensor scales;
  fc1 outputs float16, quantized again for fc2: FP8 outputs are refused by cuSPARSELt 0.8).

Every variant starts from float16 activations and ends with float16 outputs (INT8/FP8 quantize each block's
input with a calibrated scale). Samples per second are given for the 24 blocks of BERT-large (the stack's
time scaled by 24 / layers). Each output is compared with the float32 product of the weights it uses.

``python benchmarks/bench_bert_ffn.py [--batches 1 8 32] [--layers 4] [--repeat 20] [--json PATH]``
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from typing import Any, Callable

import numpy as np

HIDDEN, FFN, SEQ, BERT_LAYERS = 1024, 4096, 384, 24


def _time_ms(fn: Callable[[], Any], repeat: int, warmup: int = 3) -> float:
    import cupy as cp

    for _ in range(warmup):
        fn()
    times = []
    start, stop = cp.cuda.Event(), cp.cuda.Event()
    for _ in range(repeat):
        start.record()
        fn()
        stop.record()
        stop.synchronize()
        times.append(cp.cuda.get_elapsed_time(start, stop))
    return float(statistics.median(times))


class Stack:
    """The weights of ``layers`` FFN blocks, and each variant's forward pass."""

    def __init__(self, layers: int, seed: int = 0, tune_budget: float = 4.0) -> None:
        import cupy as cp

        import pycusparselt as psl
        from pycusparselt.nn import quantization

        self.cp, self.psl, self.q = cp, psl, quantization
        self.tune_options = {"budget_s": tune_budget}
        rng = cp.random.default_rng(seed)
        self.blocks = []
        for _ in range(layers):
            w1 = (rng.standard_normal((FFN, HIDDEN), dtype=cp.float32) / HIDDEN**0.5).astype(cp.float16)
            w2 = (rng.standard_normal((HIDDEN, FFN), dtype=cp.float32) / FFN**0.5).astype(cp.float16)
            b1 = (0.1 * rng.standard_normal(FFN, dtype=cp.float32)).astype(cp.float16)
            b2 = (0.1 * rng.standard_normal(HIDDEN, dtype=cp.float32)).astype(cp.float16)
            self.blocks.append({"w1": w1, "b1": b1, "w2": w2, "b2": b2})
        self._kernels()

    def _kernels(self) -> None:
        cp = self.cp
        self.bias_relu = cp.ElementwiseKernel(
            "T b", "T h", "float v = (float)h + (float)b; h = (T)(v > 0.0f ? v : 0.0f);", "bench_bias_relu")
        self.bias_add = cp.ElementwiseKernel("T b", "T h", "h = (T)((float)h + (float)b);", "bench_bias_add")
        self.requant = cp.ElementwiseKernel(
            "int32 acc, float32 alpha, float32 bias", "int8 q",
            "float v = rintf(fmaxf((float)acc * alpha + bias, 0.0f));"
            "q = (signed char)fminf(fmaxf(v, -128.0f), 127.0f);",
            "bench_requant_relu")
        self.dequant = cp.ElementwiseKernel(
            "int32 acc, float32 alpha, float32 bias", "float16 y", "y = (float)acc * alpha + bias", "bench_dequant")

    # -- calibration and layers -----------------------------------------------------------------------

    def build(self, calibration: Any) -> None:
        """Sparse layers for every mode, calibrated on ``calibration`` (tokens, hidden) float16; dense INT8 weights."""
        cp, psl, q = self.cp, self.psl, self.q
        from pycusparselt.nn.linear import calibrate_chain

        for blk in self.blocks:
            w1, b1, w2, b2 = blk["w1"], blk["b1"], blk["w2"], blk["b2"]
            t = self.tune_options
            blk["fp16"] = (psl.SparseLinear(w1, b1, mode="fp16", activation="relu", autotune=t),
                           psl.SparseLinear(w2, b2, mode="fp16", autotune=t))
            i8 = (psl.SparseLinear(w1, b1, mode="int8", activation="relu", out_dtype=np.int8, autotune=t),
                  psl.SparseLinear(w2, b2, mode="int8", autotune=t))
            calibrate_chain(i8, [calibration])
            blk["int8"] = i8
            f8 = (psl.SparseLinear(w1, b1, mode="fp8", activation="relu", autotune=t),
                  psl.SparseLinear(w2, b2, mode="fp8", autotune=t))
            calibrate_chain(f8, [calibration])
            blk["fp8"] = f8
            # dense INT8: the unpruned weights, per-channel scales, the same activation scales as sparse INT8
            s_in, s_mid = i8[0].input_scale, i8[0].output_scale
            w1q, s1 = q.quantize_weight(w1)
            w2q, s2 = q.quantize_weight(w2)
            blk["dense_int8"] = {
                "s_in": s_in, "w1q": w1q, "w2q": w2q,
                "alpha1": (s1.astype(cp.float64) * s_in / s_mid).astype(cp.float32),
                "bias1": (b1.astype(cp.float64) / s_mid).astype(cp.float32),
                "alpha2": (s2.astype(cp.float64) * s_mid).astype(cp.float32),
                "bias2": b2.astype(cp.float32),
            }

    def tune(self, mode: str, x: Any) -> None:
        """Tune block 0's layers for this input shape and give the other blocks its configurations (same
        shapes): one tuning per layer shape instead of one per layer."""
        fc1, fc2 = self.blocks[0][mode]
        fc2(fc1(x))
        for blk in self.blocks[1:]:
            for layer, tuned in zip(blk[mode], (fc1, fc2), strict=True):
                layer.tuned_configs = tuned.tuned_configs

    # -- forward passes -------------------------------------------------------------------------------

    def dense_fp16_cupy(self, x: Any) -> Any:
        for blk in self.blocks:
            h = x @ blk["w1"].T
            self.bias_relu(blk["b1"], h)
            x = h @ blk["w2"].T
            self.bias_add(blk["b2"], x)
        return x

    def dense_fp16_torch(self, x: Any) -> Any:
        import torch

        t = torch.from_dlpack(x)
        for blk in self.blocks:
            if "torch" not in blk:
                blk["torch"] = [torch.from_dlpack(blk[k]) for k in ("w1", "b1", "w2", "b2")]
            tw = blk["torch"]
            h = torch._addmm_activation(tw[1], t, tw[0].t())
            t = torch.addmm(tw[3], h, tw[2].t())
        return self.cp.from_dlpack(t)

    _ONE, _ZERO = np.array(1, np.int32), np.array(0, np.int32)

    def _gemm_i8_cublas(self, xq: Any, wq: Any) -> Any:
        """``xq @ wq.T`` with int32 output through cublasGemmEx (the TN form int8 needs)."""
        cp = self.cp
        from cupy.cuda import cublas

        m, k = wq.shape
        n = xq.shape[0]
        out = cp.empty((n, m), dtype=cp.int32)
        handle = cp.cuda.device.get_cublas_handle()
        # column-major view: out^T (m x n) = wq (m x k, stored as k x m: op T) @ xq^T (k x n); types R_8I in,
        # R_32I out, CUBLAS_COMPUTE_32I, algorithm CUBLAS_GEMM_DEFAULT_TENSOR_OP
        cublas.gemmEx(handle, 1, 0, m, n, k, self._ONE.ctypes.data, wq.data.ptr, 3, k, xq.data.ptr, 3, k,
                      self._ZERO.ctypes.data, out.data.ptr, 10, m, 72, 99)
        return out

    def _gemm_i8_torch(self, xq: Any, wq: Any) -> Any:
        """``xq @ wq.T`` with int32 output through ``torch._int_mm`` (cuBLASLt)."""
        import torch

        return self.cp.from_dlpack(torch._int_mm(torch.from_dlpack(xq), torch.from_dlpack(wq).t()))

    def dense_int8(self, x: Any, gemm: str = "cublas") -> Any:
        mm = self._gemm_i8_cublas if gemm == "cublas" else self._gemm_i8_torch
        for blk in self.blocks:
            d = blk["dense_int8"]
            xq = self.q.quantize(x, d["s_in"])
            h = self.requant(mm(xq, d["w1q"]), d["alpha1"], d["bias1"])
            x = self.dequant(mm(h, d["w2q"]), d["alpha2"], d["bias2"])
        return x

    def _view(self, t: Any, dtype: Any) -> Any:
        """A CuPy array over a CUDA tensor's memory. Not through DLPack: its stream handshake is refused inside
        ``torch.cuda.graph`` capture."""
        cp = self.cp
        memory = cp.cuda.UnownedMemory(t.data_ptr(), t.numel() * t.element_size(), t, t.device.index)
        return cp.ndarray(tuple(t.shape), dtype, cp.cuda.MemoryPointer(memory, 0))

    def dense_int8_tensors(self, t: Any) -> Any:
        """Dense INT8 on PyTorch tensors, capturable whole by ``torch.cuda.graph``: ``torch._int_mm`` (cuBLASLt)
        for the GEMMs and the same fused kernels as :meth:`dense_int8`, run on PyTorch's current stream."""
        import torch

        from pycusparselt._native.streams import on_stream

        cp = self.cp
        with on_stream(torch.cuda.current_stream().cuda_stream):
            for blk in self.blocks:
                d = blk["dense_int8"]
                if "torch_int8" not in d:
                    d["torch_int8"] = (torch.from_dlpack(d["w1q"]).t(), torch.from_dlpack(d["w2q"]).t(),
                                       np.float32(1.0) / np.float32(d["s_in"]))
                w1t, w2t, inv = d["torch_int8"]
                xq = torch.empty(t.shape, dtype=torch.int8, device=t.device)
                self.q.quantize_into(self._view(t, cp.float16), inv, "int8", self._view(xq, cp.int8))
                acc = torch._int_mm(xq, w1t)
                h = torch.empty(acc.shape, dtype=torch.int8, device=t.device)
                self.requant(self._view(acc, cp.int32), d["alpha1"], d["bias1"], self._view(h, cp.int8))
                acc = torch._int_mm(h, w2t)
                t = torch.empty(acc.shape, dtype=torch.float16, device=t.device)
                self.dequant(self._view(acc, cp.int32), d["alpha2"], d["bias2"], self._view(t, cp.float16))
        return t

    def sparse(self, mode: str, x: Any) -> Any:
        for blk in self.blocks:
            fc1, fc2 = blk[mode]
            x = fc2(fc1(x))
        return x

    # -- float32 references ---------------------------------------------------------------------------

    def reference(self, x: Any, weights: str) -> Any:
        """float32 forward with the dense weights ("dense"), or the pruned weights of the sparse layers."""
        cp = self.cp
        x = x.astype(cp.float32)
        for blk in self.blocks:
            if weights == "dense":
                w1, w2 = blk["w1"], blk["w2"]
            else:
                w1, w2 = blk["fp16"][0].weight, blk["fp16"][1].weight
            h = cp.maximum(x @ w1.astype(cp.float32).T + blk["b1"].astype(cp.float32), 0)
            x = h @ w2.astype(cp.float32).T + blk["b2"].astype(cp.float32)
        return x


def _rel_error(y: Any, ref: Any) -> float:
    import cupy as cp

    return float(cp.abs(y.astype(cp.float32) - ref).max() / cp.abs(ref).max())


def run(batches: list[int], layers: int, repeat: int, tune_budget: float = 4.0,
        log: Callable[[str], None] = print) -> dict:
    import cupy as cp

    import pycusparselt as psl

    t0 = time.perf_counter()
    stack = Stack(layers, tune_budget=tune_budget)
    rng = cp.random.default_rng(1)
    calibration = rng.standard_normal((2 * SEQ, HIDDEN), dtype=cp.float32).astype(cp.float16)
    stack.build(calibration)
    try:
        import torch  # noqa: F401

        have_torch = True
    except ImportError:
        have_torch = False
    variants: dict[str, Callable[[Any], Any]] = {
        "dense_fp16_cupy": stack.dense_fp16_cupy,
        "dense_int8_cublas": stack.dense_int8,
        "sparse_fp16": lambda x: stack.sparse("fp16", x),
        "sparse_int8": lambda x: stack.sparse("int8", x),
        "sparse_fp8": lambda x: stack.sparse("fp8", x),
    }
    if have_torch:
        variants["dense_fp16_torch"] = stack.dense_fp16_torch
        variants["dense_int8_torch"] = lambda x: stack.dense_int8(x, "torch")
    props = cp.cuda.runtime.getDeviceProperties(cp.cuda.Device().id)
    device_name = props["name"].decode() if isinstance(props["name"], bytes) else props["name"]
    result: dict[str, Any] = {
        "benchmark": "bert_ffn", "hidden": HIDDEN, "ffn": FFN, "seq": SEQ, "layers": layers, "repeat": repeat,
        "activation": "relu", "tune_budget_s": tune_budget, "device": device_name,
        "cusparselt": ".".join(map(str, psl.library_version())), "cupy": cp.__version__,
        "python": platform.python_version(), "rows": [], "errors": {},
    }
    for batch in batches:
        x = rng.standard_normal((batch * SEQ, HIDDEN), dtype=cp.float32).astype(cp.float16)
        ref_pruned, ref_dense = stack.reference(x, "pruned"), stack.reference(x, "dense")
        row: dict[str, Any] = {"batch": batch, "tokens": batch * SEQ, "ms": {}, "rel_error": {}}
        for name, fn in variants.items():
            try:
                if name.startswith("sparse"):
                    stack.tune(name.split("_")[1], x)
                y = fn(x)
                ref = ref_pruned if name.startswith("sparse") else ref_dense
                row["rel_error"][name] = _rel_error(y, ref)
                row["ms"][name] = _time_ms(lambda fn=fn, x=x: fn(x), repeat)
            except Exception as exc:  # noqa: BLE001 - a variant that cannot run here is reported, not fatal
                result["errors"][f"{name}@{batch}"] = f"{type(exc).__name__}: {exc}"
                log(f"  {name} at batch {batch}: {type(exc).__name__}: {exc}")
        dense16 = [row["ms"][k] for k in ("dense_fp16_cupy", "dense_fp16_torch") if k in row["ms"]]
        row["ms"]["dense_fp16"] = min(dense16) if dense16 else None
        dense8 = [row["ms"][k] for k in ("dense_int8_cublas", "dense_int8_torch") if k in row["ms"]]
        row["ms"]["dense_int8"] = min(dense8) if dense8 else None
        scale = BERT_LAYERS / layers
        row["samples_per_s"] = {k: (batch * 1000.0 / (v * scale) if v else None) for k, v in row["ms"].items()}
        pairs = (("sparse_int8", "dense_int8"), ("sparse_fp16", "dense_fp16"), ("sparse_fp8", "dense_fp16"))
        for sparse, dense in pairs:
            s, d = row["ms"].get(sparse), row["ms"].get(dense)
            row[f"{sparse}_gain_over_{dense}"] = (d / s - 1.0) if s and d else None
        result["rows"].append(row)
        log(_format_row(row))
    result["seconds"] = time.perf_counter() - t0
    return result


_COLUMNS = [("dense FP16", "dense_fp16"), ("dense INT8", "dense_int8"), ("sparse FP16", "sparse_fp16"),
            ("sparse INT8", "sparse_int8"), ("sparse FP8", "sparse_fp8")]


def _header() -> str:
    cols = "".join(f"{name:>13}" for name, _ in _COLUMNS)
    return f"{'batch':>5}{cols}{'INT8 gain':>11}{'FP16 gain':>11}   (samples/s, 24-layer FFN stack)"


def _format_row(row: dict) -> str:
    sps = row["samples_per_s"]
    cols = "".join(f"{sps[key]:>13.1f}" if sps.get(key) else f"{'-':>13}" for _, key in _COLUMNS)

    def pct(v: Any) -> str:
        return f"{100 * v:+10.1f}%" if v is not None else f"{'-':>11}"

    return (f"{row['batch']:>5}{cols}{pct(row['sparse_int8_gain_over_dense_int8'])}"
            f"{pct(row['sparse_fp16_gain_over_dense_fp16'])}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--layers", type=int, default=4, help="FFN blocks with their own weights (default 4)")
    parser.add_argument("--repeat", type=int, default=20)
    parser.add_argument("--tune-budget", type=float, default=4.0,
                        help="seconds of timed tuning per layer shape (default 4)")
    parser.add_argument("--json", default=None, help="write the results here")
    args = parser.parse_args(argv)
    print(f"BERT-large FFN stack: {args.layers} x ({HIDDEN} -> {FFN} -> {HIDDEN}, ReLU), sequence {SEQ}")
    print(_header())
    result = run(args.batches, args.layers, args.repeat, args.tune_budget)
    print(f"device {result['device']}, cuSPARSELt {result['cusparselt']}, {result['seconds']:.0f} s")
    for row in result["rows"]:
        errs = ", ".join(f"{k} {v:.2e}" for k, v in row["rel_error"].items())
        print(f"batch {row['batch']}: max |y - float32| / max |float32|: {errs}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)
    return 1 if result["errors"] else 0


if __name__ == "__main__":
    sys.exit(main())
