"""The decode kernel (pycusparselt.gemm.decode) against cuSPARSELt (SparseLinear, tuned, small batches padded
to 16 rows) and dense cuBLAS (torch.matmul), FP16, at decode shapes; with the device-to-device copy bandwidth
measured in the same run as the reference.

Every GEMM time is a CUDA-graph replay of one call per weight copy, the copies (distinct buffers, together
several times the L2) rotated so that no call finds its weight in the L2; the time per call is the median over
replays divided by the copies. All three backends are captured on one CuPy stream (the PyTorch calls through a
``torch.cuda.ExternalStream`` of it), and every measurement is checked: a time per call under 1 us (an empty
capture) or an output, written by the replays into a buffer filled with NaN after the capture, more than 1e-2
(max abs difference / max abs) away from dense cuBLAS (dense itself: from the float32 product) raises.
``gbps`` counts the bytes each backend must read: the packed weight (0.5625 of dense) for ours and cuSPARSELt,
the dense weight for cuBLAS, plus x and y. ``copy_gbps`` counts a copy's bytes read plus bytes written (a copy
of B bytes moves 2B).

Parts (``--parts``): ``probe`` (the mma.sp metadata layout), ``gemm`` (one GEMM per shape and m), ``stack``
(an LLM decode stack captured whole), ``splitk`` (cuSPARSELt's split-K settings at each shape, see
:func:`bench_splitk`). ``--backend-label`` names the cuSPARSELt rows (``cusparselt-0.10`` for a run with
``PYCUSPARSELT_LIBRARY`` pointing at cuSPARSELt 0.10); the JSON records the version and path of the library
the run loaded.
SparseLinear runs with ``PYCUSPARSELT_DECODE_KERNEL=off`` (where the package has that setting), so that its
rows are cuSPARSELt's.

    python benchmarks/bench_decode.py --out benchmarks/results/decode_<gpu>_<date>.json
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import sys
import time

import numpy as np

SHAPES = [(4096, 4096), (11008, 4096), (4096, 11008), (14336, 4096), (4096, 14336)]
MS = [1, 2, 4, 8, 16]
ROTATE_BYTES = 400 << 20
PARTS = ("probe", "gemm", "stack", "splitk")
#: A time per call below this is no GEMM at all (an empty capture): the run stops.
MIN_US = 1.0
#: The largest max abs difference / max abs of the reference an output may have.
MAX_REL_DIFF = 1e-2
#: The split-K part: rows (each padded to 16, as SparseLinear does), split-K factors and modes tried. Modes are
#: ``cusparseLtSplitKMode_t`` values: 1 ONE_KERNEL, 2 TWO_KERNELS (the tuner's); 0 is INVALID_MODE.
SPLITK_MS = (1, 4, 16)
SPLIT_KS = (1, 2, 3, 4, 6, 8, 16, 32)
SPLIT_K_MODES = (1, 2)
#: Weight copies rotated in the split-K part: each copy is a plan of its own, re-initialised for every
#: setting, so fewer than the GEMM part's (still three times an H100's 50 MB L2).
SPLITK_ROTATE_BYTES = 160 << 20
SMALL_BATCH_ROWS = 16
#: SparseLinear's choice of kernel for 1-16 rows, where the package has one: "off" keeps it on cuSPARSELt.
DECODE_KERNEL_SETTING = "PYCUSPARSELT_DECODE_KERNEL"

_streams: dict = {}


def _stream():
    """The stream every timed graph is captured and replayed on (one per device, kept for the run)."""
    import cupy as cp

    device = cp.cuda.runtime.getDevice()
    if device not in _streams:
        _streams[device] = cp.cuda.Stream(non_blocking=True)
    return _streams[device]


def check_time(us: float, what: str) -> float:
    """``us``, or RuntimeError when it is below :data:`MIN_US` (nothing, or not the GEMM, was captured)."""
    if not us >= MIN_US:
        raise RuntimeError(f"{what}: {us:.3f} us per call is below {MIN_US} us: the capture holds no GEMM "
                           f"(work on another stream?); not recording it")
    return us


def rel_diff(got, ref) -> float:
    """max |got - ref| / max |ref|, in float32 (NumPy or CuPy arrays); NaN where ``got`` holds NaN."""
    got, ref = got.astype("float32"), ref.astype("float32")
    return float(abs(got - ref).max() / abs(ref).max())


class WrongOutput(RuntimeError):
    """An output further than :data:`MAX_REL_DIFF` from its reference (or NaN: not written by the replays)."""


def check_close(got, ref, what: str, against: str = "dense") -> float:
    """The relative difference of ``got`` from ``ref``; :class:`WrongOutput` above :data:`MAX_REL_DIFF` (or NaN:
    the replays did not write the output)."""
    err = rel_diff(got, ref)
    if not err <= MAX_REL_DIFF:
        raise WrongOutput(f"{what}: output differs from {against} by {err:.3g} (max abs diff / max abs; limit "
                           f"{MAX_REL_DIFF}; NaN: the replays did not write it)")
    return err


def _median_graph_us(fn, calls: int, replays: int = 30, poison: tuple = (), what: str = "graph") -> float:
    """Median microseconds per call of ``fn`` (``calls`` calls) captured in a CUDA graph on CuPy's stream
    :func:`_stream`. ``poison``: output arrays filled with NaN after the capture, so that only the replays
    can write them. Raises below :data:`MIN_US` per call."""
    import cupy as cp

    stream = _stream()
    cp.cuda.runtime.deviceSynchronize()  # inputs made on other streams are ready
    with stream:
        fn()
        stream.synchronize()
        stream.begin_capture()
        try:
            fn()
        except BaseException:
            try:
                stream.end_capture()
            except Exception:  # noqa: BLE001 - the capture is invalid anyway: the first error is the one to see
                pass
            raise
        graph = stream.end_capture()
        for out in poison:
            out.fill(np.nan)
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
    return check_time(float(np.median(times)), what)


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

    us = _median_graph_us(copy_once, 1, 20, what="copy")
    return 2 * n / (us * 1e-6) / 1e9


def _two_four(rng, n, k):
    import cupy as cp

    w = (rng.standard_normal((n, k), dtype=cp.float32) * k ** -0.5).reshape(-1, 4)
    rank = cp.argsort(cp.argsort(cp.abs(w), axis=1), axis=1)
    w[rank < 2] = 0
    return w.reshape(n, k).astype(cp.float16)


def _torch_on_cupy_stream():
    """A context that makes PyTorch's current stream CuPy's current one (for work captured on it)."""
    import cupy as cp
    import torch

    return torch.cuda.stream(torch.cuda.ExternalStream(cp.cuda.get_current_stream().ptr))


def _line(rows: list) -> str:
    return " ".join(f"{r['backend']}{'/' + str(r['splits']) if 'splits' in r else ''}={r['us']:.1f}us,"
                    f"{r['gbps']:.0f}GB/s" for r in rows)


def bench_shape(n: int, k: int, rows: list, tune_budget: float, sweep: bool, label: str = "cusparselt") -> None:
    """One shape: ours at each split (and the best), cuSPARSELt (SparseLinear, rows labelled ``label``) and
    dense cuBLAS (torch.matmul) at every m of :data:`MS`, all captured on CuPy's stream :func:`_stream`."""
    import cupy as cp
    import torch

    import pycusparselt as psl
    from pycusparselt.gemm import decode, decode_layout

    rng = cp.random.default_rng(n + k)
    w = _two_four(rng, n, k)
    w32 = w.astype(cp.float32)
    packed_bytes = decode_layout.packed_nbytes(n, k)
    copies = max(2, math.ceil(ROTATE_BYTES / packed_bytes))
    dense_copies = max(2, math.ceil(ROTATE_BYTES / (n * k * 2)))
    base = decode.DecodeGemm(w)
    choices = sorted(set(decode.DecodeGemm.split_choices(n, k) + [base.splits])) if sweep else [base.splits]
    gemms = {}
    for s in choices:
        # one object per copy (each packs its own weight): a shallow copy would share the object's cached
        # launchers, which hold the packed weight's address, and every call would read the same copy
        gemms[s] = [decode.DecodeGemm(w, splits=s) for _ in range(copies)]
        if len({g.packed.data.ptr for g in gemms[s]}) != copies:
            raise RuntimeError(f"{n}x{k}: the decode kernel's weight copies share memory")
    wd = [torch.from_dlpack(w.copy()) for _ in range(dense_copies)]  # CuPy-owned copies, as tensors
    layer = psl.SparseLinear(w, prune=None, autotune={"budget_s": tune_budget})
    x16 = rng.standard_normal((16, k), dtype=cp.float32).astype(cp.float16)
    layer(x16)  # builds and tunes the 16-row plan every m of 1-16 runs on
    layers = [layer]
    for _ in range(copies - 1):
        extra = psl.SparseLinear(w, prune=None, autotune={"budget_s": tune_budget})
        extra.tuned_configs = layer.tuned_configs
        layers.append(extra)
    cp.cuda.runtime.deviceSynchronize()
    for m in MS:
        where = f"{n}x{k} m={m}"
        x = rng.standard_normal((m, k), dtype=cp.float32).astype(cp.float16)
        xt = torch.from_dlpack(x)
        ref = x.astype(cp.float32) @ w32.T  # eager (CuPy refuses cuBLAS calls during capture)
        io = (m * k + m * n) * 2
        mine = []
        # dense first: the reference of the others
        out_dense = cp.empty((m, n), cp.float16)
        out_dense_t = torch.from_dlpack(out_dense)

        def dense(xt=xt, out=out_dense_t) -> None:
            with _torch_on_cupy_stream():
                for wi in wd:
                    torch.matmul(xt, wi.T, out=out)

        us = _median_graph_us(dense, len(wd), poison=(out_dense,), what=f"{where} dense")
        err = check_close(out_dense, ref, f"{where} dense", "the float32 product")
        mine.append({"m": m, "n": n, "k": k, "dtype": "float16", "backend": "dense", "us": round(us, 3),
                     "gbps": round((n * k * 2 + io) / us / 1e3, 1), "rel_diff": err})
        out = cp.empty((m, n), cp.float16)
        best = None
        for s, gs in gemms.items():
            us = _median_graph_us(lambda gs=gs, x=x, out=out: [g(x, out) for g in gs], len(gs), poison=(out,),
                                  what=f"{where} ours/{s}")
            err = check_close(out, out_dense, f"{where} ours/{s}")
            row = {"m": m, "n": n, "k": k, "dtype": "float16", "backend": "ours", "splits": s,
                   "default": s == base.splits, "us": round(us, 3), "gbps": round((packed_bytes + io) / us / 1e3, 1),
                   "rel_diff": err}
            if best is None or us < best["us"]:
                best = row
            mine.append(row)
        mine.append(dict(best, backend="ours-best"))
        out_sl = cp.empty((m, n), cp.float16)
        for layer_ in layers:  # each layer's product for this m prepared outside any capture
            layer_(x, out=out_sl)
        us = _median_graph_us(lambda x=x, out=out_sl: [lay(x, out=out) for lay in layers], len(layers),
                              poison=(out_sl,), what=f"{where} {label}")
        err = check_close(out_sl, out_dense, f"{where} {label}")
        mine.append({"m": m, "n": n, "k": k, "dtype": "float16", "backend": label, "us": round(us, 3),
                     "gbps": round((layer.compressed_nbytes + io) / us / 1e3, 1), "rel_diff": err,
                     "config": next((e["config"] for e in layer.tuned_configs), None)})
        rows.extend(mine)
        print(f"m={m}: " + _line(mine), flush=True)


# -- cuSPARSELt's split-K settings ----------------------------------------------------------------------


def bench_splitk(n: int, k: int, rows: list, tune_budget: float, label: str = "cusparselt",
                 split_ks: tuple = SPLIT_KS, modes: tuple = SPLIT_K_MODES, ms: tuple = SPLITK_MS,
                 rotate_bytes: int = SPLITK_ROTATE_BYTES, save=lambda: None) -> None:
    """cuSPARSELt at every split-K setting the library accepts, for x (16, K) @ W.T, W (N, K) 2:4.

    The plan is made as SparseLinear makes a layer's (``SparseMatmulPlan(x16, W.T, sparse="b")``), tuned
    (``budget_s=tune_budget``). For the tuned algorithm id and the default one, the library's own split-K
    setting and then every ``split_k`` x ``split_k_mode`` is set as ``plan.config``; what the library refuses is
    recorded as a row with ``refused`` (the error text), the rest is compressed (one plan and compressed weight
    per rotated copy) and timed in CUDA-graph replays for each m of ``ms``: m = 16 runs the product alone, a
    smaller m copies its rows into a zero-padded 16-row buffer and the result's first m rows out (one
    cudaMemcpyAsync each), as SparseLinear's small-batch call does. An output further than
    :data:`MAX_REL_DIFF` from the float32 product is recorded as ``wrong_output`` (no time); a time under
    :data:`MIN_US` stops the run. Rows go to ``rows``; ``save`` is called after each setting (a run cut short
    keeps what it measured).
    """
    import cupy as cp

    import pycusparselt as psl

    rng = cp.random.default_rng(n + k)
    w = _two_four(rng, n, k)
    wt = w.T  # (K, N), F-contiguous: the sparse B in the TN form
    w32 = w.astype(cp.float32)
    example = rng.standard_normal((SMALL_BATCH_ROWS, k), dtype=cp.float32).astype(cp.float16)
    plans = [psl.SparseMatmulPlan(example, wt, sparse="b")]
    default = plans[0].config
    tuned = plans[0].autotune(example, wt, budget_s=tune_budget)
    base = {"n": n, "k": k, "dtype": "float16", "backend": label}
    rows.append(dict(base, kind="plan", default_config=default._asdict(), tuned_config=tuned._asdict(),
                     max_alg_id=plans[0].max_alg_id))
    first = True
    copies = 2
    stage = cp.zeros((SMALL_BATCH_ROWS, k), cp.float16)  # rows past m stay zero
    out16 = cp.empty((SMALL_BATCH_ROWS, n), cp.float16)
    inputs = {m: rng.standard_normal((m, k), dtype=cp.float32).astype(cp.float16) for m in ms}
    refs = {m: x.astype(cp.float32) @ w32.T for m, x in inputs.items()}
    runtime = cp.cuda.runtime
    d2d = runtime.memcpyDeviceToDevice
    for alg in sorted({default.alg_id, tuned.alg_id}):
        settings = [(None, None)] + [(s, mode) for s in split_ks for mode in modes]
        for split_k, mode in settings:
            config = psl.PlanConfig(alg, split_k, mode)
            entry = dict(base, alg_id=alg, split_k=split_k, split_k_mode=mode, library_default=split_k is None,
                         default=split_k is None and alg == default.alg_id)
            comps = []
            try:
                plans[0].config = config
                applied = plans[0].config
                if first:  # the copies: as many plans as weight copies to rotate
                    copies = max(2, math.ceil(rotate_bytes / plans[0].compressed_size()))
                    plans += [psl.SparseMatmulPlan(example, wt, sparse="b") for _ in range(copies - 1)]
                    first = False
                for plan in plans[1:]:
                    plan.config = config
                comps = [plan.compress(wt, check=i == 0) for i, plan in enumerate(plans)]
                cp.cuda.runtime.deviceSynchronize()
                stream = _stream()
                launchers = [plan.launcher(c, stream=stream) for plan, c in zip(plans, comps, strict=True)]
                entry.update(applied=applied._asdict(), copies=copies)
                for m in ms:
                    x, out = inputs[m], cp.empty((m, n), cp.float16)
                    if m == SMALL_BATCH_ROWS:
                        def calls(x=x, out=out, launchers=launchers) -> None:
                            sp = cp.cuda.get_current_stream().ptr
                            for launch in launchers:
                                launch(x.data.ptr, out.data.ptr, sp)
                    else:
                        def calls(x=x, out=out, m=m, launchers=launchers) -> None:
                            sp = cp.cuda.get_current_stream().ptr
                            for launch in launchers:
                                runtime.memcpyAsync(stage.data.ptr, x.data.ptr, m * k * 2, d2d, sp)
                                launch(stage.data.ptr, out16.data.ptr, sp)
                                runtime.memcpyAsync(out.data.ptr, out16.data.ptr, m * n * 2, d2d, sp)
                    what = f"{n}x{k} m={m} {label} alg {alg} split_k {split_k} mode {mode}"
                    us = _median_graph_us(calls, len(launchers), poison=(out,), what=what)
                    io = (m * k + m * n) * 2
                    try:
                        err = check_close(out, refs[m], what, "the float32 product")
                    except WrongOutput as exc:  # a setting the library accepts and computes wrongly: a finding
                        rows.append(dict(entry, m=m, wrong_output=str(exc)))
                        print(exc, flush=True)
                        continue
                    rows.append(dict(entry, m=m, us=round(us, 3), gbps=round((comps[0].nbytes + io) / us / 1e3, 1),
                                     rel_diff=err))
            except psl.CuSparseLtError as exc:
                rows.append(dict(entry, refused=f"{type(exc).__name__}: {exc}"))
            finally:
                for c in comps:
                    c.close()
            save()
    for plan in plans:
        plan.close()
    for line in splitk_summary([r for r in rows if r["n"] == n and r["k"] == k and r["backend"] == label]):
        print(line, flush=True)


def splitk_summary(rows: list) -> list[str]:
    """One line per shape (and m): the default configuration's time against the fastest split-K setting,
    and how many settings the library refused."""
    lines = []
    for n, k in dict.fromkeys((r["n"], r["k"]) for r in rows):
        shape = [r for r in rows if (r["n"], r["k"]) == (n, k) and r.get("kind") != "plan"]
        refused = [r for r in shape if "refused" in r]
        settings = {(r["alg_id"], r["split_k"], r["split_k_mode"]) for r in shape}
        wrong = {(r["alg_id"], r["split_k"], r["split_k_mode"]) for r in shape if "wrong_output" in r}
        head = f"{n}x{k} split-K: {len(refused)} of {len(settings)} settings refused"
        if wrong:
            head += f", {len(wrong)} computed wrongly"
        timed = [r for r in shape if "us" in r]
        if not timed:
            first = refused[0]["refused"] if refused else "nothing timed"
            lines.append(f"{head} ({first})")
            continue
        parts = []
        for m in sorted({r["m"] for r in timed}):
            at = [r for r in timed if r["m"] == m]
            default = next((r for r in at if r["default"]), None)
            split = [r for r in at if r["split_k"] is not None]
            best = min(split, key=lambda r: r["us"]) if split else None
            cell = f"m={m}: default " + (f"{default['us']:.1f} us" if default else "not timed")
            if best:
                cell += (f", best split-K {best['us']:.1f} us (alg {best['alg_id']}, split_k {best['split_k']}, "
                         f"mode {best['split_k_mode']})")
                if default:
                    cell += f" = {default['us'] / best['us']:.2f}x"
            parts.append(cell)
        lines.append(f"{head}; " + "; ".join(parts))
    return lines


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


def parse_args(argv: list | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=" ".join(__doc__.split("\n\n")[0].split()))
    p.add_argument("--out", required=True, help="the results JSON (written after every step)")
    p.add_argument("--tune-budget", type=float, default=1.0, help="seconds of cuSPARSELt tuning per problem")
    p.add_argument("--shapes", type=int, default=len(SHAPES), help=f"the first SHAPES of {SHAPES}")
    p.add_argument("--no-sweep", action="store_true", help="ours at its default splits only")
    p.add_argument("--stack-blocks", type=int, default=32)
    p.add_argument("--stack-distinct", type=int, default=4)
    p.add_argument("--parts", nargs="+", default=["probe", "gemm", "stack"], choices=PARTS)
    p.add_argument("--backend-label", default="cusparselt",
                   help="the backend name of the cuSPARSELt rows, e.g. cusparselt-0.10 (default: cusparselt)")
    p.add_argument("--split-k", type=int, nargs="+", default=list(SPLIT_KS), help="splitk part: split-K factors")
    p.add_argument("--split-k-modes", type=int, nargs="+", default=list(SPLIT_K_MODES),
                   help="splitk part: cusparseLtSplitKMode_t values (1 ONE_KERNEL, 2 TWO_KERNELS, ...)")
    p.add_argument("--splitk-rotate-mb", type=int, default=SPLITK_ROTATE_BYTES >> 20,
                   help="splitk part: MB of compressed weight copies rotated")
    return p.parse_args(argv)


def library_info() -> dict:
    """The cuSPARSELt this process loaded: version, path and how it was found."""
    import pycusparselt as psl
    from pycusparselt._native.library import load

    return {"cusparselt": ".".join(map(str, psl.library_version())), "cusparselt_path": psl.library_path(),
            "cusparselt_found_via": load().found_via}


def main(argv: list | None = None) -> int:
    import os
    import tempfile

    import cupy as cp

    # tuning writes its cache there (the default location needs platformdirs, absent on bare machines)
    os.environ.setdefault("PYCUSPARSELT_CACHE_DIR", tempfile.mkdtemp(prefix="pycusparselt-bench-"))
    # the cuSPARSELt rows are cuSPARSELt: SparseLinear may otherwise serve 1-16 rows with the decode kernel
    os.environ[DECODE_KERNEL_SETTING] = "off"

    a = parse_args(argv)
    label = a.backend_label
    props = cp.cuda.runtime.getDeviceProperties(0)
    name = props["name"].decode() if isinstance(props["name"], bytes) else str(props["name"])
    result = {"gpu": name, "date": time.strftime("%Y-%m-%d"), "python": platform.python_version(),
              "cupy": cp.__version__, "command": " ".join(["python", "benchmarks/bench_decode.py",
                                                          *(sys.argv[1:] if argv is None else argv)]),
              "backend_label": label, **library_info(), DECODE_KERNEL_SETTING: os.environ[DECODE_KERNEL_SETTING],
              "parts": a.parts, "rows": [], "how": __doc__}
    try:
        import torch

        result["torch"] = torch.__version__
    except ImportError:
        pass
    print(f"cuSPARSELt {result['cusparselt']} at {result['cusparselt_path']} ({result['cusparselt_found_via']}); "
          f"rows labelled {label}", flush=True)

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
            print(f"{n}x{k} (per m: backend[/splits]=us,GB/s):", flush=True)
            bench_shape(n, k, result["rows"], a.tune_budget, not a.no_sweep, label)
            save()
    if "stack" in a.parts:
        print(f"stack ({a.stack_blocks} blocks 4096->11008 (bias, ReLU)->4096 (bias), {a.stack_distinct} distinct "
              f"weight pairs, captured):", flush=True)
        result["stack"] = bench_stack(a.stack_blocks, a.stack_distinct, [1, 4, 16], a.tune_budget)
        save()
    if "splitk" in a.parts:
        result["splitk_rotate_mb"] = a.splitk_rotate_mb
        result["splitk"] = []
        for n, k in SHAPES[:a.shapes]:
            print(f"{n}x{k} split-K ({label}):", flush=True)
            bench_splitk(n, k, result["splitk"], a.tune_budget, label, tuple(a.split_k), tuple(a.split_k_modes),
                         rotate_bytes=a.splitk_rotate_mb << 20, save=save)
            save()
    best = [r for r in result["rows"] if r["backend"] == "ours-best"]
    for r in best:
        print(f"m={r['m']:2d} {r['n']}x{r['k']}: ours {r['us']:.2f} us {r['gbps']:.0f} GB/s = "
              f"{100 * r['gbps'] / result['copy_gbps']:.0f}% of copy (splits {r['splits']})")
    for line in splitk_summary(result.get("splitk", [])):
        print(line)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
