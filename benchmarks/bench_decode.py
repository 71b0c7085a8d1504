"""The decode kernel (pycusparselt.gemm.decode) against cuSPARSELt (SparseLinear, tuned, small batches padded
to 16 rows) and dense cuBLAS (torch.nn.functional.linear), FP16, at decode shapes; with the device-to-device
copy bandwidth measured in the same run as the reference.

Every GEMM time is a CUDA-graph replay of one call per weight copy, the copies (distinct buffers, together
several times the L2) rotated so that no call finds its weight in the L2; the time per call is the median over
replays divided by the copies. ``gbps`` counts the bytes each backend must read: the packed weight
(0.5625 of dense) for ours and cuSPARSELt, the dense weight for cuBLAS, plus x and y. ``copy_gbps`` counts a
copy's bytes read plus bytes written (a copy of B bytes moves 2B).

    python benchmarks/bench_decode.py --out benchmarks/results/decode_<gpu>_<date>.json
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import platform
import time

import numpy as np

SHAPES = [(4096, 4096), (11008, 4096), (4096, 11008), (14336, 4096), (4096, 14336)]
MS = [1, 2, 4, 8, 16]
ROTATE_BYTES = 400 << 20


def _median_graph_us(fn, calls: int, replays: int = 30) -> float:
    import cupy as cp

    stream = cp.cuda.Stream(non_blocking=True)
    with stream:
        fn()
        stream.synchronize()
        stream.begin_capture()
        fn()
        graph = stream.end_capture()
        graph.launch(stream)
        stream.synchronize()
        times = []
        for _ in range(replays):
            a, b = cp.cuda.Event(), cp.cuda.Event()
            a.record(stream)
            graph.launch(stream)
            b.record(stream)
            b.synchronize()
            times.append(cp.cuda.get_elapsed_time(a, b) * 1e3 / calls)
    return float(np.median(times))


def copy_bandwidth() -> float:
    import cupy as cp

    n = 1 << 30
    src, dst = cp.empty(n, cp.uint8), cp.empty(n, cp.uint8)
    src.fill(1)
    runtime = cp.cuda.runtime

    def copy_once() -> None:
        # one cudaMemcpyAsync: cupy.copyto of uint8 runs an elementwise kernel of 1-byte accesses, far slower
        # (2.75 TB/s read + write on an H200, 2026-12-06)
        runtime.memcpyAsync(dst.data.ptr, src.data.ptr, n, runtime.memcpyDeviceToDevice,
                            cp.cuda.get_current_stream().ptr)

    us = _median_graph_us(copy_once, 1, 20)
    return 2 * n / (us * 1e-6) / 1e9


def _two_four(rng, n, k):
    import cupy as cp

    w = (rng.standard_normal((n, k), dtype=cp.float32) * k ** -0.5).reshape(-1, 4)
    rank = cp.argsort(cp.argsort(cp.abs(w), axis=1), axis=1)
    w[rank < 2] = 0
    return w.reshape(n, k).astype(cp.float16)


def bench_shape(n: int, k: int, rows: list, tune_budget: float, sweep: bool) -> None:
    import cupy as cp
    import torch

    import pycusparselt as psl
    from pycusparselt.gemm import decode, decode_layout

    rng = cp.random.default_rng(n + k)
    w = _two_four(rng, n, k)
    packed_bytes = decode_layout.packed_nbytes(n, k)
    copies = max(2, math.ceil(ROTATE_BYTES / packed_bytes))
    dense_copies = max(2, math.ceil(ROTATE_BYTES / (n * k * 2)))
    base = decode.DecodeGemm(w)
    choices = sorted(set(decode.DecodeGemm.split_choices(n, k) + [base.splits])) if sweep else [base.splits]
    gemms = {}
    for s in choices:
        g0 = decode.DecodeGemm(w, splits=s)
        gs = [g0]
        for _ in range(copies - 1):
            g = copy.copy(g0)
            g.packed = g0.packed.copy()
            gs.append(g)
        gemms[s] = gs
    wd = [torch.from_dlpack(w).clone() for _ in range(dense_copies)]
    layer = psl.SparseLinear(w, prune=None, autotune={"budget_s": tune_budget})
    x16 = torch.randn(16, k, device="cuda", dtype=torch.float16)
    layer(x16)
    layers = [layer]
    for _ in range(copies - 1):
        extra = psl.SparseLinear(w, prune=None, autotune={"budget_s": tune_budget})
        extra.tuned_configs = layer.tuned_configs
        layers.append(extra)
    for m in MS:
        x = torch.randn(m, k, device="cuda", dtype=torch.float16)
        xc = cp.from_dlpack(x)
        out = cp.empty((m, n), cp.float16)
        outt = torch.empty((m, n), device="cuda", dtype=torch.float16)
        io = (m * k + m * n) * 2
        best = None
        for s, gs in gemms.items():
            us = _median_graph_us(lambda gs=gs: [g(xc, out) for g in gs], len(gs))  # noqa: B023
            row = {"m": m, "n": n, "k": k, "dtype": "float16", "backend": "ours", "splits": s,
                   "default": s == base.splits, "us": round(us, 3), "gbps": round((packed_bytes + io) / us / 1e3, 1)}
            if best is None or us < best["us"]:
                best = row
            rows.append(row)
        best = dict(best, backend="ours-best")
        rows.append(best)
        for layer_ in layers:
            layer_(x, out=outt)
        us = _median_graph_us(lambda: [lay(x, out=outt) for lay in layers], len(layers))  # noqa: B023
        rows.append({"m": m, "n": n, "k": k, "dtype": "float16", "backend": "cusparselt", "us": round(us, 3),
                     "gbps": round((layer.compressed_nbytes + io) / us / 1e3, 1)})
        F = torch.nn.functional
        us = _median_graph_us(lambda: [torch.matmul(x, wi.T, out=outt) for wi in wd], len(wd))  # noqa: B023
        rows.append({"m": m, "n": n, "k": k, "dtype": "float16", "backend": "dense", "us": round(us, 3),
                     "gbps": round((n * k * 2 + io) / us / 1e3, 1)})
        del F
        ours = [r for r in rows if r["m"] == m and r["n"] == n and r["k"] == k]
        print(" ".join(f"{r['backend']}{'/' + str(r['splits']) if 'splits' in r else ''}={r['us']:.1f}us,"
                       f"{r['gbps']:.0f}GB/s" for r in ours), flush=True)


def bench_stack(blocks: int, distinct: int, tokens: list, tune_budget: float) -> list:
    """The inference benchmark's LLM decode stack (``blocks`` MLP blocks 4096 -> 11008 (bias, ReLU) -> 4096
    (bias)), ``distinct`` different weight pairs repeated, each backend captured whole in one graph."""
    import cupy as cp
    import torch

    import pycusparselt as psl
    from pycusparselt.gemm import decode

    rng = cp.random.default_rng(9)
    F = torch.nn.functional
    pairs = []
    for _ in range(distinct):
        w1, w2 = _two_four(rng, 11008, 4096), _two_four(rng, 4096, 11008)
        b1 = (0.1 * rng.standard_normal(11008, dtype=cp.float32)).astype(cp.float16)
        b2 = (0.1 * rng.standard_normal(4096, dtype=cp.float32)).astype(cp.float16)
        t = {"budget_s": tune_budget}
        pairs.append({
            "dense": [torch.from_dlpack(a) for a in (w1, b1, w2, b2)],
            "sl": (psl.SparseLinear(w1, b1, prune=None, activation="relu", autotune=t),
                   psl.SparseLinear(w2, b2, prune=None, autotune=t)),
            "ours": (decode.DecodeGemm(w1, b1, activation="relu"), decode.DecodeGemm(w2, b2)),
        })
    out = []
    for m in tokens:
        x = torch.randn(m, 4096, device="cuda", dtype=torch.float16)
        h = torch.empty(m, 11008, device="cuda", dtype=torch.float16)
        y = torch.empty(m, 4096, device="cuda", dtype=torch.float16)

        def dense(x=x):
            t = x
            for i in range(blocks):
                w1, b1, w2, b2 = pairs[i % distinct]["dense"]
                t = F.linear(torch.relu(F.linear(t, w1, b1)), w2, b2)
            return t

        def sl(x=x, h=h, y=y):
            t = x
            for i in range(blocks):
                fc1, fc2 = pairs[i % distinct]["sl"]
                fc1(t, out=h)
                fc2(h, out=y)
                t = y
            return t

        def ours(x=x, h=h, y=y):
            t = x
            for i in range(blocks):
                g1, g2 = pairs[i % distinct]["ours"]
                g1(t, h)
                g2(h, y)
                t = y
            return t

        for fn in (dense, sl, ours):
            fn()
        torch.cuda.synchronize()
        ref, got_sl, got = dense().float(), sl().float(), ours().float()
        err = float((got - ref).abs().max() / ref.abs().max())
        err_sl = float((got_sl - ref).abs().max() / ref.abs().max())
        stream = torch.cuda.Stream()
        res = {"m": m, "blocks": blocks, "distinct_weights": distinct, "rel_error_ours": err,
               "rel_error_cusparselt": err_sl}
        for name, fn in (("dense", dense), ("cusparselt", sl), ("ours", ours)):
            g = torch.cuda.CUDAGraph()
            with torch.cuda.stream(stream):
                fn()
                stream.synchronize()
                with torch.cuda.graph(g, stream=stream):
                    fn()
            times = []
            for _ in range(20):
                a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                a.record()
                g.replay()
                b.record()
                b.synchronize()
                times.append(a.elapsed_time(b))
            res[f"{name}_ms"] = float(np.median(times))
        res["ours_vs_dense"] = res["dense_ms"] / res["ours_ms"]
        res["cusparselt_vs_dense"] = res["dense_ms"] / res["cusparselt_ms"]
        print(res, flush=True)
        out.append(res)
    return out


def probe_metadata() -> dict:
    """Which (row, group) each lane's metadata nibble selects in mma.sp.m16n8k32 (f16), for each selector:
    the layout the packing assumes, checked on the device."""
    import cupy as cp

    src = r"""
    extern "C" __global__ void probe(float* out) {
        const int lane = threadIdx.x, which = blockIdx.x, sel = blockIdx.y;
        const int tl = which / 8, nib = which % 8;
        const unsigned one2 = 0x3C003C00u;
        unsigned a0 = one2, a1 = one2, a2 = one2, a3 = one2;
        const int t = lane & 3;
        unsigned b[4];
        for (int j = 0; j < 4; ++j) {
            unsigned w = 0;
            for (int e = 0; e < 2; ++e) {
                const int k = 2 * t + 8 * j + e;
                const unsigned short h = (k % 4 >= 2) ? (unsigned short)((15 + k / 4) << 10) : 0;
                w |= ((unsigned)h) << (16 * e);
            }
            b[j] = w;
        }
        unsigned e = 0x44444444u;
        if (lane == tl) e = (e & ~(0xFu << (4 * nib))) | (0xEu << (4 * nib));
        float c[4] = {0, 0, 0, 0};
        if (sel == 0)
            asm volatile("mma.sp.sync.aligned.m16n8k32.row.col.f32.f16.f16.f32 "
                         "{%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9,%10,%11}, {%0,%1,%2,%3}, %12, 0;"
                : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
                : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b[0]), "r"(b[1]), "r"(b[2]), "r"(b[3]), "r"(e));
        else
            asm volatile("mma.sp.sync.aligned.m16n8k32.row.col.f32.f16.f16.f32 "
                         "{%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9,%10,%11}, {%0,%1,%2,%3}, %12, 1;"
                : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
                : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b[0]), "r"(b[1]), "r"(b[2]), "r"(b[3]), "r"(e));
        const int g = lane >> 2;
        float* o = out + (sel * 256 + which) * 16;
        if (t == 0) { o[g] = c[0]; o[g + 8] = c[2]; }
    }
    """
    k = cp.RawKernel(src, "probe")
    out = cp.zeros((2, 256, 16), cp.float32)
    k((256, 2), (32,), (out,))
    d = cp.asnumpy(out)
    found, mismatches = {}, []
    for sel in range(2):
        for which in range(256):
            lane, nib = divmod(which, 8)
            g, t = divmod(lane, 4)
            nz = np.nonzero(d[sel, which])[0]
            got = None if len(nz) == 0 else [(int(r), int(round(math.log2(d[sel, which, r]))) - 1) for r in nz]
            expect = None
            if t // 2 == sel:
                expect = [(g + 8 * (nib // 4), 4 * (t % 2) + nib % 4)]
            if got != expect:
                mismatches.append({"sel": sel, "lane": lane, "nibble": nib, "got": got, "expected": expect})
            found[f"{sel}/{lane}/{nib}"] = got
    return {"matches_packing": not mismatches, "mismatches": mismatches[:20]}


def main() -> int:
    import os
    import tempfile

    import cupy as cp

    # tuning writes its cache there (the default location needs platformdirs, absent on bare machines)
    os.environ.setdefault("PYCUSPARSELT_CACHE_DIR", tempfile.mkdtemp(prefix="pycusparselt-bench-"))

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", required=True)
    p.add_argument("--tune-budget", type=float, default=1.0)
    p.add_argument("--shapes", type=int, default=len(SHAPES))
    p.add_argument("--no-sweep", action="store_true")
    p.add_argument("--stack-blocks", type=int, default=32)
    p.add_argument("--stack-distinct", type=int, default=4)
    p.add_argument("--parts", nargs="+", default=["probe", "gemm", "stack"])
    a = p.parse_args()
    props = cp.cuda.runtime.getDeviceProperties(0)
    name = props["name"].decode() if isinstance(props["name"], bytes) else str(props["name"])
    result = {"gpu": name, "date": time.strftime("%Y-%m-%d"), "python": platform.python_version(),
              "cupy": cp.__version__, "rows": [], "how": __doc__}

    def save():
        with open(a.out, "w") as f:
            json.dump(result, f, indent=1)

    if "probe" in a.parts:
        result["metadata_probe"] = probe_metadata()
        probe = result["metadata_probe"]
        print("metadata probe:", probe["matches_packing"], probe["mismatches"][:4])
        save()
    result["copy_gbps"] = round(copy_bandwidth(), 1)
    print(f"{name}: copy {result['copy_gbps']} GB/s (read + write)", flush=True)
    save()
    if "gemm" in a.parts:
        for n, k in SHAPES[:a.shapes]:
            bench_shape(n, k, result["rows"], a.tune_budget, not a.no_sweep)
            save()
    if "stack" in a.parts:
        result["stack"] = bench_stack(a.stack_blocks, a.stack_distinct, [1, 4, 16], a.tune_budget)
        save()
    best = [r for r in result["rows"] if r["backend"] == "ours-best"]
    for r in best:
        print(f"m={r['m']:2d} {r['n']}x{r['k']}: ours {r['us']:.2f} us {r['gbps']:.0f} GB/s = "
              f"{100 * r['gbps'] / result['copy_gbps']:.0f}% of copy (splits {r['splits']})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
