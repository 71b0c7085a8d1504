"""Host time per sparse GEMM call: pycusparselt against a C loop over cusparseLtMatmul on the same problem.

Usage::

    python benchmarks/host_overhead.py [--problems 64x256x256,256x256x256,4096x4096x4096] [--iters 200]
                                       [--repeats 7] [--rounds 3] [--json out.json]

Builds ``benchmarks/host_overhead.cu`` with nvcc against the cuSPARSELt that pycusparselt loads (its header is
the wheel's ``include`` directory beside ``lib``), then, ``--rounds`` times, runs it and measures the same
problems from Python (each figure is the median over the rounds, so that a slow or fast spell of the host
falls on both sides): FP16
``D (M, N) = A (M, K) @ B (K, N)`` with A 2:4 sparse, every matrix C-contiguous, the default configuration,
on CuPy's current (legacy default) stream, as the C program does. For each problem it reports, in
microseconds per call (medians over the repeats of a loop of ``--iters`` calls with no synchronisation inside):

- ``c_host_us``: wall clock around the C enqueue loop: the library's own host cost;
- ``py_matmul_host_us``: ``plan.matmul(wa, b, out=y)``; ``py_bind_host_us``: ``plan.bind(wa, b, out=y)()``,
  the pre-validated call (where this version has it); ``matmul_call``: how those call the library
  (``compiled`` shim or cffi's ``abi`` mode); where compiled, ``py_bind_abi_host_us`` is the same bound call
  through cffi's ABI mode (``PYCUSPARSELT_FAST_CALL=0``), for comparison; ``py_bindings_host_us``: the
  checked binding-layer call ``pycusparselt.bindings.matmul`` with pre-built arguments;
- ``*_gpu_us``: CUDA events around the same loops (equal to the host time where the GPU waits on the host);
- ``graph_gpu_us``: GPU time per GEMM when the calls are captured in a CUDA graph and replayed.

Without nvcc the C columns are n/a and the reason is recorded (``c_reason``). The JSON is what
``python -m pycusparselt bench --host-overhead PATH`` and ``python benchmarks/tables.py gemm`` put in the report.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

SOURCE = Path(__file__).resolve().parent / "host_overhead.cu"
DEFAULT_PROBLEMS = "64x256x256,256x256x256,4096x4096x4096"


def parse_problems(text: str) -> list[tuple[int, int, int]]:
    problems = []
    for item in filter(None, (part.strip() for part in text.split(","))):
        parts = item.lower().split("x")
        if len(parts) != 3 or not all(p.isdigit() and int(p) > 0 for p in parts):
            raise ValueError(f"--problems: expected MxNxK with positive integers, got {item!r}")
        problems.append(tuple(map(int, parts)))
    if not problems:
        raise ValueError(f"--problems: no problem in {text!r}")
    return problems


def _nvcc() -> str | None:
    found = shutil.which("nvcc")
    if found:
        return found
    for home in (os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"):
        if home and os.path.isfile(os.path.join(home, "bin", "nvcc")):
            return os.path.join(home, "bin", "nvcc")
    return None


def _include_dir(lib_path: str) -> str | None:
    """The cuSPARSELt header's directory: beside the wheel's lib directory, else cuda-pathfinder's answer."""
    candidate = Path(lib_path).resolve().parent.parent / "include"
    if (candidate / "cusparseLt.h").is_file():
        return str(candidate)
    try:
        from cuda import pathfinder

        found = pathfinder.find_nvidia_header_directory("cusparseLt")
        return str(found) if found else None
    except Exception:  # old pathfinder, or nothing found
        return None


def build(workdir: str) -> tuple[str | None, str]:
    """Compile the C program; return (executable or None, the command or the reason it could not be built)."""
    import pycusparselt

    nvcc = _nvcc()
    if nvcc is None:
        return None, "nvcc not found (install the CUDA toolkit or set CUDA_HOME)"
    lib_path = os.path.realpath(pycusparselt.library_path())
    include = _include_dir(lib_path)
    if include is None:
        return None, f"cusparseLt.h not found beside {lib_path}"
    exe = os.path.join(workdir, "host_overhead")
    # the library by path (the wheels ship only libcusparseLt.so.0), found again at run time through rpath
    command = [nvcc, "-O2", "-o", exe, str(SOURCE), f"-I{include}", "-Xlinker", lib_path,
               "-Xlinker", "-rpath", "-Xlinker", os.path.dirname(lib_path), "-lcudart"]
    done = subprocess.run(command, capture_output=True, text=True, timeout=300)
    if done.returncode != 0:
        return None, f"nvcc failed ({done.returncode}): {(done.stderr or done.stdout).strip()[-800:]}"
    return exe, " ".join(command)


def run_c(exe: str, problems: list[tuple[int, int, int]], iters: int, repeats: int) -> list[dict]:
    args = [exe, str(iters), str(repeats), *(f"{m}x{n}x{k}" for m, n, k in problems)]
    done = subprocess.run(args, capture_output=True, text=True, timeout=600)
    if done.returncode != 0:
        raise RuntimeError(f"{exe} failed ({done.returncode}): {done.stderr.strip()[-800:]}")
    return [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]


def _loop(cp, call, iters: int, repeats: int) -> tuple[float, float]:
    """(host us per call, GPU us per call): medians over ``repeats`` loops of ``iters`` calls, no sync inside."""
    for _ in range(20):
        call()
    cp.cuda.Device().synchronize()
    start, stop = cp.cuda.Event(), cp.cuda.Event()
    host, gpu = [], []
    for _ in range(repeats):
        start.record()
        t0 = time.perf_counter()
        for _ in range(iters):
            call()
        t1 = time.perf_counter()
        stop.record()
        stop.synchronize()
        host.append((t1 - t0) / iters * 1e6)
        gpu.append(cp.cuda.get_elapsed_time(start, stop) / iters * 1e3)
    return statistics.median(host), statistics.median(gpu)


def _graph_us(cp, plan, wa, b, y, iters: int, repeats: int) -> float:
    """GPU time per GEMM of ``iters`` calls captured in one CUDA graph and replayed."""
    stream = cp.cuda.Stream(non_blocking=True)
    if hasattr(plan, "bind"):
        call = plan.bind(wa, b, out=y, stream=stream)
    else:
        def call():
            return plan.matmul(wa, b, out=y, stream=stream)
    call()
    stream.synchronize()
    with stream:
        stream.begin_capture()
        try:
            for _ in range(iters):
                call()
        finally:
            graph = stream.end_capture()
    graph.launch(stream)
    stream.synchronize()
    start, stop = cp.cuda.Event(), cp.cuda.Event()
    times = []
    for _ in range(repeats):
        start.record(stream)
        graph.launch(stream)
        stop.record(stream)
        stop.synchronize()
        times.append(cp.cuda.get_elapsed_time(start, stop) / iters * 1e3)
    return statistics.median(times)


def _raw_call(plan, wa, b, y):
    """The binding layer's checked call with pre-built arguments (None where the plan's internals differ)."""
    from pycusparselt import bindings

    try:
        import cupy as cp

        args = (plan._handle.raw, plan._plan, 1.0, wa.ptr, b.data.ptr, 0.0, y.data.ptr, y.data.ptr,
                plan._workspace.data.ptr, [cp.cuda.get_current_stream().ptr])
    except AttributeError:
        return None

    def call():
        bindings.matmul(*args)

    return call


def _measure_one(m: int, n: int, k: int, iters: int, repeats: int) -> dict:
    import cupy as cp

    import pycusparselt as psl

    a = cp.random.standard_normal((m, k), dtype=cp.float32).astype(cp.float16)
    b = cp.random.standard_normal((k, n), dtype=cp.float32).astype(cp.float16)
    y = cp.empty((m, n), dtype=cp.float16)
    row: dict = {"m": m, "n": n, "k": k}
    with psl.SparseMatmulPlan(a, b) as plan, plan.compress(a, prune="strip") as wa:
        row["config"] = list(plan.config)
        row["py_matmul_host_us"], row["py_matmul_gpu_us"] = _loop(
            cp, lambda: plan.matmul(wa, b, out=y), iters, repeats)
        if hasattr(plan, "bind"):
            row["py_bind_host_us"], row["py_bind_gpu_us"] = _loop(cp, plan.bind(wa, b, out=y), iters, repeats)
        else:
            row["py_bind_host_us"] = row["py_bind_gpu_us"] = None
            row["bind_reason"] = "SparseMatmulPlan.bind is not available in this version"
        raw = _raw_call(plan, wa, b, y)
        try:
            if raw is not None:
                row["py_bindings_host_us"], row["py_bindings_gpu_us"] = _loop(cp, raw, iters, repeats)
        except Exception as exc:  # the plan's internals are not an API: report, do not fail
            row["bindings_reason"] = f"{type(exc).__name__}: {exc}"
        row["graph_gpu_us"] = _graph_us(cp, plan, wa, b, y, min(iters, 100), repeats)
        row["matmul_call"] = getattr(getattr(plan, "_call", None), "kind", None)
    if row["matmul_call"] == "compiled":  # the same bound call through cffi's ABI mode, for comparison
        previous = os.environ.get("PYCUSPARSELT_FAST_CALL")
        os.environ["PYCUSPARSELT_FAST_CALL"] = "0"
        try:
            with psl.SparseMatmulPlan(a, b) as plan, plan.compress(a, prune="strip") as wa:
                row["py_bind_abi_host_us"], row["py_bind_abi_gpu_us"] = _loop(
                    cp, plan.bind(wa, b, out=y), iters, repeats)
        finally:
            if previous is None:
                del os.environ["PYCUSPARSELT_FAST_CALL"]
            else:
                os.environ["PYCUSPARSELT_FAST_CALL"] = previous
    return row


def combine_rounds(rounds: list[list[dict]]) -> list[dict]:
    """One row per problem: each numeric field the median over the rounds (the rounds list the same problems
    in the same order); other fields from the first round."""
    rows = []
    for same in zip(*rounds, strict=True):
        row = dict(same[0])
        for key, value in same[0].items():
            if key not in ("m", "n", "k") and isinstance(value, float):
                values = [r[key] for r in same if isinstance(r.get(key), float)]
                row[key] = statistics.median(values)
        rows.append(row)
    return rows


def measure_python(problems: list[tuple[int, int, int]], iters: int, repeats: int) -> list[dict]:
    import cupy as cp

    rows = []
    for m, n, k in problems:
        rows.append(_measure_one(m, n, k, iters, repeats))
        cp.get_default_memory_pool().free_all_blocks()
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--problems", default=DEFAULT_PROBLEMS, help="comma-separated MxNxK (FP16, A sparse)")
    parser.add_argument("--iters", type=int, default=200, help="calls per timed loop")
    parser.add_argument("--repeats", type=int, default=7, help="timed loops; medians are reported")
    parser.add_argument("--rounds", type=int, default=3,
                        help="alternations of the C program and the Python loops; medians over them are reported")
    parser.add_argument("--json", metavar="PATH", help="write the results as JSON")
    args = parser.parse_args(argv)
    try:
        problems = parse_problems(args.problems)
    except ValueError as exc:
        parser.error(str(exc))
    if args.iters < 1 or args.repeats < 1 or args.rounds < 1:
        parser.error(f"--iters, --repeats and --rounds must be positive, got {args.iters}, {args.repeats} and "
                     f"{args.rounds}")

    from pycusparselt.bench import environment
    from pycusparselt._native.devices import gpu_unavailable_reason

    reason = gpu_unavailable_reason()
    if reason:
        print(f"host_overhead: needs a GPU: {reason}", file=sys.stderr)
        return 1
    result: dict = {
        "description": (
            f"Host time per call in microseconds: wall clock around a loop of {args.iters} calls with no "
            f"synchronisation inside (medians of {args.repeats} loops; then the median over {args.rounds} rounds "
            "that alternate the C program and Python), FP16 D = A @ B with A 2:4 sparse, all row-major, default "
            "configuration, legacy default stream. C loop: benchmarks/host_overhead.cu built with nvcc against the "
            "same libcusparseLt. 'ABI call': the bound call through cffi's ABI mode (PYCUSPARSELT_FAST_CALL=0) "
            "instead of the compiled shim. GPU columns: CUDA events around the eager loop (equal to "
            "the host time where the GPU waits on the host) and per GEMM of a replayed CUDA graph."
        ),
        "environment": environment(),
        "iters": args.iters,
        "repeats": args.repeats,
    }
    # Rounds alternate the C program and the Python loops, and each figure is the median over the rounds, so
    # that a slow or fast spell of the host (clocks, other processes) lands on both sides alike.
    c_rounds: list[dict[tuple, dict]] = []
    py_rounds: list[list[dict]] = []
    with tempfile.TemporaryDirectory() as workdir:
        exe, how = build(workdir)
        if exe is None:
            result["c_reason"] = how
        else:
            result["c_build"] = how
        for _ in range(args.rounds):
            if exe is not None and "c_reason" not in result:
                try:
                    c_rows = run_c(exe, problems, args.iters, args.repeats)
                    c_rounds.append({(r["m"], r["n"], r["k"]): r for r in c_rows})
                except (RuntimeError, subprocess.SubprocessError, json.JSONDecodeError) as exc:
                    result["c_reason"] = str(exc)
            py_rounds.append(measure_python(problems, args.iters, args.repeats))
    result["rounds"] = args.rounds
    rows = combine_rounds(py_rounds)
    for row in rows:
        key = (row["m"], row["n"], row["k"])
        c_host = [c[key]["host_us"] for c in c_rounds if key in c]
        c_gpu = [c[key]["gpu_us"] for c in c_rounds if key in c]
        row["c_host_us"] = statistics.median(c_host) if c_host else None
        row["c_gpu_us"] = statistics.median(c_gpu) if c_gpu else None
    result["problems"] = rows

    print(f"{'problem':>18} {'C host':>8} {'matmul':>8} {'bind':>8} {'bindings':>8} {'mm-C':>7} {'bind-C':>7} "
          f"{'GPU eager':>9} {'GPU graph':>9}   (us per call)")

    def fmt(value, width=8, sign=False):
        return "n/a".rjust(width) if value is None else format(value, f"{'+' if sign else ''}{width}.1f")

    for r in rows:
        c_host, bind = r["c_host_us"], r["py_bind_host_us"]
        diff = r["py_matmul_host_us"] - c_host if c_host is not None else None
        diff_bind = bind - c_host if c_host is not None and bind is not None else None
        label = f"{r['m']}x{r['n']}x{r['k']}"
        print(f"{label:>18} {fmt(c_host)} {fmt(r['py_matmul_host_us'])} {fmt(bind)} "
              f"{fmt(r.get('py_bindings_host_us'))} {fmt(diff, 7, True)} {fmt(diff_bind, 7, True)} "
              f"{fmt(r['py_matmul_gpu_us'], 9)} {fmt(r['graph_gpu_us'], 9)}")
    if result.get("c_reason"):
        print(f"C loop not measured: {result['c_reason']}")
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump(result, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
