"""The decode kernel's two weight layouts side by side: the packed buffer (``DecodeGemm(weight)``) against the
compact form read where it is (``DecodeGemm.from_compact(values, indices)``, the ``pycusparselt.torch`` modules'
state), each at its best split of K, on the GPU.

Every sample is one call after the L2 cache is overwritten (a memset of twice its size), as the small-batch
choice times them (``pycusparselt.nn.small_batch``); the device-to-device copy bandwidth of 512 MiB is the
reference. Prints one JSON line per (n, k, m): microseconds, percent of the copy bandwidth for the 0.5625-byte
weight, the best splits, and whether both layouts gave the same bits (they need not: the compact form sums K in
another order). Usage: ``python benchmarks/bench_decode_layouts.py``.
"""
from __future__ import annotations

import json

import cupy
import numpy as np
import torch

from pycusparselt.gemm import decode
from pycusparselt.torch import compact
from pycusparselt.tuning.timing import time_gpu_interleaved

SHAPES = ((4096, 4096), (11008, 4096), (4096, 11008), (14336, 4096), (4096, 14336))
ROWS = (1, 16)
_D2D = 3  # cudaMemcpyDeviceToDevice


def main() -> None:
    props = cupy.cuda.runtime.getDeviceProperties(0)
    scrub = cupy.empty(2 * int(props["l2CacheSize"]), np.uint8)
    stream = cupy.cuda.Stream(non_blocking=True)
    sp = stream.ptr
    src = cupy.empty(512 << 20, np.uint8)
    dst = cupy.empty_like(src)
    copy = {"copy": lambda _: cupy.cuda.runtime.memcpyAsync(dst.data.ptr, src.data.ptr, src.nbytes, _D2D, sp)}
    t = time_gpu_interleaved(copy, repeats=10, warmup=2, streams={"copy": stream})
    copy_gbps = 2 * src.nbytes / (t["copy"].median_ms * 1e-3) / 1e9
    print(json.dumps({"copy_gbps": round(copy_gbps, 1), "device": torch.cuda.get_device_name()}), flush=True)
    for n, k in SHAPES:
        torch.manual_seed(0)
        w = torch.randn(n, k, device="cuda", dtype=torch.float16)
        w = w * (torch.rand_like(w).view(n, -1, 4).argsort(-1).argsort(-1) < 2).view(n, k)  # 2:4, random
        gemms = {"packed": decode.DecodeGemm(w), "compact": decode.DecodeGemm.from_compact(*compact.pack(w))}
        for m in ROWS:
            x = torch.randn(m, k, device="cuda", dtype=torch.float16)
            ys = {name: torch.empty(m, n, device="cuda", dtype=torch.float16) for name in gemms}
            calls = {}
            for name, g in gemms.items():
                for s in g.split_choices(n, k):
                    g.set_splits(s)
                    launch = g.launcher(m)
                    calls[f"{name}/{s}"] = (lambda _, launch=launch, x=x, y=ys[name]:
                                            launch(x.data_ptr(), y.data_ptr(), sp))
            times = time_gpu_interleaved(
                calls, repeats=15, warmup=2, lead=0, streams=dict.fromkeys(calls, stream),
                before=lambda _: cupy.cuda.runtime.memsetAsync(scrub.data.ptr, 0, scrub.nbytes, sp))
            best: dict = {}
            for key, timing in times.items():
                name, s = key.split("/")
                us = timing.median_ms * 1e3
                if name not in best or us < best[name][0]:
                    best[name] = (us, int(s))
            nbytes = n * k * 9 // 16 * 2
            torch.cuda.synchronize()
            row = {"n": n, "k": k, "m": m, **{f"{nm}_us": round(v[0], 2) for nm, v in best.items()},
                   **{f"{nm}_pct_copy": round(100 * nbytes / (v[0] * 1e-6) / 1e9 / copy_gbps, 1)
                      for nm, v in best.items()},
                   **{f"{nm}_splits": v[1] for nm, v in best.items()},
                   "same_bits": torch.equal(ys["packed"], ys["compact"])}
            print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
