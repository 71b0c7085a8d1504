"""Strong scaling of the tensor-parallel 2:4 sparse MLP block on 1, 2, 4, ... GPUs (one process per GPU).

Usage::

    python benchmarks/mlp_scaling.py --gpus 1 2 4 [--shapes bert-large llm] [--repeat 20] [--json out.json]
        [--forms allreduce sequence data] [--chunks 1 2 4] [--launcher torchrun|mpirun] [--one-gpu-per-process]

For each GPU count the script starts itself under ``torchrun --standalone --nproc_per_node G`` (or
``mpirun -np G python -m mpi4py``); every rank
builds the same FP16 block ``y = relu(x @ W1.T + b1) @ W2.T + b2`` (a :class:`ParallelSparseMLP`: hidden
features sharded, one all-reduce) and times it with CUDA events (median of ``--repeat`` after warm-up and
autotuning); rank 0 reports. On one GPU it also times the same block as two plain SparseLinear layers and as
dense CuPy (cuBLAS) products. Scaling efficiency at G GPUs is ``t(1) / (G * t(G))`` with ``t(1)`` the
one-rank parallel block: the whole problem is the same at every G (strong scaling). ``allreduce_ms`` is the
all-reduce of the block's output alone (tokens x hidden, FP16), timed the same way. GPU counts above what the
machine has are reported as not run. NVLink multicast stays off (``NCCL_NVLS_ENABLE=0``,
``TORCH_SYMM_MEM_DISABLE_MULTICAST=1``, ``NVSHMEM_DISABLE_NVLS=1``, unless set otherwise; the JSON records them).

Forms (``--forms``; one row each, with ``form`` and ``chunks``): ``allreduce`` (every rank all tokens, one
all-reduce), ``sequence`` (each rank its share of the tokens: all-gather in, reduce-scatter out, one row per
``--chunks`` count) and ``data`` (each rank the whole model on its share of the batch, no collective;
``gather_ms`` is the all-gather of the outputs alone). ``gemm_ms`` is the rank's products alone, as the form
runs them (in chunks, on every rank's rows), in the same run; ``exposed_ms = parallel_ms - gemm_ms`` is the
communication the products did not hide. On one GPU only the all-reduce form runs (every form is the
one-GPU block there), and it is the baseline of every form's speed-up.

Shapes: ``bert-large`` (1024 -> 4096 -> 1024; 3072 and 12288 tokens: 8 and 32 sequences of 384) and
``llm`` (4096 -> 14336 -> 4096, the width of an 8B-parameter LLM's MLP without the gate; 2048 and 8192
tokens).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile

FORMS = ("allreduce", "sequence", "data")
#: NVLink multicast stays off in every rank (NCCL, PyTorch's symmetric memory, NVSHMEM).
MULTICAST_OFF = {"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1", "NVSHMEM_DISABLE_NVLS": "1"}

SHAPES = {
    "bert-large": {"hidden": 1024, "ffn": 4096, "tokens": (3072, 12288)},
    "llm": {"hidden": 4096, "ffn": 14336, "tokens": (2048, 8192)},
}


def _median_ms(cp, fn, repeat: int, warmup: int = 3) -> float:
    for _ in range(warmup):
        fn()
    start, stop = cp.cuda.Event(), cp.cuda.Event()
    times = []
    for _ in range(repeat):
        start.record()
        fn()
        stop.record()
        stop.synchronize()
        times.append(cp.cuda.get_elapsed_time(start, stop))
    return float(statistics.median(times))


def _gemms_ms(cp, mlp, x, pieces, world: int, repeat: int) -> float:
    """The rank's products alone, as the block runs them (every rank's rows of each chunk), no collective."""
    fc1, fc2 = mlp.fc1.shard, mlp.fc2.shard
    chunks = [cp.ascontiguousarray(cp.concatenate([x[c0:c1]] * world)) for c0, c1 in pieces]
    return _median_ms(cp, lambda: [fc2(fc1(c)) for c in chunks], repeat)


def _form_rows(cp, dist, psl, group, args, name, w, x, base) -> list[dict]:
    """Every requested form's row for one shape and token count on this rank."""
    w1, b1, w2, b2 = w
    tokens = x.shape[0]
    world = group.world_size
    rows = []
    bounds = dist.sequence_bounds(tokens, world)
    a, b = bounds[group.rank]
    widest = max(stop - start for start, stop in bounds)
    for form in args.forms if world > 1 else ["allreduce"]:  # on one GPU every form is the one-GPU block
        if form == "data":
            fc1, fc2 = psl.SparseLinear(w1, b1, activation="relu"), psl.SparseLinear(w2, b2)
            share = cp.ascontiguousarray(x[a:b])
            group.barrier()
            t = _median_ms(cp, lambda f=fc1, g=fc2, s=share: g(f(s)), args.repeat)
            y = fc2(fc1(share))
            gather = _median_ms(cp, lambda y=y: dist.gather_rows(y, group=group, batch=tokens), args.repeat)
            rows.append({**base, "form": form, "chunks": 1, "parallel_ms": t, "gemm_ms": t, "exposed_ms": 0.0,
                         "gather_ms": gather})
            fc1.close()
            fc2.close()
            continue
        chunk_counts = args.chunks if form == "sequence" else [1]
        for chunks in chunk_counts:
            mlp = dist.ParallelSparseMLP(w1, b1, w2, b2, group=group, activation="relu", form=form, chunks=chunks)
            if form == "sequence":
                share = cp.ascontiguousarray(x[a:b])
                pieces = dist.sharding.shard_bounds(widest, min(chunks, widest))
                group.barrier()
                t = _median_ms(cp, lambda mlp=mlp, share=share: mlp(share, tokens=tokens), args.repeat)
                gemm = _gemms_ms(cp, mlp, cp.ascontiguousarray(x[:widest]), pieces, world, args.repeat)
            else:
                group.barrier()
                t = _median_ms(cp, lambda mlp=mlp: mlp(x), args.repeat)
                gemm = _gemms_ms(cp, mlp, x, ((0, tokens),), 1, args.repeat)
            row = {**base, "form": form, "chunks": chunks, "hidden_shards": list(mlp.fc1.sizes), "parallel_ms": t,
                   "gemm_ms": gemm, "exposed_ms": t - gemm}
            if world > 1 and form == "allreduce":
                y = cp.zeros((tokens, w2.shape[0]), cp.float16)
                row["allreduce_ms"] = _median_ms(cp, lambda y=y: group.all_reduce(y), args.repeat)
            if world == 1:
                fc1, fc2 = psl.SparseLinear(w1, b1, activation="relu"), psl.SparseLinear(w2, b2)
                row["sparselinear_ms"] = _median_ms(cp, lambda f=fc1, g=fc2: g(f(x)), args.repeat)
                row["dense_ms"] = _median_ms(
                    cp, lambda: cp.maximum(x @ w1.T + b1, 0) @ w2.T + b2, args.repeat
                )
                diff = float(cp.abs(mlp(x).astype(cp.float32) - fc2(fc1(x)).astype(cp.float32)).max())
                row["max_abs_diff_vs_sparselinear"] = diff
                fc1.close()
                fc2.close()
            rows.append(row)
            mlp.close()
    return rows


def worker(args: argparse.Namespace) -> None:
    """One rank: time every shape and form, rank 0 appends JSON lines to ``args.result``."""
    if args.one_gpu_per_process:
        from pycusparselt.distributed import pin_local_gpu

        pin_local_gpu()  # before CuPy starts CUDA
    import cupy as cp

    import pycusparselt as psl
    from pycusparselt import distributed as dist

    group = dist.init_process_group("nccl", device=0 if args.one_gpu_per_process else None)
    rank0 = group.rank == 0
    for name in args.shapes:
        shape = SHAPES[name]
        hidden, ffn = shape["hidden"], shape["ffn"]
        rng = cp.random.default_rng(0)  # the same weights on every rank
        w1 = (rng.standard_normal((ffn, hidden), dtype=cp.float32) / hidden**0.5).astype(cp.float16)
        b1 = (0.1 * rng.standard_normal(ffn, dtype=cp.float32)).astype(cp.float16)
        w2 = (rng.standard_normal((hidden, ffn), dtype=cp.float32) / ffn**0.5).astype(cp.float16)
        b2 = (0.1 * rng.standard_normal(hidden, dtype=cp.float32)).astype(cp.float16)
        for tokens in shape["tokens"]:
            x = rng.standard_normal((tokens, hidden), dtype=cp.float32).astype(cp.float16)
            base = {"shape": name, "hidden": hidden, "ffn": ffn, "tokens": tokens, "gpus": group.world_size,
                    "hidden_shards": [ffn], "engine": group.engine,
                    "one_gpu_per_process": bool(args.one_gpu_per_process)}
            for row in _form_rows(cp, dist, psl, group, args, name, (w1, b1, w2, b2), x, base):
                if rank0:
                    with open(args.result, "a") as f:
                        f.write(json.dumps(row) + "\n")
        del w1, w2
        cp.get_default_memory_pool().free_all_blocks()
    group.barrier()
    group.close()


def _environment() -> dict:
    import cupy as cp

    from pycusparselt import distributed as dist
    from pycusparselt import library_version

    props = cp.cuda.runtime.getDeviceProperties(0)
    name = props["name"]
    return {
        "device": name.decode() if isinstance(name, bytes) else str(name),
        "visible_gpus": cp.cuda.runtime.getDeviceCount(),
        "cusparselt": ".".join(map(str, library_version())),
        "nccl": int(dist.load_nccl().get_version()),
        "cupy": cp.__version__,
        "python": platform.python_version(),
    }


def controller(args: argparse.Namespace) -> int:
    import cupy as cp

    available = cp.cuda.runtime.getDeviceCount()
    env = _environment()
    print(f"{env['device']} x{available}, cuSPARSELt {env['cusparselt']}, NCCL {env['nccl']}, CuPy {env['cupy']}")
    rows, not_run, failed = [], [], 0
    for gpus in args.gpus:
        if gpus > available:
            not_run.append({"gpus": gpus, "reason": f"only {available} GPU(s) visible"})
            print(f"{gpus} GPUs: not run (only {available} visible)")
            continue
        if args.json:  # rank 0's rows land beside the summary as they are measured (kept if a run is cut short)
            result = f"{os.path.splitext(args.json)[0]}_{gpus}gpu.jsonl"
            open(result, "w").close()
        else:
            with tempfile.NamedTemporaryFile("r", suffix=".jsonl", delete=False) as f:
                result = f.name
        if args.launcher == "torchrun":
            launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(gpus)]
        else:
            launcher = ["mpirun", "-np", str(gpus), sys.executable, "-m", "mpi4py"]
        command = [*launcher, os.path.abspath(__file__), "--worker", "--result", result, "--repeat", str(args.repeat),
                   "--shapes", *args.shapes, "--forms", *args.forms, "--chunks", *map(str, args.chunks)]
        command += ["--one-gpu-per-process"] if args.one_gpu_per_process else []
        status = subprocess.run(command, timeout=args.timeout).returncode
        with open(result) as f:
            rows.extend(json.loads(line) for line in f if line.strip())
        if not args.json:
            os.unlink(result)
        if status:
            failed += 1
            not_run.append({"gpus": gpus, "reason": f"the run exited with status {status}"})
    base = {(r["shape"], r["tokens"]): r["parallel_ms"] for r in rows
            if r["gpus"] == 1 and r.get("form", "allreduce") == "allreduce"}
    for r in rows:
        t1 = base.get((r["shape"], r["tokens"]))
        r["speedup_vs_1gpu"] = None if t1 is None else t1 / r["parallel_ms"]
        r["scaling_efficiency"] = None if t1 is None else t1 / (r["gpus"] * r["parallel_ms"])
    print(f"{'shape':>10} {'tokens':>6} {'GPUs':>4} {'form':>9} {'chunks':>6} {'shards':>18} {'parallel ms':>11} "
          f"{'speedup':>7} {'effic.':>6} {'exposed ms':>10} {'all-reduce ms':>13} {'SparseLinear ms':>15} "
          f"{'dense ms':>8}")
    for r in sorted(rows, key=lambda r: (r["shape"], r["tokens"], r["gpus"], r.get("form", ""), r.get("chunks", 1))):
        def fmt(v, spec):
            return format(v, spec) if v is not None else "-"
        speedup, efficiency = fmt(r["speedup_vs_1gpu"], ">6.2f"), fmt(r["scaling_efficiency"], ">6.2f")
        print(f"{r['shape']:>10} {r['tokens']:>6} {r['gpus']:>4} {r.get('form', 'allreduce'):>9} "
              f"{r.get('chunks', 1):>6} "
              f"{str(tuple(r['hidden_shards'])):>18} {r['parallel_ms']:>11.3f} {speedup}x {efficiency} "
              f"{fmt(r.get('exposed_ms'), '>10.3f')} {fmt(r.get('allreduce_ms'), '>13.3f')} "
              f"{fmt(r.get('sparselinear_ms'), '>15.3f')} {fmt(r.get('dense_ms'), '>8.3f')}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"environment": {**env, "launcher": args.launcher,
                                       "one_gpu_per_process": bool(args.one_gpu_per_process),
                                       "forms": list(args.forms), "chunks": list(args.chunks),
                                       **{k: os.environ.get(k) for k in MULTICAST_OFF}},
                       "rows": rows, "not_run": not_run}, f, indent=1)
    return 1 if failed else 0


def main() -> int:
    for name, value in MULTICAST_OFF.items():  # inherited by the ranks the controller starts
        os.environ.setdefault(name, value)
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gpus", type=int, nargs="+", default=[1, 2, 4], help="GPU counts to run (default 1 2 4)")
    parser.add_argument("--shapes", nargs="+", choices=sorted(SHAPES), default=sorted(SHAPES))
    parser.add_argument("--forms", nargs="+", choices=FORMS, default=["allreduce"],
                        help="the block's forms to time (default allreduce): allreduce, sequence (all-gather in, "
                             "reduce-scatter out, in --chunks pieces), data (the whole model on each rank's share)")
    parser.add_argument("--chunks", type=int, nargs="+", default=[1, 2, 4],
                        help="the sequence form's chunk counts, one row each (default 1 2 4)")
    parser.add_argument("--repeat", type=int, default=20, help="timed runs per case (median)")
    parser.add_argument("--timeout", type=float, default=600, help="seconds allowed per GPU count")
    parser.add_argument("--json", help="write the results here")
    parser.add_argument("--launcher", choices=("torchrun", "mpirun"), default="torchrun",
                        help="what starts the ranks (default torchrun: needs PyTorch; mpirun: mpi4py and MPI)")
    parser.add_argument("--one-gpu-per-process", action="store_true",
                        help="each rank sees only its own GPU (CUDA_VISIBLE_DEVICES), as its device 0, so every rank "
                             "tunes (off device 0 only the default configuration runs)")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--result", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args)
        return 0
    return controller(args)


if __name__ == "__main__":
    raise SystemExit(main())
