"""Running the benchmark's cases: one GPU process (or several, isolated, restarting after a fatal error) and
the runner that times every column of a case on its inputs (``pycusparselt.bench.inputs``)."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import tempfile
import time
import warnings
from typing import Any, Callable, Iterable

import numpy as np
from .._native import gpu
from .cases import (
    DENSE_FOR,
    DTYPES,
    NOISE,
    SLOW_CALL_S,
    STAGES,
    TOLERANCE,
    Shape,
    gemm_flops,
    is_large,
    json_default,
)
from .environment import environment
from .inputs import Inputs, poison
from .report import summarize


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


class _Runner:
    """Runs the columns of the cases; holds what lives across cases (PyTorch, options)."""

    def __init__(self, *, repeats: int, warmup: int, tune_budget: float | None, use_torch: bool,
                 graph_calls: int = 20) -> None:
        cupy = gpu.cupy()

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

    def _check(self, data: Inputs, fn: Callable[[int], Any], result: Callable[[], Any]) -> tuple[dict, float]:
        """Run a column once and compare its result with the reference: ``(entry, seconds the call took)``."""
        cp = self.cp
        started = time.perf_counter()
        fn(0)
        cp.cuda.Device().synchronize()
        first_s = time.perf_counter() - started
        err = data.rel_err(result())
        ok = bool(err <= TOLERANCE[data.out])
        return {"rel_err": err if math.isfinite(err) else None, "ok": ok}, first_s

    def _column(self, record: dict, key: str, data: Inputs, build: Callable[[], tuple]) -> None:
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

    def _interleaved(self, record: dict, data: Inputs, builds: dict[str, Callable[[], tuple]],
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

    def _dense_columns(self, record: dict, data: Inputs) -> None:
        cp = self.cp
        x, w = data.x_store, data.w_store
        out = cp.empty((data.shape.m, data.shape.n), dtype=data.out_np)

        def cupy_matmul() -> tuple:
            if data.dtype not in ("fp16", "bf16"):
                raise _NotAvailable(f"cupy.matmul has no Tensor Core path for {data.dtype}")
            xt, wt = data.typed(x), data.typed(w)

            def run(_i: int) -> Any:
                return cp.matmul(xt, wt.T, out=out)

            poison(cp, out)
            return run, lambda: out

        def cublas_gemmex() -> tuple:
            return self._gemmex(data, x, w, out)

        builders = {"cupy_matmul": cupy_matmul, "cublas_gemmex": cublas_gemmex, **self._torch_dense(data)}
        for key in DENSE_FOR[data.dtype]:
            self._column(record, key, data, builders[key])

    def _gemmex(self, data: Inputs, x: Any, w: Any, out: Any) -> tuple:
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

        poison(cp, out)
        return run, lambda: out

    def _tensor(self, store: Any) -> Any:
        """A zero-copy PyTorch view of a CuPy array (bf16 and e4m3 through their bit patterns)."""
        torch = self.torch
        if store.dtype == self.cp.uint16:
            return torch.from_dlpack(store.view(self.cp.int16)).view(torch.bfloat16)
        return torch.from_dlpack(store)

    def _torch_inputs(self, data: Inputs) -> tuple:
        torch = self.torch
        if torch is None:
            raise _NotAvailable(self.torch_reason)
        xt, wt = self._tensor(data.x_store), self._tensor(data.w_store)
        if data.dtype == "e4m3":
            xt, wt = xt.view(torch.float8_e4m3fn), wt.view(torch.float8_e4m3fn)
        return torch, xt, wt

    def _torch_dense(self, data: Inputs) -> dict[str, Callable[[], tuple]]:
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

    def _cslt_columns(self, record: dict, data: Inputs) -> None:
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

        poison(cp, y)
        cp.cuda.Device().synchronize()  # the graph's stream does not wait for the legacy stream's fill
        return run, lambda: y, calls, stream

    def _ours(self, record: dict, data: Inputs, plan: Any, x: Any, wt: Any) -> None:
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
            for stage in STAGES:
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

                poison(cp, y)
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
        data = Inputs(self.cp, shape, dtype, seed)
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


def worker(spec_path: str) -> int:
    """A worker process: run the spec's cases, reporting events as JSON lines; exit 3 when the context is lost."""
    with open(spec_path, encoding="utf-8") as f:
        spec = json.load(f)
    events = open(spec["events"], "a", encoding="utf-8")

    def emit(event: dict) -> None:
        events.write(json.dumps(event, default=json_default, allow_nan=False) + "\n")
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


