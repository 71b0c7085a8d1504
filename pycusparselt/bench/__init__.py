"""Benchmarks: pycusparselt's 2:4 sparse GEMMs against dense cuBLAS and PyTorch, on a fixed set of shapes.

``python -m pycusparselt bench [--quick] [--dtypes fp16,bf16,int8,e4m3] [--shapes ...] [--json PATH]
[--markdown PATH] [--plot PATH]``

Every case is a linear layer ``y (M, N) = x (M, K) @ W (N, K).T`` with W pruned 2:4 along K, in the form
:class:`~pycusparselt.nn.linear.SparseLinear` uses (``SparseMatmulPlan(x, W.T, sparse="b")``: TN, valid for every
type). All columns of a case multiply the same inputs (random, W pruned once by cuSPARSELt): dense baselines
(``cupy.matmul``, cuBLAS ``gemmEx`` through CuPy, PyTorch's ``mm`` / ``_int_mm`` / ``_scaled_mm``), PyTorch's
``_cslt_sparse_mm`` (default and searched), and ours with the default configuration, after
``cusparseLtMatmulSearch``, after our timed tuner, and replayed in a CUDA graph. Each column's result is
compared once with a float64 product of the same inputs, and a column that disagrees is reported and left out
of every comparison, so a broken path cannot post a fast time. Times are medians of CUDA-event timings
(:func:`pycusparselt.tuning.timing.time_gpu`); eager columns include the host's launch cost wherever it exceeds the
GPU's time, which is what the graph column removes.

Our three stages (default, search, timed tuner) are what the tuner's targets compare, so they are measured
without an order: each stage has its own plan (tuned, then given its own compressed weight) and output, and
their eager columns are timed in alternation, one sample of each per round with the first rotated
(:func:`pycusparselt.tuning.timing.time_gpu_interleaved`), as are their graph columns. Timed one after another,
the later stage read slower from clock and thermal drift alone.

The functions that turn results into tables and targets (:func:`markdown_report`, :func:`targets`) need
neither a GPU nor CuPy; ``scripts/bench_report.py`` writes ``docs/benchmarks.md`` with them.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from typing import Any, Callable, Iterable, NamedTuple

import numpy as np

__all__ = [
    "Shape",
    "SHAPES",
    "QUICK_SHAPES",
    "DTYPES",
    "DENSE_COLUMNS",
    "SPARSE_COLUMNS",
    "NOISE",
    "parse_shapes",
    "parse_dtypes",
    "gemm_flops",
    "throughput",
    "is_large",
    "environment",
    "run_benchmark",
    "summarize",
    "targets",
    "markdown_tables",
    "markdown_report",
    "plot",
    "add_arguments",
    "cmd_bench",
    "main",
]


class Shape(NamedTuple):
    """One GEMM ``y (m, n) = x (m, k) @ W (n, k).T``; ``group`` is "square", "bert", "llm" or "custom"."""

    name: str
    group: str
    m: int
    n: int
    k: int


def _linear(group: str, tag: str, m: int, k_in: int, n_out: int) -> Shape:
    return Shape(f"{group}-{tag}-{k_in}to{n_out}", group, m, n_out, k_in)


#: The benchmark's shapes: squares; BERT-large's linears at sequence length 384 for batch sizes 1, 8 and 32
#: (M = 384 * batch); LLM projections (4096 -> 11008, 11008 -> 4096, 4096 -> 4096) at M = 16 .. 8192.
SHAPES: tuple[Shape, ...] = (
    *(Shape(f"square-{s}", "square", s, s, s) for s in (4096, 8192, 10240)),
    *(
        _linear("bert", f"b{batch}", 384 * batch, k_in, n_out)
        for batch in (1, 8, 32)
        for k_in, n_out in ((1024, 4096), (4096, 1024), (1024, 1024))
    ),
    *(
        _linear("llm", f"m{m}", m, k_in, n_out)
        for m in (16, 128, 2048, 8192)
        for k_in, n_out in ((4096, 11008), (11008, 4096), (4096, 4096))
    ),
)
_BY_NAME = {shape.name: shape for shape in SHAPES}
#: ``--quick``: one shape of each group, for development (well under a minute).
QUICK_SHAPES: tuple[Shape, ...] = tuple(
    _BY_NAME[name] for name in ("square-4096", "bert-b1-1024to4096", "llm-m16-4096to11008")
)
GROUPS = ("square", "bert", "llm")

#: Input types and the output type each is benchmarked with (int8 -> int32 is exact; e4m3 -> bf16).
DTYPES: dict[str, str] = {"fp16": "fp16", "bf16": "bf16", "int8": "int32", "e4m3": "bf16"}
#: Relative Frobenius error a correct result stays under, by output type (the reference is float64).
TOLERANCE: dict[str, float] = {"fp16": 5e-3, "bf16": 2e-2, "int32": 0.0}

#: Dense baselines; "best dense" is the fastest of those that ran and agreed with the reference.
DENSE_COLUMNS: dict[str, str] = {
    "cupy_matmul": "cupy.matmul",
    "cublas_gemmex": "cuBLAS gemmEx",
    "torch_mm": "torch.mm",
    "torch_int_mm": "torch._int_mm",
    "torch_scaled_mm": "torch._scaled_mm",
    "torch_scaled_mm_fast": "torch._scaled_mm (fast accum)",
}
#: The dense baselines each input type has (cupy.matmul has no int8 Tensor Core path; FP8 needs cublasLt).
DENSE_FOR: dict[str, tuple[str, ...]] = {
    "fp16": ("cupy_matmul", "cublas_gemmex", "torch_mm"),
    "bf16": ("cupy_matmul", "cublas_gemmex", "torch_mm"),
    "int8": ("cublas_gemmex", "torch_int_mm"),
    "e4m3": ("torch_scaled_mm", "torch_scaled_mm_fast"),
}
#: Sparse columns: PyTorch's and ours (eager, and per-GEMM replay of a captured CUDA graph).
SPARSE_COLUMNS: dict[str, str] = {
    "cslt_default": "torch._cslt_sparse_mm",
    "cslt_search": "torch._cslt_sparse_mm, searched",
    "ours_default": "ours, default config",
    "ours_search": "ours, cusparseLtMatmulSearch",
    "ours_timed": "ours, timed tuner",
    "ours_default_graph": "ours, default config, CUDA graph",
    "ours_search_graph": "ours, search, CUDA graph",
    "ours_timed_graph": "ours, timed tuner, CUDA graph",
}
#: Our stages, each a plan of its own: the library's default config, cusparseLtMatmulSearch, our timed tuner.
_STAGES = ("default", "search", "timed")
#: A column whose checking call takes longer (seconds) is timed fewer times (about a second's worth, >= 3).
SLOW_CALL_S = 0.05
#: Timing noise allowed when comparing our tuner with the default config and with the library's search.
NOISE = 0.02
#: Speedup goals over the best dense GEMM (median over the large shapes).
GOALS = {"fp16": 1.55, "bf16": 1.55, "int8": 1.8}
#: Goal for the host time per call above the C library's own (microseconds).
HOST_OVERHEAD_GOAL_US = 3.0


# -- parsing and arithmetic ------------------------------------------------------------------------


def parse_shapes(text: str) -> list[Shape]:
    """Shapes from a comma-separated list of group names ("square", "bert", "llm"), "all", "quick", shape
    names (``square-4096``, ``llm-m16-4096to11008``, ...) or explicit ``MxNxK`` (y (M, N) = x (M, K) @ W.T).
    """
    shapes: list[Shape] = []
    for item in (part.strip() for part in text.split(",")):
        if not item:
            continue
        if item == "all":
            shapes += SHAPES
        elif item == "quick":
            shapes += QUICK_SHAPES
        elif item in GROUPS:
            shapes += [s for s in SHAPES if s.group == item]
        elif item in _BY_NAME:
            shapes.append(_BY_NAME[item])
        else:
            parts = item.lower().split("x")
            if len(parts) != 3 or not all(p.isdigit() and int(p) > 0 for p in parts):
                raise ValueError(
                    f"--shapes: expected 'all', 'quick', a group ({', '.join(GROUPS)}), a shape name such as "
                    f"'{SHAPES[0].name}', or MxNxK with positive integers; got {item!r}"
                )
            m, n, k = map(int, parts)
            shapes.append(Shape(f"{m}x{n}x{k}", "custom", m, n, k))
    if not shapes:
        raise ValueError(f"--shapes: no shape given in {text!r}")
    return list(dict.fromkeys(shapes))  # first occurrence wins, order kept


def parse_dtypes(text: str) -> list[str]:
    """Input types from a comma-separated list of ``fp16``, ``bf16``, ``int8``, ``e4m3``."""
    names = [part.strip().lower() for part in text.split(",") if part.strip()]
    unknown = [name for name in names if name not in DTYPES]
    if unknown or not names:
        raise ValueError(f"--dtypes: expected a comma-separated subset of {', '.join(DTYPES)}; got {text!r}")
    return list(dict.fromkeys(names))


def gemm_flops(m: int, n: int, k: int) -> int:
    """Operations of a dense M x N x K product (a multiply and an add each), the figure TFLOP/s are quoted
    against, sparse or not: a 2:4 product doing half the multiplies counts the same work."""
    return 2 * m * n * k


def throughput(m: int, n: int, k: int, ms: float) -> float:
    """TFLOP/s (TOPS for integers) of an M x N x K product taking ``ms`` milliseconds."""
    if not ms > 0:
        raise ValueError(f"ms: expected a positive time, got {ms}")
    return gemm_flops(m, n, k) / (ms * 1e-3) / 1e12


def is_large(m: int, n: int, k: int) -> bool:
    """The "large" shapes the speedup targets are judged on: every dimension >= 1024 and >= 1e11 operations."""
    return min(m, n, k) >= 1024 and gemm_flops(m, n, k) >= 1e11


# -- environment -----------------------------------------------------------------------------------


def _dist_version(*dists: str) -> str | None:
    from importlib import metadata

    for dist in dists:
        try:
            return metadata.version(dist)
        except metadata.PackageNotFoundError:
            continue
    return None


def _driver_version() -> str | None:
    try:
        done = subprocess.run(
            ["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
            capture_output=True, text=True, timeout=20, check=True,
        )
        return done.stdout.strip().splitlines()[0] or None
    except (OSError, subprocess.SubprocessError, IndexError):
        return None


def _cuda_version(value: int) -> str:
    return f"{value // 1000}.{value % 1000 // 10}"


def environment(torch_module: Any = None) -> dict[str, Any]:
    """What a result depends on: GPU, SM, driver, CUDA runtime, cuSPARSELt, CuPy, PyTorch, date, host."""
    from .. import __version__

    env: dict[str, Any] = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "pycusparselt": __version__,
        "python": platform.python_version(),
        "numpy": np.__version__,
        "cupy": _dist_version("cupy-cuda13x", "cupy-cuda12x", "cupy"),
        "driver": _driver_version(),
    }
    try:
        from .._native.library import load

        loaded = load()
        env["cusparselt"] = ".".join(map(str, loaded.version))
        env["cusparselt_path"] = loaded.path
        from ..bindings import matmul_call_path

        env["matmul_call"] = matmul_call_path()
    except Exception as exc:  # LibraryNotFoundError, or anything a broken install raises
        env["cusparselt"] = f"not available: {exc}"
    try:
        import cupy

        props = cupy.cuda.runtime.getDeviceProperties(0)
        name = props["name"]
        env["device"] = name.decode() if isinstance(name, bytes) else str(name)
        env["sm"] = f"{props['major']}.{props['minor']}"
        env["multiprocessors"] = int(props["multiProcessorCount"])
        env["cuda_runtime"] = _cuda_version(cupy.cuda.runtime.runtimeGetVersion())
        env["cuda_driver_api"] = _cuda_version(cupy.cuda.runtime.driverGetVersion())
    except Exception as exc:  # no CuPy, no driver, no GPU
        env["device"] = f"none: {type(exc).__name__}: {exc}"
    if torch_module is not None:
        env["torch"] = torch_module.__version__
        env["torch_cuda"] = getattr(torch_module.version, "cuda", None)
        try:
            version = torch_module.backends.cusparselt.version()
            # CUSPARSELT_VERSION: major * 1000 + minor * 100 + patch
            env["torch_cusparselt"] = (
                None if version is None else f"{version // 1000}.{version // 100 % 10}.{version % 100}"
            )
        except Exception as exc:
            env["torch_cusparselt"] = f"not available: {exc}"
    else:
        env["torch"] = None
    return env


# -- running a case ------------------------------------------------------------------------------


class _NotAvailable(Exception):
    """A column that cannot run here; its message says why."""


class _Fatal(BaseException):
    """The CUDA context is lost (a sticky error such as an illegal instruction): nothing more can run in this
    process. ``key`` names the column (or ``"setup"``) that was running. A BaseException, so that the handlers
    that turn a column's failure into "n/a" let it through."""

    def __init__(self, key: str, reason: str) -> None:
        super().__init__(f"{key}: {reason}")
        self.key, self.reason = key, reason


def _context_error(cp: Any) -> str | None:
    """Why the CUDA context is unusable (a sticky error reported by a synchronisation), or None."""
    try:
        cp.cuda.runtime.deviceSynchronize()
    except Exception as exc:
        return _reason(exc)
    return None


def _reason(exc: BaseException) -> str:
    text = f"{type(exc).__name__}: {exc}" if not isinstance(exc, _NotAvailable) else str(exc)
    text = " ".join(text.split())
    return text if len(text) <= 240 else text[:237] + "..."


class _Inputs:
    """One case's device data: x (M, K) and the pruned W (N, K), C-contiguous, in their storage types (uint16
    for bf16, uint8 for e4m3), with the typed views the plan and PyTorch take, and the float64 reference."""

    def __init__(self, cp: Any, shape: Shape, dtype: str, seed: int) -> None:
        import ml_dtypes

        self.cp, self.shape, self.dtype, self.out = cp, shape, dtype, DTYPES[dtype]
        cp.random.seed(seed)
        m, n, k = shape.m, shape.n, shape.k
        self.x_store, self.w_store = self._random((m, k)), self._random((n, k))
        self.plan_kwargs: dict[str, Any] = {"sparse": "b"}
        if dtype == "bf16":
            self.np_dtype = np.dtype(ml_dtypes.bfloat16)
        elif dtype == "e4m3":
            self.np_dtype = np.dtype(ml_dtypes.float8_e4m3fn)
            self.plan_kwargs.update(input_dtype=self.np_dtype, out_dtype=ml_dtypes.bfloat16)
        elif dtype == "int8":
            self.np_dtype = np.dtype(np.int8)
            self.plan_kwargs.update(out_dtype=np.int32)
        else:
            self.np_dtype = np.dtype(np.float16)
        self.out_np = {"fp16": np.dtype(np.float16), "bf16": np.dtype(ml_dtypes.bfloat16),
                       "int32": np.dtype(np.int32)}[self.out]
        self.reference = None

    def _random(self, shape: tuple[int, int]) -> Any:
        cp = self.cp
        if self.dtype == "fp16":
            return cp.random.standard_normal(shape, dtype=cp.float32).astype(cp.float16)
        if self.dtype == "bf16":  # the top half of a float32 is a bfloat16 (truncation: exact values)
            bits = cp.random.standard_normal(shape, dtype=cp.float32).view(cp.uint32) >> 16
            return bits.astype(cp.uint16)
        if self.dtype == "int8":  # the whole range, so products and sums are non-trivial
            return cp.random.randint(-128, 128, shape, dtype=cp.int32).astype(cp.int8)
        # e4m3 bit patterns: random sign and mantissa, exponent field 4..10 (magnitudes 1/8 .. 15): no NaN
        sign = cp.random.randint(0, 2, shape, dtype=cp.int32) << 7
        exponent = cp.random.randint(4, 11, shape, dtype=cp.int32) << 3
        mantissa = cp.random.randint(0, 8, shape, dtype=cp.int32)
        return (sign | exponent | mantissa).astype(cp.uint8)

    def typed(self, store: Any) -> Any:
        """The view a plan takes (e4m3 stays uint8: the plan reads it with ``input_dtype``)."""
        return store.view(self.np_dtype) if self.dtype == "bf16" else store

    def to_f64(self, arr: Any) -> Any:
        """A float64 CuPy copy of an input or output (CuPy array of any storage type, or a PyTorch tensor)."""
        import ml_dtypes

        cp = self.cp
        if type(arr).__module__.startswith("torch"):
            return cp.from_dlpack(arr.double().contiguous())  # double: int32 results stay exact
        if arr.dtype in (np.dtype(ml_dtypes.bfloat16), np.dtype(np.uint16)):  # bf16 data or its bit patterns
            bits = arr.view(cp.uint16).astype(cp.uint32) << 16
            return bits.view(cp.float32).astype(cp.float64)
        if arr.dtype == np.dtype(np.uint8):  # e4m3 bit patterns
            table = np.arange(256, dtype=np.uint8).view(ml_dtypes.float8_e4m3fn).astype(np.float64)
            return cp.asarray(table)[arr]
        return arr.astype(cp.float64)

    def build_reference(self) -> None:
        # float64 products of the rounded, pruned inputs: exact for int8, far below output rounding otherwise
        x64, w64 = self.to_f64(self.x_store), self.to_f64(self.w_store)
        self.reference = x64 @ w64.T
        self._ref_norm = float(self.cp.linalg.norm(self.reference))

    def rel_err(self, result: Any) -> float:
        y = self.to_f64(result)
        if tuple(y.shape) != tuple(self.reference.shape):
            raise ValueError(f"result has shape {tuple(y.shape)}, expected {tuple(self.reference.shape)}")
        diff = float(self.cp.linalg.norm(y - self.reference))
        return diff / self._ref_norm if self._ref_norm else diff


def _poison(cp: Any, arr: Any) -> None:
    """Fill an output with all-ones bytes (NaN for floats, -1 for integers), so a result that was not written
    cannot pass the check."""
    arr.view(cp.uint8).fill(0xFF)


class _Runner:
    """Runs the columns of the cases; holds what lives across cases (PyTorch, options)."""

    def __init__(self, *, repeats: int, warmup: int, tune_budget: float | None, use_torch: bool,
                 graph_calls: int = 20) -> None:
        import cupy

        self.cp = cupy
        self.repeats, self.warmup, self.tune_budget = repeats, warmup, tune_budget
        self.graph_calls = graph_calls
        #: (dtype, column) -> reason: columns not to run (they broke the CUDA context of an earlier worker)
        self.skip: dict[tuple[str, str], str] = {}
        #: called with {"column": key} before each column runs (the isolated driver's crash locator)
        self.events: Callable[[dict], None] = lambda event: None
        self.torch = None
        self.torch_reason = "disabled (--no-torch)"
        if use_torch:
            try:
                import torch

                if not torch.cuda.is_available():
                    raise _NotAvailable("PyTorch sees no CUDA device")
                self.torch = torch
            except ImportError:
                self.torch_reason = "PyTorch is not installed"
            except _NotAvailable as exc:
                self.torch_reason = str(exc)
        cc = cupy.cuda.Device().compute_capability
        self.sm = (int(cc[:-1]), int(cc[-1]))

    # -- timing and checking --------------------------------------------------------------------------

    def _effort(self, first_s: float) -> tuple[int, int]:
        """Timed samples and warm-up calls for a column whose checking call took ``first_s`` seconds."""
        repeats, warmup = self.repeats, self.warmup
        if first_s > SLOW_CALL_S:  # a slow column gets about a second of timing, never fewer than 3 samples
            repeats, warmup = max(3, min(repeats, int(1.0 / first_s))), min(warmup, 1)
        return repeats, warmup

    def _entry(self, timing: Any, per_call: int, repeats: int) -> dict[str, float]:
        entry = {"median_ms": timing.median_ms / per_call, "min_ms": timing.min_ms / per_call}
        if repeats != self.repeats:
            entry["repeats"] = repeats
        return entry

    def _time(self, fn: Callable[[int], Any], stream: Any = None, per_call: int = 1,
              first_s: float = 0.0) -> dict[str, float]:
        from ..tuning.timing import time_gpu

        repeats, warmup = self._effort(first_s)
        return self._entry(time_gpu(fn, repeats=repeats, warmup=warmup, stream=stream), per_call, repeats)

    def _time_interleaved(self, live: dict[str, tuple]) -> dict[str, dict[str, float]]:
        """Time checked columns (``key -> (fn, per_call, stream, first_s)``) in alternation; one round count
        for all, from the slowest checking call, so every column gets as many samples from the same period."""
        from ..tuning.timing import time_gpu_interleaved

        repeats, warmup = self._effort(max(column[3] for column in live.values()))
        timings = time_gpu_interleaved({key: column[0] for key, column in live.items()}, repeats=repeats,
                                       warmup=warmup, streams={key: column[2] for key, column in live.items()})
        return {key: self._entry(timings[key], column[1], repeats) for key, column in live.items()}

    @staticmethod
    def _unpack(built: tuple) -> tuple:
        """``(fn, result_getter[, per_call, stream])`` -> ``(fn, result_getter, per_call, stream)``."""
        return built[0], built[1], built[2] if len(built) > 2 else 1, built[3] if len(built) > 3 else None

    def _check(self, data: _Inputs, fn: Callable[[int], Any], result: Callable[[], Any]) -> tuple[dict, float]:
        """Run a column once and compare its result with the reference: ``(entry, seconds the call took)``."""
        cp = self.cp
        started = time.perf_counter()
        fn(0)
        cp.cuda.Device().synchronize()
        first_s = time.perf_counter() - started
        err = data.rel_err(result())
        ok = bool(err <= TOLERANCE[data.out])
        return {"rel_err": err if math.isfinite(err) else None, "ok": ok}, first_s

    def _column(self, record: dict, key: str, data: _Inputs, build: Callable[[], tuple]) -> None:
        """Build a column (``build`` returns ``(fn, result_getter[, per_call, stream])``), check its result
        once against the reference, then time it; anything that fails makes the column n/a with the reason."""
        cp = self.cp
        skipped = self.skip.get((data.dtype, key))
        if skipped:
            record["columns"][key] = {"na": skipped}
            return
        self.events({"column": key})
        try:
            fn, result, per_call, stream = self._unpack(build())
            entry, first_s = self._check(data, fn, result)
            entry.update(self._time(fn, stream, per_call, first_s))
            cp.cuda.Device().synchronize()
            record["columns"][key] = entry
        except Exception as exc:  # a column that cannot run is reported, never fatal ...
            record["columns"][key] = {"na": _reason(exc)}
            self._check_alive(key, exc)  # ... unless it took the CUDA context with it

    def _interleaved(self, record: dict, data: _Inputs, builds: dict[str, Callable[[], tuple]],
                     event: str) -> str | None:
        """Columns compared with each other: build and check each (as :meth:`_column`), then time those that
        ran in alternation (:func:`~pycusparselt.tuning.timing.time_gpu_interleaved`). Returns how they were timed.

        ``event`` names the interleaved timing for the crash locator. Where it broke the CUDA context before
        (it is in :attr:`skip`), the columns are timed one after another instead, each under its own name, so
        that a further crash is pinned on one column.
        """
        cp = self.cp
        live: dict[str, tuple] = {}
        for key, build in builds.items():
            skipped = self.skip.get((data.dtype, key))
            if skipped:
                record["columns"][key] = {"na": skipped}
                continue
            self.events({"column": key})
            try:
                fn, result, per_call, stream = self._unpack(build())
                record["columns"][key], first_s = self._check(data, fn, result)
                live[key] = (fn, per_call, stream, first_s)
            except Exception as exc:
                record["columns"][key] = {"na": _reason(exc)}
                self._check_alive(key, exc)
        if not live:
            return None
        skipped = self.skip.get((data.dtype, event))
        if skipped:
            for key, (fn, per_call, stream, first_s) in live.items():
                self.events({"column": key})
                try:
                    record["columns"][key].update(self._time(fn, stream, per_call, first_s))
                    cp.cuda.Device().synchronize()
                except Exception as exc:
                    record["columns"][key] = {"na": _reason(exc)}
                    self._check_alive(key, exc)
            return f"one after another; interleaved: {skipped}"
        self.events({"column": event})
        try:
            entries = self._time_interleaved(live)
            cp.cuda.Device().synchronize()
        except Exception as exc:
            for key in live:
                record["columns"][key] = {"na": _reason(exc)}
            self._check_alive(event, exc)
            return None
        for key, entry in entries.items():
            record["columns"][key].update(entry)
        return "interleaved"

    def _check_alive(self, key: str, exc: BaseException) -> None:
        broken = _context_error(self.cp)
        if broken:
            raise _Fatal(key, f"{_reason(exc)} (CUDA context lost: {broken})")

    # -- dense baselines ----------------------------------------------------------------------------

    def _dense_columns(self, record: dict, data: _Inputs) -> None:
        cp = self.cp
        x, w = data.x_store, data.w_store
        out = cp.empty((data.shape.m, data.shape.n), dtype=data.out_np)

        def cupy_matmul() -> tuple:
            if data.dtype not in ("fp16", "bf16"):
                raise _NotAvailable(f"cupy.matmul has no Tensor Core path for {data.dtype}")
            xt, wt = data.typed(x), data.typed(w)

            def run(_i: int) -> Any:
                return cp.matmul(xt, wt.T, out=out)

            _poison(cp, out)
            return run, lambda: out

        def cublas_gemmex() -> tuple:
            return self._gemmex(data, x, w, out)

        builders = {"cupy_matmul": cupy_matmul, "cublas_gemmex": cublas_gemmex, **self._torch_dense(data)}
        for key in DENSE_FOR[data.dtype]:
            self._column(record, key, data, builders[key])

    def _gemmex(self, data: _Inputs, x: Any, w: Any, out: Any) -> tuple:
        """cuBLAS ``gemmEx`` in its column-major view: y^T (N, M) = W (K, N)^T @ x^T (K, M), i.e. TN with
        lda = ldb = K and ldc = N (int8 Tensor Core GEMMs want exactly this form)."""
        cp = self.cp
        from cupy.cuda import cublas

        m, n, k = data.shape.m, data.shape.n, data.shape.k
        # cudaDataType and cublasComputeType_t values (library_types.h, cublas_api.h)
        r16f, r16bf, r8i, r32i = 2, 14, 3, 10
        compute_32f, compute_32i = 68, 72
        types = {"fp16": (r16f, r16f, compute_32f, np.float32), "bf16": (r16bf, r16bf, compute_32f, np.float32),
                 "int8": (r8i, r32i, compute_32i, np.int32)}
        if data.dtype not in types:
            raise _NotAvailable(f"cuBLAS gemmEx has no {data.dtype} inputs (FP8 needs cublasLt)")
        in_type, out_type, compute, scalar = types[data.dtype]
        if data.dtype == "int8" and (m % 4 or n % 4 or k % 4):
            raise _NotAvailable("cuBLAS int8 GEMMs need M, N and K multiples of 4")
        if not hasattr(cublas, "gemmEx"):
            raise _NotAvailable("this CuPy has no cupy.cuda.cublas.gemmEx")
        alpha, beta = np.ones(1, dtype=scalar), np.zeros(1, dtype=scalar)
        handle = cp.cuda.device.get_cublas_handle()
        op_n, op_t = 0, 1
        gemm_default = -1

        def run(_i: int) -> None:
            cublas.setStream(handle, cp.cuda.get_current_stream().ptr)
            cublas.setPointerMode(handle, 0)  # host scalars (CuPy's own state between its calls)
            cublas.gemmEx(
                handle, op_t, op_n, n, m, k, alpha.ctypes.data, w.data.ptr, in_type, k, x.data.ptr, in_type, k,
                beta.ctypes.data, out.data.ptr, out_type, n, compute, gemm_default,
            )

        _poison(cp, out)
        return run, lambda: out

    def _tensor(self, store: Any) -> Any:
        """A zero-copy PyTorch view of a CuPy array (bf16 and e4m3 through their bit patterns)."""
        torch = self.torch
        if store.dtype == self.cp.uint16:
            return torch.from_dlpack(store.view(self.cp.int16)).view(torch.bfloat16)
        return torch.from_dlpack(store)

    def _torch_inputs(self, data: _Inputs) -> tuple:
        torch = self.torch
        if torch is None:
            raise _NotAvailable(self.torch_reason)
        xt, wt = self._tensor(data.x_store), self._tensor(data.w_store)
        if data.dtype == "e4m3":
            xt, wt = xt.view(torch.float8_e4m3fn), wt.view(torch.float8_e4m3fn)
        return torch, xt, wt

    def _torch_dense(self, data: _Inputs) -> dict[str, Callable[[], tuple]]:
        def torch_mm() -> tuple:
            torch, xt, wt = self._torch_inputs(data)
            if data.dtype not in ("fp16", "bf16"):
                raise _NotAvailable(f"torch.mm has no {data.dtype} path (see _int_mm / _scaled_mm)")
            holder: list = [None]

            def run(_i: int) -> None:
                holder[0] = torch.mm(xt, wt.t())

            return run, lambda: holder[0]

        def torch_int_mm() -> tuple:
            torch, xt, wt = self._torch_inputs(data)
            if data.dtype != "int8":
                raise _NotAvailable("int8 only")
            holder: list = [None]

            def run(_i: int) -> None:
                holder[0] = torch._int_mm(xt, wt.t())

            return run, lambda: holder[0]

        def scaled_mm(fast: bool) -> Callable[[], tuple]:
            def build() -> tuple:
                torch, xt, wt = self._torch_inputs(data)
                if data.dtype != "e4m3":
                    raise _NotAvailable("e4m3 only")
                one = torch.ones((), device=xt.device, dtype=torch.float32)
                holder: list = [None]

                def run(_i: int) -> None:
                    result = torch._scaled_mm(xt, wt.t(), scale_a=one, scale_b=one, out_dtype=torch.bfloat16,
                                              use_fast_accum=fast)
                    holder[0] = result[0] if isinstance(result, tuple) else result  # older releases: (out, amax)

                return run, lambda: holder[0]

            return build

        return {"torch_mm": torch_mm, "torch_int_mm": torch_int_mm, "torch_scaled_mm": scaled_mm(False),
                "torch_scaled_mm_fast": scaled_mm(True)}

    # -- PyTorch's cuSPARSELt -------------------------------------------------------------------------

    def _cslt_columns(self, record: dict, data: _Inputs) -> None:
        state: dict[str, Any] = {}

        def compressed() -> tuple:
            if "wc" not in state:
                torch, xt, wt = self._torch_inputs(data)
                if not hasattr(torch, "_cslt_sparse_mm"):
                    raise _NotAvailable("this PyTorch has no torch._cslt_sparse_mm")
                out_dtype = {"int8": torch.int32, "e4m3": torch.bfloat16}.get(data.dtype)
                state.update(torch=torch, xt=xt, wc=torch._cslt_compress(wt), out_dtype=out_dtype)
            return state["torch"], state["xt"], state["wc"], state["out_dtype"]

        def call(config: dict[str, int]) -> Callable[[int], Any]:
            torch, xt, wc, out_dtype = compressed()
            holder: list = [None]
            kwargs = dict(out_dtype=out_dtype, transpose_result=True, **config)

            def run(_i: int) -> None:
                # transpose_result: (M, N) row-major, like ours
                holder[0] = torch._cslt_sparse_mm(wc, xt.t(), **kwargs)

            try:
                run(0)
            except TypeError:  # releases whose split-K argument is split_k_one_kernel
                if "split_k_mode" in config:
                    mode = kwargs.pop("split_k_mode")
                    kwargs["split_k_one_kernel"] = mode in (1, -1)
                    run(0)
                else:
                    raise
            state["holder"] = holder
            return run

        def result() -> Any:
            y = state["holder"][0]
            m, n = data.shape.m, data.shape.n
            return y.t() if tuple(y.shape) == (n, m) and m != n else y

        def default() -> tuple:
            return call({}), result

        def searched() -> tuple:
            torch, xt, wc, out_dtype = compressed()
            started = time.perf_counter()
            module = getattr(torch._C, "_cusparselt", None)
            if module is not None and hasattr(module, "mm_search"):
                alg_id, split_k, split_k_mode, _ = module.mm_search(wc, xt.t(), None, None, out_dtype, True)
                config = {"alg_id": int(alg_id), "split_k": int(split_k), "split_k_mode": int(split_k_mode)}
            elif hasattr(torch, "_cslt_sparse_mm_search"):
                config = {"alg_id": int(torch._cslt_sparse_mm_search(wc, xt.t(), out_dtype=out_dtype,
                                                                     transpose_result=True))}
            else:
                raise _NotAvailable("this PyTorch has no cuSPARSELt search")
            record["tune_s"]["cslt_search"] = time.perf_counter() - started
            record["configs"]["cslt_search"] = config
            return call(config), result

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # deprecation and plan-cache chatter
            self._column(record, "cslt_default", data, default)
            self._column(record, "cslt_search", data, searched)
        state.clear()

    # -- ours -----------------------------------------------------------------------------------------

    def _graph(self, plan: Any, x: Any, wc: Any, y: Any, calls: int) -> tuple:
        """A CUDA graph of ``calls`` products on a stream of its own, through ``plan.bind`` where it exists."""
        cp = self.cp
        stream = cp.cuda.Stream(non_blocking=True)
        if hasattr(plan, "bind"):
            call = plan.bind(x, wc, out=y, stream=stream)
        else:  # fallback: the validated path (allocates nothing for an unpadded plan without bias)
            def call() -> Any:
                return plan.matmul(x, wc, out=y, stream=stream)
        call()  # outside the capture: lazy initialisation
        stream.synchronize()
        with stream:
            stream.begin_capture()
            try:
                for _ in range(calls):
                    call()
            finally:
                graph = stream.end_capture()

        def run(_i: int) -> None:
            graph.launch(stream)

        _poison(cp, y)
        cp.cuda.Device().synchronize()  # the graph's stream does not wait for the legacy stream's fill
        return run, lambda: y, calls, stream

    def _ours(self, record: dict, data: _Inputs, plan: Any, x: Any, wt: Any) -> None:
        """Our columns. Each stage (the default config, ``cusparseLtMatmulSearch``, the timed tuner) has a plan
        of its own, tuned first and then given its compressed weight (a configuration can change cuSPARSELt's
        compressed form), and an output of its own. The three eager columns are then timed in alternation, and
        the three graph columns likewise: timed one after another, the later ones read slower from clock and
        thermal drift alone. ``plan`` is the fresh plan of the case (the default stage's, closed by the
        caller); ``wt`` the pruned, dense W.T the plans are tuned on and compress.
        """
        from ..gemm.plan import SparseMatmulPlan

        cp = self.cp
        m, n = data.shape.m, data.shape.n
        owned: list[Any] = []  # plans and compressed weights made here, closed in reverse order
        stages: dict[str, tuple[Any, Any, Any]] = {}  # stage -> (plan, compressed weight, output)
        try:
            record["configs"]["max_alg_id"] = plan.max_alg_id
            record["bind"] = hasattr(plan, "bind")
            for stage in _STAGES:
                key = f"ours_{stage}"
                try:
                    skipped = self.skip.get((data.dtype, key))
                    if skipped:  # it broke the CUDA context before: the whole stage is left out
                        raise _NotAvailable(skipped)
                    self.events({"column": key})
                    if stage == "default":
                        staged = plan
                    else:
                        staged = SparseMatmulPlan(x, wt, **data.plan_kwargs)
                        owned.append(staged)
                    y = cp.empty((m, n), dtype=data.out_np)
                    if stage != "default":
                        started = time.perf_counter()
                        self._tune(staged, stage, x, wt, y)
                        record["tune_s"][stage] = time.perf_counter() - started
                    if stage == "timed":
                        self._tuner_record(record, staged)
                    wc = staged.compress(wt)  # already 2:4 (pruned by the library); checked on the GPU
                    owned.append(wc)
                    record["configs"][stage] = list(staged.config)
                    stages[stage] = (staged, wc, y)
                except Exception as exc:
                    reason = _reason(exc)
                    record["columns"][key] = {"na": reason}
                    record["columns"][f"{key}_graph"] = {"na": reason}
                    self._check_alive(key, exc)

            def eager(staged: Any, wc: Any, y: Any) -> tuple:
                def run(_i: int) -> None:
                    staged.matmul(x, wc, out=y)

                _poison(cp, y)
                return run, lambda: y

            how: dict[str, str | None] = {}
            how["eager"] = self._interleaved(
                record, data, {f"ours_{s}": lambda s=s: eager(*stages[s]) for s in stages}, "ours_eager_interleaved")
            # one graph length for all three, so that they compare like with like: enough GEMMs that a replay of
            # the fastest stage lasts ~0.2 ms or more
            eager_ms = [record["columns"].get(f"ours_{s}", {}).get("median_ms") for s in stages]
            fastest = min((ms for ms in eager_ms if ms), default=1.0)
            calls = max(1, min(self.graph_calls, math.ceil(0.2 / max(fastest, 1e-3))))
            graphs = {f"ours_{s}_graph": lambda s=s: self._graph(stages[s][0], x, stages[s][1], stages[s][2], calls)
                      for s in stages}
            how["graph"] = self._interleaved(record, data, graphs, "ours_graph_interleaved")
            record["ours_timing"] = {kind: value for kind, value in how.items() if value is not None}
        finally:
            for obj in reversed(owned):
                try:
                    obj.close()
                except Exception:  # after a lost context: what is propagating says more
                    pass

    @staticmethod
    def _tuner_record(record: dict, plan: Any) -> None:
        report = getattr(plan, "tuning_report", None)
        if report is not None and getattr(report, "candidates", None) is not None:
            timed = [c for c in report.candidates if c.median_ms is not None]
            record["tuner"] = {"source": report.source, "candidates_timed": len(timed),
                               "candidates_refused": len(report.candidates) - len(timed),
                               "best_ms": min((c.median_ms for c in timed), default=None)}

    def _tune(self, plan: Any, stage: str, x: Any, w: Any, y: Any) -> None:
        """Tune ``plan`` for ``stage`` ("search" or "timed") on the dense, pruned sparse-side operand ``w``."""
        import inspect

        parameters = inspect.signature(plan.autotune).parameters
        if stage == "search":
            if "method" in parameters:
                plan.autotune(x, w, out=y, method="search")
            else:  # releases whose autotune is the library's search
                plan.autotune(x, w, out=y)
            return
        if "method" not in parameters:
            raise _NotAvailable("SparseMatmulPlan.autotune has no method='timed' in this version")
        kwargs: dict[str, Any] = {"method": "timed"}
        if "cache" in parameters:
            kwargs["cache"] = False  # really tune, every run
        if self.tune_budget is not None and "budget_s" in parameters:
            kwargs["budget_s"] = self.tune_budget
        plan.autotune(x, w, out=y, **kwargs)

    # -- one case ---------------------------------------------------------------------------------------

    def _case(self, record: dict, shape: Shape, dtype: str, seed: int) -> None:
        from ..gemm.plan import SparseMatmulPlan

        self.events({"column": "setup"})
        data = _Inputs(self.cp, shape, dtype, seed)
        # the layer's form: x (M, K) and the sparse W.T (K, N); W pruned once, by the plan's library
        x, wt = data.typed(data.x_store), data.typed(data.w_store).T
        plan = SparseMatmulPlan(x, wt, **data.plan_kwargs)  # fresh: the library's default config
        try:
            pruned = plan.prune(wt).T
            data.w_store = self.cp.ascontiguousarray(pruned.view(data.w_store.dtype) if dtype == "bf16" else pruned)
            del pruned
            data.build_reference()
            self._dense_columns(record, data)
            self._cslt_columns(record, data)
            self._ours(record, data, plan, x, data.typed(data.w_store).T)
        finally:
            try:
                plan.close()
            except Exception:  # after a lost context: what is propagating says more
                pass

    def run_case(self, shape: Shape, dtype: str, seed: int) -> dict[str, Any]:
        cp = self.cp
        record: dict[str, Any] = {
            "shape": shape.name, "group": shape.group, "m": shape.m, "n": shape.n, "k": shape.k,
            "dtype": dtype, "out_dtype": DTYPES[dtype], "flops": gemm_flops(shape.m, shape.n, shape.k),
            "large": is_large(shape.m, shape.n, shape.k), "tolerance": TOLERANCE[DTYPES[dtype]],
            "columns": {}, "configs": {}, "tune_s": {},
        }
        started = time.perf_counter()
        try:
            if dtype == "e4m3" and self.sm < (8, 9):
                raise _NotAvailable(f"FP8 needs SM 8.9 or newer; this GPU is SM {self.sm[0]}.{self.sm[1]}")
            self._case(record, shape, dtype, seed)
        except Exception as exc:  # the whole case could not run (memory, an unsupported GPU): say why
            record["error"] = _reason(exc)
            self._check_alive("setup", exc)
        finally:
            try:
                cp.get_default_memory_pool().free_all_blocks()
                if self.torch is not None:
                    self.torch.cuda.empty_cache()
            except Exception:  # a lost context is reported by _check_alive; cleanup cannot help it
                pass
        record["seconds"] = time.perf_counter() - started
        record["derived"] = summarize(record)
        return record


def _progress(total: int, enabled: bool) -> Any:
    """A tqdm bar when tqdm is installed and wanted, else plain progress lines on stderr."""

    class Lines:
        def __init__(self) -> None:
            self.done = 0

        def update(self, label: str, seconds: float) -> None:
            self.done += 1
            if enabled:
                print(f"[{self.done}/{total}] {label} ({seconds:.1f} s)", file=sys.stderr, flush=True)

        def close(self) -> None:
            pass

    if enabled:
        try:
            from tqdm import tqdm
        except ImportError:
            return Lines()
        bar = tqdm(total=total, unit="case", file=sys.stderr)

        class Bar:
            def update(self, label: str, seconds: float) -> None:
                bar.set_postfix_str(label)
                bar.update(1)

            def close(self) -> None:
                bar.close()

        return Bar()
    return Lines()


def _failed(shape: Shape, dtype: str, error: str) -> dict[str, Any]:
    """The record of a case that could not run at all."""
    record = {"shape": shape.name, "group": shape.group, "m": shape.m, "n": shape.n, "k": shape.k, "dtype": dtype,
              "out_dtype": DTYPES[dtype], "flops": gemm_flops(shape.m, shape.n, shape.k),
              "large": is_large(shape.m, shape.n, shape.k), "columns": {}, "configs": {}, "tune_s": {},
              "error": error}
    record["derived"] = summarize(record)
    return record


_TIME_LIMIT = "not run: the time limit was reached"
#: Worker processes started at most, per run, after crashes (each costs a process start).
MAX_RESTARTS = 8


def _skip_keys(key: str) -> tuple[str, ...]:
    """The columns to leave out after ``key`` broke the CUDA context: a graph capture stands for all three."""
    if key.endswith("_graph"):
        return tuple(f"ours_{s}_graph" for s in ("default", "search", "timed"))
    return (key,)


def _worker_command(spec_path: str) -> list[str]:
    flags = ["-P"] if getattr(sys.flags, "safe_path", False) else []  # keep a checkout off sys.path, as asked
    return [sys.executable, *flags, "-m", "pycusparselt.bench", "--worker", spec_path]


def _run_isolated(cases: list[tuple[str, Shape]], settings: dict[str, Any], on_record: Callable[[int, dict], None],
                  command: Callable[[str], list[str]] = _worker_command) -> dict[str, Any] | None:
    """Run the cases in worker processes; return the environment a worker reported.

    A sticky CUDA error (cuSPARSELt reading a compressed operand of another form ends in an illegal
    instruction, say) leaves a process unable to use the GPU. The worker then reports which column was running
    and exits; a new worker runs the rest, with that column left out for the remaining cases of that type
    (the report says why), and reruns the case that was cut short.
    """
    pending = list(range(len(cases)))
    skip: dict[tuple[str, str], str] = {}
    done: set[int] = set()
    env = None
    restarts = 0
    with tempfile.TemporaryDirectory(prefix="pycusparselt-bench-") as tmp:
        while pending:
            spec_path, events_path = os.path.join(tmp, "spec.json"), os.path.join(tmp, f"events{restarts}.jsonl")
            spec = dict(settings, events=events_path, skip=[[d, k, r] for (d, k), r in skip.items()],
                        cases=[[i, cases[i][0], list(cases[i][1]), settings["seed"] + i] for i in pending])
            with open(spec_path, "w", encoding="utf-8") as f:
                json.dump(spec, f)
            open(events_path, "w").close()
            process = subprocess.Popen(command(spec_path))
            last: dict[int, str] = {}
            fatal: dict[str, Any] | None = None
            stopped = False
            offset = 0
            while True:
                finished = process.poll() is not None
                with open(events_path, encoding="utf-8") as f:
                    f.seek(offset)
                    chunk = f.read()
                complete = chunk[: chunk.rfind("\n") + 1]
                offset += len(complete.encode("utf-8"))
                for line in complete.splitlines():
                    event = json.loads(line)
                    if "environment" in event:
                        env = env or event["environment"]
                    elif "record" in event:
                        done.add(event["index"])
                        on_record(event["index"], event["record"])
                    elif "fatal" in event:
                        fatal = event
                    elif "stopped" in event:
                        stopped = True
                    elif "column" in event:
                        last[event["index"]] = event["column"]
                if finished:
                    break
                time.sleep(0.2)
            pending = [i for i in pending if i not in done]
            if not pending:
                break
            if stopped:
                for i in pending:
                    on_record(i, _failed(cases[i][1], cases[i][0], _TIME_LIMIT))
                break
            index = pending[0]
            dtype, shape = cases[index]
            # the column the worker had started last: after a lost context, clean-up errors can mask which it was
            key = last.get(index) or (fatal["fatal"] if fatal else None)
            reason = fatal["reason"] if fatal else f"the worker process ended with exit code {process.returncode}"
            restarts += 1
            if restarts > MAX_RESTARTS:
                for i in pending:
                    on_record(i, _failed(cases[i][1], cases[i][0], f"not run: {MAX_RESTARTS} worker processes were "
                                         f"lost to crashes ({reason})"))
                break
            if key is None or key == "setup" or (dtype, key) in skip:
                on_record(index, _failed(shape, dtype, f"crashed: {reason}"))  # nothing to leave out: move on
                done.add(index)
                pending.pop(0)
            else:
                note = (f"not run: it broke the CUDA context on {dtype} {shape.name} ({reason}), so it was left "
                        f"out of the remaining {dtype} cases")
                for skipped in _skip_keys(key):
                    skip[(dtype, skipped)] = note
    return env


def _worker(spec_path: str) -> int:
    """A worker process: run the spec's cases, reporting events as JSON lines; exit 3 when the context is lost."""
    with open(spec_path, encoding="utf-8") as f:
        spec = json.load(f)
    events = open(spec["events"], "a", encoding="utf-8")

    def emit(event: dict) -> None:
        events.write(json.dumps(event, default=_json_default, allow_nan=False) + "\n")
        events.flush()

    runner = _Runner(repeats=spec["repeats"], warmup=spec["warmup"], tune_budget=spec["tune_budget_s"],
                     use_torch=spec["use_torch"])
    runner.skip = {(d, k): r for d, k, r in spec["skip"]}
    emit({"environment": environment(runner.torch)})
    for index, dtype, fields, seed in spec["cases"]:
        if spec.get("deadline") is not None and time.time() > spec["deadline"]:
            emit({"stopped": "time limit"})
            break
        runner.events = lambda event, index=index: emit(dict(event, index=index))
        try:
            record = runner.run_case(Shape(*fields), dtype, seed)
        except _Fatal as fatal:
            emit({"index": index, "fatal": fatal.key, "reason": fatal.reason})
            events.close()
            os._exit(3)  # no clean-up: the context is gone and may hang it
        emit({"index": index, "record": record})
    events.close()
    return 0


def run_benchmark(
    shapes: Iterable[Shape],
    dtypes: Iterable[str],
    *,
    repeats: int = 20,
    warmup: int = 5,
    tune_budget: float | None = None,
    use_torch: bool = True,
    seed: int = 0,
    progress: bool = True,
    isolate: bool = False,
    checkpoint: Callable[[dict[str, Any]], None] | None = None,
    time_limit: float | None = None,
) -> dict[str, Any]:
    """Run every (dtype, shape) case on GPU 0 and return the results (JSON-serialisable).

    Parameters
    ----------
    shapes : iterable of Shape
    dtypes : iterable of str
        Input types, keys of ``DTYPES``.
    repeats, warmup : int
        Timed samples (the median is kept) and untimed calls first, for every column.
    tune_budget : float, optional
        Seconds allowed to our timed tuner per case (its own default when None).
    use_torch : bool
        Include PyTorch's columns where PyTorch is installed.
    seed : int
        Seed of CuPy's generator; case ``i`` draws its inputs with seed ``seed + i``.
    progress : bool
        A progress bar (tqdm, when installed) or progress lines on stderr.
    isolate : bool
        Run the cases in worker processes, so that a column that breaks the CUDA context (a sticky error such
        as an illegal instruction) costs that column, not the run (what the command line does). In-process
        otherwise: such a failure then ends the run, the remaining cases recorded as not run.
    checkpoint : callable, optional
        Called with the results so far after every case (to save them as the run goes).
    time_limit : float, optional
        Seconds after which no new case is started; the cases left are recorded as not run. The large shapes
        run first, so a limited run still has what the speedup targets are judged on.

    Returns
    -------
    dict
        ``{"environment": ..., "settings": ..., "cases": [...]}``; each case holds ``columns`` (per column
        ``median_ms``, ``min_ms``, ``rel_err``, ``ok``, or ``na`` with the reason), ``configs``, ``tune_s``,
        ``ours_timing`` (how our eager and graph columns were timed: ``"interleaved"``, or one after another
        where interleaving broke the CUDA context in an earlier case) and ``derived`` (:func:`summarize`).
        ``settings["ours_timing"]`` is ``"interleaved"``; results without it timed our columns one after
        another, on one plan.
    """
    shapes, dtypes = list(shapes), list(dtypes)
    for dtype in dtypes:
        if dtype not in DTYPES:
            raise ValueError(f"dtypes: expected names from {', '.join(DTYPES)}; got {dtype!r}")
    if repeats < 1 or warmup < 0:
        raise ValueError(f"repeats must be >= 1 and warmup >= 0, got {repeats} and {warmup}")
    from .._native.devices import gpu_unavailable_reason

    reason = gpu_unavailable_reason()
    if reason:
        raise RuntimeError(f"the benchmark needs a GPU: {reason}")
    deadline = None if time_limit is None else time.time() + time_limit
    settings = {"repeats": repeats, "warmup": warmup, "tune_budget_s": tune_budget, "seed": seed, "noise": NOISE,
                "use_torch": use_torch, "isolated": isolate, "time_limit_s": time_limit, "deadline": deadline,
                # our stages: a plan each, eager (and graph) columns timed in alternation (see _Runner._ours)
                "ours_timing": "interleaved"}
    results: dict[str, Any] = {"environment": {}, "settings": settings, "cases": []}
    # the large shapes first, so that a run cut short still has what the targets are judged on
    order = sorted(range(len(shapes)), key=lambda i: (not is_large(shapes[i].m, shapes[i].n, shapes[i].k), i))
    cases = [(dtype, shapes[i]) for i in order for dtype in dtypes]
    records: dict[int, dict] = {}
    bar = _progress(len(cases), progress)
    started = time.perf_counter()

    def on_record(index: int, record: dict) -> None:
        records[index] = record
        bar.update(f"{record['dtype']} {record['shape']}", record.get("seconds", 0.0))
        results["cases"] = _ordered(records, shapes, dtypes)
        results["seconds"] = time.perf_counter() - started
        if checkpoint is not None:
            checkpoint(results)

    try:
        if isolate:
            results["environment"] = _run_isolated(cases, settings, on_record) or environment()
        else:
            runner = _Runner(repeats=repeats, warmup=warmup, tune_budget=tune_budget, use_torch=use_torch)
            results["environment"] = environment(runner.torch)
            lost = None
            for index, (dtype, shape) in enumerate(cases):
                if lost or (deadline is not None and time.time() > deadline):
                    on_record(index, _failed(shape, dtype, f"not run: {lost}" if lost else _TIME_LIMIT))
                    continue
                try:
                    on_record(index, runner.run_case(shape, dtype, seed + index))
                except _Fatal as fatal:
                    lost = f"the CUDA context was lost in {dtype} {shape.name}, {fatal}"
                    on_record(index, _failed(shape, dtype, f"crashed: {fatal}"))
    finally:
        bar.close()
    results["cases"] = _ordered(records, shapes, dtypes)
    results["seconds"] = time.perf_counter() - started
    return results


def _ordered(records: dict[int, dict], shapes: list[Shape], dtypes: list[str]) -> list[dict]:
    """Records by type, then in the order the shapes were given."""
    rank = {shape.name: i for i, shape in enumerate(shapes)}
    return sorted(records.values(), key=lambda r: (dtypes.index(r["dtype"]), rank.get(r["shape"], 0)))


# -- summaries and targets (no GPU needed) ---------------------------------------------------------


def _ms(column: dict | None) -> float | None:
    """A column's median if it ran and agreed with the reference, else None."""
    if not column or "median_ms" not in column or column.get("ok") is False:
        return None
    return float(column["median_ms"])


def summarize(case: dict[str, Any]) -> dict[str, Any]:
    """Derived figures of one case: best dense, our headline column, speedups, TFLOP/s, host-bound flag.

    Only columns that ran and agreed with the reference count. Our headline is the timed tuner's eager column,
    else the search's, else the default's.
    """
    columns = case.get("columns", {})
    dense = {key: _ms(columns.get(key)) for key in DENSE_COLUMNS}
    dense = {key: ms for key, ms in dense.items() if ms is not None}
    best_key = min(dense, key=dense.get) if dense else None
    ours_key = next((f"ours_{s}" for s in ("timed", "search", "default") if _ms(columns.get(f"ours_{s}"))), None)
    ours = _ms(columns.get(ours_key)) if ours_key else None
    graph = _ms(columns.get(f"{ours_key}_graph")) if ours_key else None
    cslt = [ms for ms in (_ms(columns.get("cslt_default")), _ms(columns.get("cslt_search"))) if ms is not None]
    m, n, k = case["m"], case["n"], case["k"]
    best = dense.get(best_key) if best_key else None

    def ratio(a: float | None, b: float | None) -> float | None:
        return a / b if a is not None and b is not None and b > 0 else None

    failed = sorted(key for key, col in columns.items() if col.get("ok") is False)
    return {
        "best_dense": best_key,
        "best_dense_ms": best,
        "ours": ours_key,
        "ours_ms": ours,
        "ours_graph_ms": graph,
        "cslt_best_ms": min(cslt) if cslt else None,
        "speedup": ratio(best, ours),
        "vs_cslt": ratio(min(cslt) if cslt else None, ours),
        "tflops": throughput(m, n, k, ours) if ours else None,
        "tflops_graph": throughput(m, n, k, graph) if graph else None,
        # the GPU finishes a replayed GEMM in under half the eager time: the eager figure is host time
        "host_bound": bool(graph is not None and ours is not None and graph < 0.5 * ours),
        "failed_checks": failed,
    }


def _tuner_times(case: dict) -> tuple[dict[str, float | None], str]:
    """Per-config times for the tuner comparison: graph replays (GPU time alone) when all three exist, else
    the eager columns."""
    columns = case.get("columns", {})
    graph = {s: _ms(columns.get(f"ours_{s}_graph")) for s in ("default", "search", "timed")}
    if all(v is not None for v in graph.values()):
        return graph, "graph"
    return {s: _ms(columns.get(f"ours_{s}")) for s in ("default", "search", "timed")}, "eager"


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}{'' if n == 1 else 's'}"


def _fmt_x(value: float | None) -> str:
    if value is None:
        return "n/a"
    return f"{value:.0f}x" if value >= 100 else f"{value:.2f}x"


def _fmt_time(ms: float) -> str:
    """Three significant digits (trailing zeros kept: 1.00, 0.180), whole numbers from 100 on."""
    return f"{ms:#.3g}" if ms < 100 else f"{ms:.0f}"


def _case_label(case: dict) -> str:
    return f"{case['dtype']} {case['shape']}"


def targets(results: dict[str, Any], noise: float = NOISE) -> list[dict[str, Any]]:
    """The project's speed targets, judged on ``results`` (and ``results["host_overhead"]`` when present).

    Returns one dict per target: ``target``, ``goal``, ``measured`` (text), ``met`` (True, False or None when
    it could not be judged) and ``details`` (the cases that missed, with their figures).
    """
    # summaries recomputed from the raw medians, never read back from the file
    cases = [dict(c, derived=summarize(c)) for c in results.get("cases", []) if "error" not in c]
    rows: list[dict[str, Any]] = []

    for dtype, goal in GOALS.items():
        large = [c for c in cases if c["dtype"] == dtype and c.get("large")]
        speedups = [(c, c["derived"]["speedup"]) for c in large if c["derived"]["speedup"] is not None]
        what = "best dense int8 GEMM" if dtype == "int8" else "best dense GEMM"
        row = {"target": f"{dtype}: median speedup over the {what}, large shapes", "goal": f">= {goal:.2f}x"}
        if not speedups:
            row.update(measured="n/a (no large case measured)", met=None, details=[])
        else:
            median = statistics.median(s for _, s in speedups)
            below = [f"{_case_label(c)}: {s:.2f}x" for c, s in speedups if s < goal]
            row.update(
                measured=f"{median:.2f}x over {_count(len(speedups), 'shape')} "
                f"(range {min(s for _, s in speedups):.2f}x - {max(s for _, s in speedups):.2f}x)",
                met=median >= goal,
                details=[f"{len(below)} of {len(speedups)} shapes below {goal:.2f}x: " + "; ".join(below)]
                if below else [],
            )
        rows.append(row)

    for other in ("default", "search"):
        judged, late, kinds = 0, [], set()
        for case in cases:
            times, kind = _tuner_times(case)
            if times["timed"] is None or times[other] is None:
                continue
            judged += 1
            kinds.add(kind)
            if times["timed"] > times[other] * (1 + noise):
                late.append(f"{_case_label(case)}: tuned {times['timed']:.4g} ms vs {other} {times[other]:.4g} ms "
                            f"({times['timed'] / times[other]:.3f}x, {kind})")
        label = "the default config" if other == "default" else "cusparseLtMatmulSearch"
        row = {"target": f"timed tuner never slower than {label}",
               "goal": f"0 cases slower by more than {noise:.0%} (timing noise)"}
        if not judged:
            row.update(measured="n/a (the timed tuner did not run)", met=None, details=[])
        else:
            row.update(measured=f"{len(late)} of {_count(judged, 'case')} slower (compared on "
                       f"{' and '.join(sorted(kinds))} times)", met=not late, details=late)
        rows.append(row)

    slower = []
    judged = 0
    for case in cases:
        d = case["derived"]
        if d["vs_cslt"] is None:
            continue
        judged += 1
        if d["vs_cslt"] <= 1.0:
            slower.append(f"{_case_label(case)}: ours {d['ours_ms']:.4g} ms vs {d['cslt_best_ms']:.4g} ms")
    row = {"target": "faster than torch._cslt_sparse_mm (its better of default and searched) on every case",
           "goal": "0 cases slower"}
    if not judged:
        row.update(measured="n/a (PyTorch's cuSPARSELt did not run)", met=None, details=[])
    else:
        ratios = [c["derived"]["vs_cslt"] for c in cases if c["derived"]["vs_cslt"] is not None]
        row.update(measured=f"{len(slower)} of {_count(judged, 'case')} slower; median advantage "
                   f"{statistics.median(ratios):.2f}x", met=not slower, details=slower)
    rows.append(row)

    failed = [f"{_case_label(c)}: {', '.join(c['derived']['failed_checks'])}" for c in cases
              if c["derived"]["failed_checks"]]
    rows.append({"target": "every column agrees with the float64 reference", "goal": "0 failed checks",
                 "measured": f"{_count(len(failed), 'case')} with a failed check", "met": not failed,
                 "details": failed})

    rows += _host_targets(results.get("host_overhead"))
    return rows


def _host_targets(host: dict | None) -> list[dict[str, Any]]:
    if not host or not host.get("problems"):
        return [{"target": "host time per call within 3 us of the C library's own", "goal": "<= 3 us",
                 "measured": "n/a (no host-overhead measurement)", "met": None, "details": []}]
    rows = []
    for key, label in (("py_matmul_host_us", "plan.matmul"), ("py_bind_host_us", "plan.bind(...)()")):
        diffs = [(p, p[key] - p["c_host_us"]) for p in host["problems"]
                 if p.get(key) is not None and p.get("c_host_us") is not None]
        row = {"target": f"host time per call of {label} within {HOST_OVERHEAD_GOAL_US:g} us of the C loop",
               "goal": f"<= {HOST_OVERHEAD_GOAL_US:g} us"}
        if not diffs:
            why = host.get("c_reason") or "not measured"
            row.update(measured=f"n/a ({why})", met=None, details=[])
        else:
            worst = max(d for _, d in diffs)
            row.update(
                measured=f"{worst:+.1f} us at worst (" + "; ".join(
                    f"{p['m']}x{p['n']}x{p['k']}: {p[key]:.1f} vs {p['c_host_us']:.1f} us" for p, _ in diffs) + ")",
                met=worst <= HOST_OVERHEAD_GOAL_US,
                details=[],
            )
        rows.append(row)
    smallest = min(host["problems"], key=lambda p: p["m"] * p["n"] * p["k"])
    graph, eager = smallest.get("graph_gpu_us"), smallest.get("py_matmul_gpu_us")
    row = {"target": "CUDA graph replay removes the host overhead (smallest problem)",
           "goal": "replayed GEMM faster than the host time per eager call"}
    host_us = smallest.get("c_host_us") or smallest.get("py_matmul_host_us")
    if graph is None or host_us is None:
        row.update(measured="n/a", met=None, details=[])
    else:
        eager_text = f", eager {eager:.1f} us of GPU time per call" if eager is not None else ""
        row.update(measured=f"{smallest['m']}x{smallest['n']}x{smallest['k']}: graph {graph:.1f} us per GEMM vs "
                   f"host {host_us:.1f} us per call{eager_text}", met=graph < host_us, details=[])
    rows.append(row)
    return rows


# -- markdown and plot -----------------------------------------------------------------------------


def _fmt_ms(column: dict | None) -> str:
    if not column:
        return "-"
    if "na" in column:
        return "n/a"
    text = _fmt_time(column["median_ms"])
    return text if column.get("ok", True) else f"{text} (wrong result)"


def _fmt_num(value: float | None, spec: str = ".3g") -> str:
    return "n/a" if value is None else format(value, spec)


def markdown_tables(results: dict[str, Any]) -> str:
    """One markdown table per input type: milliseconds per GEMM (medians), our TFLOP/s and speedups."""
    lines: list[str] = []
    cases = results.get("cases", [])
    for dtype in DTYPES:
        rows = [c for c in cases if c["dtype"] == dtype]
        if not rows:
            continue
        unit = "TOPS" if dtype == "int8" else "TFLOP/s"
        lines += [
            f"### {dtype} -> {DTYPES[dtype]}",
            "",
            f"| shape | M x N x K | best dense (ms) | cslt default / searched (ms) | ours default | ours search "
            f"| ours tuned | ours graph | tuned {unit} | speedup | vs cslt |",
            "|---|---|---|---|---|---|---|---|---|---|---|",
        ]
        for case in rows:
            if "error" in case:
                error = case["error"] if case["error"].startswith("not run") else f"case failed: {case['error']}"
                cells = [case["shape"], f"{case['m']} x {case['n']} x {case['k']}", error]
                lines.append("| " + " | ".join(cells + [""] * 8) + " |")
                continue
            d = summarize(case)
            col = case["columns"]
            dense = f"{_fmt_time(d['best_dense_ms'])} ({DENSE_COLUMNS[d['best_dense']]})" if d["best_dense"] else "n/a"
            mark = " *" if d["host_bound"] else ""
            graph = col.get((d["ours"] or "ours_timed") + "_graph")
            lines.append(
                f"| {case['shape']} | {case['m']} x {case['n']} x {case['k']} | {dense} | "
                f"{_fmt_ms(col.get('cslt_default'))} / {_fmt_ms(col.get('cslt_search'))} | "
                f"{_fmt_ms(col.get('ours_default'))} | {_fmt_ms(col.get('ours_search'))} | "
                f"{_fmt_ms(col.get('ours_timed'))}{mark} | {_fmt_ms(graph)} | "
                f"{_fmt_num(d['tflops'], '.0f')} | {_fmt_x(d['speedup'])} | "
                f"{_fmt_x(d['vs_cslt'])} |"
            )
        lines.append("")
    return "\n".join(lines)


def _na_reasons(results: dict[str, Any]) -> list[str]:
    """Each distinct reason a column did not run, with the columns and how many cases."""
    seen: dict[tuple[str, str], int] = {}
    for case in results.get("cases", []):
        for key, column in case.get("columns", {}).items():
            if "na" in column:
                seen[(key, column["na"])] = seen.get((key, column["na"]), 0) + 1
    return [f"`{key}` ({_count(count, 'case')}): {reason}" for (key, reason), count in sorted(seen.items())]


def _env_line(env: dict[str, Any]) -> str:
    parts = [
        f"{env.get('device', '?')} (SM {env.get('sm', '?')})",
        f"driver {env.get('driver') or '?'}",
        f"CUDA runtime {env.get('cuda_runtime', '?')}",
        f"cuSPARSELt {env.get('cusparselt', '?')}",
        f"CuPy {env.get('cupy') or '?'}",
        f"PyTorch {env.get('torch') or 'absent'}",
        f"pycusparselt {env.get('pycusparselt', '?')}",
    ]
    return ", ".join(parts) + f"; {env.get('date', '?')}"


def _host_table(host: dict[str, Any]) -> list[str]:
    lines = [
        "| problem (M x N x K, fp16) | C loop host (us/call) | plan.matmul host | plan.bind()() host | "
        "bind()() host, ABI call | bindings.matmul host | matmul - C | bind - C | GPU per call, eager | "
        "GPU per GEMM, graph |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    def us(p: dict, key: str) -> str:
        return _fmt_num(p.get(key), ".1f")

    def diff(p: dict, key: str) -> str:
        if p.get(key) is None or p.get("c_host_us") is None:
            return "n/a"
        return f"{p[key] - p['c_host_us']:+.1f}"

    for p in host.get("problems", []):
        lines.append(
            f"| {p['m']} x {p['n']} x {p['k']} | {us(p, 'c_host_us')} | {us(p, 'py_matmul_host_us')} | "
            f"{us(p, 'py_bind_host_us')} | {us(p, 'py_bind_abi_host_us')} | {us(p, 'py_bindings_host_us')} | "
            f"{diff(p, 'py_matmul_host_us')} | "
            f"{diff(p, 'py_bind_host_us')} | "
            f"{us(p, 'py_matmul_gpu_us')} | {us(p, 'graph_gpu_us')} |"
        )
    return lines


_RUNNING = """## Running the benchmarks

```bash
pip install "pycusparselt[cu13,bench]"        # matplotlib and tqdm: the plot and the progress bar
python -m pycusparselt bench --quick           # a few shapes, under a minute
python benchmarks/host_overhead.py --json host.json          # needs nvcc: the C loop
python -m pycusparselt bench --json results.json --plot results.png --markdown results.md \\
    --host-overhead host.json                  # the whole set, a few minutes on an H100
python scripts/bench_report.py results.json    # this page, from the JSON (no GPU needed)
```

`--dtypes fp16,bf16,int8,e4m3` and `--shapes` (`all`, `quick`, `square`, `bert`, `llm`, shape names such as
`llm-m16-4096to11008`, or `MxNxK`) choose the cases; `--repeats`, `--warmup` and `--tune-budget` the effort;
`--time-limit` stops starting cases after that many seconds (the large shapes run first); `--no-torch` leaves
PyTorch's columns out. The cases run in a worker process: a column that breaks the CUDA context (a sticky
error) is reported and left out of the remaining cases of its type, and the run goes on (`--in-process`
turns this off). The JSON holds every raw median, the configurations chosen, the tuning times and the
environment, and is rewritten after every case.

```{eval-rst}
.. automodule:: pycusparselt.bench
   :members: run_benchmark, summarize, targets, markdown_report, markdown_tables, plot, parse_shapes,
             parse_dtypes, gemm_flops, throughput, is_large, environment, Shape
```
"""


def _budget_text(budget: float | None) -> str:
    if budget is None:
        return "every candidate timed"
    return (f"a budget of {budget:g} s per case: the default config and the search's choice always, then the "
            "algorithm ids that fit")


def _ours_timing_text(settings: dict[str, Any]) -> str:
    """How our three stages were timed against each other (results written before interleaving say nothing)."""
    if settings.get("ours_timing") == "interleaved":
        return ("- Our three stages are timed in alternation: each has its own plan (tuned, then given its own "
                "compressed weight) and output, and each round takes one sample of each eager column, the first "
                "rotated from round to round; the graph columns likewise. Clock or thermal drift during a case "
                "thus favours no stage.")
    return ("- Our three stages were timed one after another (default, search, tuned) on one plan, so a later "
            "column can read slower from clock or thermal drift alone.")


def markdown_report(results: dict[str, Any], *, plot_path: str | None = None, notes: str | None = None,
                    source: str | None = None, api: bool = False) -> str:
    """The whole benchmark page (markdown): environment, method, targets, tables, plot, host overhead.

    Parameters
    ----------
    results : dict
        What :func:`run_benchmark` returns (or its JSON), optionally with ``"host_overhead"``.
    plot_path : str, optional
        The plot's path relative to the page, linked under "Results".
    notes : str, optional
        Markdown placed under the targets table (the reasons behind missed targets).
    source : str, optional
        The results file the page was generated from, named at the top.
    api : bool
        Add the "Running the benchmarks" section with the API reference (for the Sphinx page).
    """
    env = results.get("environment", {})
    settings = results.get("settings", {})
    lines = ["# Benchmarks", ""]
    if source:
        lines += [f"Generated from `{source}` by `scripts/bench_report.py`; rerun with `python -m pycusparselt "
                  f"bench --json RESULTS.json` on a GPU.", ""]
    lines += [
        f"Measured on {_env_line(env)}.",
        "",
        "Every case is a linear layer y (M, N) = x (M, K) @ W (N, K).T with W pruned 2:4 along K, in the form "
        "`SparseLinear` uses. All columns of a case multiply the same inputs (random values, W pruned once by "
        "cuSPARSELt); each column's result is compared once with a float64 product of those inputs, and a column "
        "that disagrees is marked \"wrong result\" and left out of every comparison. Times are medians of "
        f"{settings.get('repeats', '?')} CUDA-event timings after {settings.get('warmup', '?')} warm-up calls, in "
        "milliseconds per GEMM. TFLOP/s count 2·M·N·K operations (the dense work), also for the sparse columns.",
        "",
        "- *best dense*: the fastest of `cupy.matmul` (cuBLAS), cuBLAS `gemmEx` called through CuPy (int8: "
        "CUDA_R_8I inputs, CUDA_R_32I output, CUBLAS_COMPUTE_32I), `torch.mm`, `torch._int_mm` and "
        "`torch._scaled_mm` (with and without fast accumulation), where each exists;",
        "- *cslt*: PyTorch's `torch._cslt_sparse_mm` with its default config and with the config its search picks;",
        "- *ours*: `SparseMatmulPlan.matmul` with the library's default config, after `cusparseLtMatmulSearch` "
        "(`autotune(method=\"search\")`), after our timed tuner (`autotune(method=\"timed\")`, tuning cache off, "
        f"{_budget_text(settings.get('tune_budget_s'))}), and the tuned product replayed from a CUDA graph "
        "(`plan.bind`, time per GEMM);",
        _ours_timing_text(settings),
        "- *speedup*: best dense time / our tuned eager time; *vs cslt*: PyTorch's better time / ours.",
        "- Eager columns include the host's launch cost wherever it is longer than the GPU's time (small "
        "problems); `*` marks those cases (the graph replay is under half the eager time).",
        f"- Large shapes (the speedup targets): every dimension >= 1024 and >= 1e11 operations. The tuner is "
        f"compared on graph replays (GPU time alone), with {settings.get('noise', NOISE):.0%} allowed for timing "
        "noise.",
        "",
        "## Targets",
        "",
        "| target | goal | measured | met |",
        "|---|---|---|---|",
    ]
    rows = targets(results, settings.get("noise", NOISE))
    for row in rows:
        met = {True: "yes", False: "**no**", None: "n/a"}[row["met"]]
        lines.append(f"| {row['target']} | {row['goal']} | {row['measured']} | {met} |")
    details = [(row["target"], d) for row in rows for d in row["details"]]
    if details:
        lines += ["", "Cases behind the misses:", ""]
        lines += [f"- {target}: {detail}" for target, detail in details]
    if notes:
        lines += ["", notes.strip()]
    lines += ["", "## Results", ""]
    if plot_path:
        lines += [f"![Speedup over the best dense GEMM]({plot_path})", ""]
    lines.append(markdown_tables(results))
    host = results.get("host_overhead")
    if host and host.get("problems"):
        lines += ["## Host overhead", "", host.get("description", "Host time per call (wall clock around a loop of "
                  "calls with no synchronisation inside), against a C program that loops cusparseLtMatmul on the "
                  "same problem."), ""]
        lines += _host_table(host)
        if host.get("c_reason"):
            lines += ["", f"C loop: {host['c_reason']}"]
        lines.append("")
    reasons = _na_reasons(results)
    if reasons:
        lines += ["## Columns that did not run", ""] + [f"- {r}" for r in reasons] + [""]
    if api:
        lines.append(_RUNNING)
    return "\n".join(lines).rstrip() + "\n"


def plot(results: dict[str, Any], path: str) -> str | None:
    """Write a PNG of the speedups over the best dense GEMM, one panel per input type.

    Returns None when written, else the reason it was not (matplotlib missing, nothing to plot).
    """
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "matplotlib is not installed (pip install 'pycusparselt[bench]')"
    cases = [c for c in results.get("cases", []) if "error" not in c]
    dtypes = [d for d in DTYPES if any(c["dtype"] == d for c in cases)]
    if not dtypes:
        return "no case to plot"
    fig, axes = plt.subplots(len(dtypes), 1, figsize=(14, 3.4 * len(dtypes)), squeeze=False)
    for ax, dtype in zip(axes[:, 0], dtypes, strict=True):
        rows = [c for c in cases if c["dtype"] == dtype]
        derived = [summarize(c) for c in rows]
        xs = np.arange(len(rows))
        width = 0.4
        # eager against eager: the same calls a user makes; a ratio that cannot be formed is left out
        series = (
            ("ours, tuned", [d["speedup"] for d in derived]),
            ("torch._cslt_sparse_mm (better of default, searched)",
             [d["best_dense_ms"] / d["cslt_best_ms"] if d["best_dense_ms"] and d["cslt_best_ms"] else None
              for d in derived]),
        )
        for i, (label, values) in enumerate(series):
            bars = ax.bar(xs + (i - 0.5) * width, [v if v else np.nan for v in values], width, label=label)
            ax.bar_label(bars, labels=[f"{v:.2f}" if v else "" for v in values], fontsize=6, padding=1)
        top = max([v for _, values in series for v in values if v] + [GOALS.get(dtype, 1.0)])
        ax.set_ylim(0, max(2.0, 1.2 * top))
        ax.axhline(1.0, color="black", linewidth=0.8)
        if dtype in GOALS:
            ax.axhline(GOALS[dtype], color="tab:red", linestyle="--", linewidth=0.8,
                       label=f"target {GOALS[dtype]:.2f}x (large shapes)")
        ax.set_xticks(xs)
        ax.set_xticklabels([c["shape"] for c in rows], rotation=35, ha="right", fontsize=7)
        ax.set_ylabel("speedup over best dense")
        ax.set_title(f"{dtype} -> {DTYPES[dtype]}")
        ax.legend(fontsize=7, loc="upper right", ncol=3)
    fig.suptitle(f"2:4 sparse vs best dense GEMM: {results.get('environment', {}).get('device', '')}")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return None


# -- command line ------------------------------------------------------------------------------------


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The ``bench`` subcommand's options."""
    parser.add_argument("--quick", action="store_true",
                        help="a few shapes and fewer repetitions, for development (under a minute)")
    parser.add_argument("--dtypes", default=",".join(DTYPES), help="comma-separated input types (default: all)")
    parser.add_argument("--shapes", default=None,
                        help="comma-separated: all, quick, square, bert, llm, shape names, or MxNxK "
                        "(default: all; --quick: quick)")
    parser.add_argument("--repeats", type=int, default=None, help="timed runs per column (default 20; quick 10)")
    parser.add_argument("--warmup", type=int, default=None, help="untimed calls first (default 5; quick 3)")
    parser.add_argument("--tune-budget", type=float, default=None,
                        help="seconds for the timed tuner per case (default 2; quick 1): the default config and the "
                        "search's choice are always timed, then as many algorithm ids as fit")
    parser.add_argument("--time-limit", type=float, default=None,
                        help="seconds after which no new case starts (the rest is recorded as not run)")
    parser.add_argument("--no-torch", action="store_true", help="leave out PyTorch's columns")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", metavar="PATH", help="write all results (raw medians) as JSON")
    parser.add_argument("--markdown", metavar="PATH", help="write the tables and targets as markdown")
    parser.add_argument("--plot", metavar="PATH", help="write a PNG plot of the speedups (needs matplotlib)")
    parser.add_argument("--host-overhead", metavar="PATH",
                        help="JSON written by benchmarks/host_overhead.py, included in the results and report")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar or lines")
    parser.add_argument("--in-process", action="store_true",
                        help="run every case in this process (by default worker processes run them, so that a "
                        "crash costs one column, not the run)")


def _json_default(value: Any) -> Any:
    if isinstance(value, np.generic):
        return value.item()
    raise TypeError(f"not JSON-serialisable: {type(value).__name__}")


def cmd_bench(args: argparse.Namespace) -> int:
    """Run the benchmark as the options say; print the tables and the targets."""
    try:
        shapes = parse_shapes(args.shapes or ("quick" if args.quick else "all"))
        dtypes = parse_dtypes(args.dtypes)
    except ValueError as exc:
        print(f"pycusparselt bench: {exc}", file=sys.stderr)
        return 2
    repeats = args.repeats if args.repeats is not None else (10 if args.quick else 20)
    warmup = args.warmup if args.warmup is not None else (3 if args.quick else 5)
    tune_budget = args.tune_budget if args.tune_budget is not None else (1.0 if args.quick else 2.0)
    host = None
    if args.host_overhead:
        try:
            with open(args.host_overhead, encoding="utf-8") as f:
                host = json.load(f)
        except (OSError, ValueError) as exc:  # a failed measurement must not cost the benchmark
            print(f"pycusparselt bench: --host-overhead not read ({exc}); going on without it", file=sys.stderr)
    def save(results: dict[str, Any]) -> None:
        if host is not None:
            results["host_overhead"] = host
        if args.json:  # rewritten after every case: a run cut short keeps what it measured
            tmp = f"{args.json}.tmp"
            with open(tmp, "w", encoding="utf-8") as f:
                json.dump(results, f, indent=1, default=_json_default, allow_nan=False)
            os.replace(tmp, args.json)

    try:
        results = run_benchmark(shapes, dtypes, repeats=repeats, warmup=warmup, tune_budget=tune_budget,
                                use_torch=not args.no_torch, seed=args.seed, progress=not args.no_progress,
                                isolate=not args.in_process, checkpoint=save, time_limit=args.time_limit)
    except (RuntimeError, ValueError) as exc:
        print(f"pycusparselt bench: {exc}", file=sys.stderr)
        return 1
    save(results)
    plot_ref = None
    if args.plot:
        why = plot(results, args.plot)
        if why:
            print(f"no plot: {why}", file=sys.stderr)
        elif args.markdown:
            plot_ref = os.path.relpath(args.plot, os.path.dirname(os.path.abspath(args.markdown)))
    report = markdown_report(results, plot_path=plot_ref)
    if args.markdown:
        with open(args.markdown, "w", encoding="utf-8") as f:
            f.write(report)
    print(report)
    return 0


def main(argv: list[str] | None = None) -> int:
    """``python -m pycusparselt.bench``: the same as ``python -m pycusparselt bench``."""
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--worker"] and len(argv) == 2:
        return _worker(argv[1])
    parser = argparse.ArgumentParser(prog="pycusparselt bench", description=__doc__.splitlines()[0])
    add_arguments(parser)
    return cmd_bench(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
