"""The auto-tuner behind :meth:`pycusparselt.SparseMatmulPlan.autotune`: time candidate configurations with
CUDA events and keep the fastest, remembering the winner on disk (:mod:`pycusparselt.tuning.cache`; the
timing itself is ``pycusparselt.tuning.timing``). :mod:`pycusparselt.tuning` exports its public names.

Why our own: on the H100 ``cusparseLtMatmulSearch`` sometimes keeps a configuration slower than the default
one, and the default can be twice as slow as the best (every FP8 case). So every algorithm id is timed, then
split-K variants of the two fastest, and the default configuration and the library search's choice are
always candidates: the winner is never slower than either, up to timing noise.
"""

from __future__ import annotations

import math
import time
import warnings
from typing import Any, NamedTuple, Protocol

from .._native import gpu
from .._native.library import library_version
from ..enums import SplitKMode
from ..errors import CuSparseLtError
from .cache import TuningCache, TuningCacheWarning
from .timing import time_gpu

__all__ = ["PlanConfig", "Candidate", "TuningReport", "Tunable", "tuning_key", "autotune", "tuning_is_safe_on",
           "TUNING_OFF_DEVICE_0"]

# split-K factors and modes tried on the fastest algorithm ids; invalid ones are refused by the library
# and recorded as such
SPLIT_K_FACTORS = (2, 4, 8)
SPLIT_K_MODES = (SplitKMode.SPLIT_K_MODE_ONE_KERNEL, SplitKMode.SPLIT_K_MODE_TWO_KERNELS)
SPLIT_K_FINALISTS = 2
MAX_ROTATION = 8
RETIMED = 3
#: Milliseconds the GPU is kept busy before timing the first candidate (clocks ramp up), and before each later
#: one (the host re-initialises the plan in about a millisecond between them: the clocks stay up).
WARM_MS = 25.0
WARM_MS_NEXT = 5.0
#: Host time allowed per timed call when holding the stream (generous: an enqueue costs 10-30 us).
HOLD_US_PER_CALL = 50.0


class PlanConfig(NamedTuple):
    """The algorithm a plan runs: cuSPARSELt's config id and its split-K settings.

    When setting :attr:`SparseMatmulPlan.config`, a split-K field left at None takes the library's
    default for that algorithm.
    """

    alg_id: int
    split_k: int | None = None
    split_k_mode: int | None = None
    split_k_buffers: int | None = None


class Candidate(NamedTuple):
    """One configuration the tuner tried."""

    config: PlanConfig
    source: str  # "default", "search" (cusparseLtMatmulSearch's choice), "alg" or "split-k"
    median_ms: float | None  # None when the library refused it
    error: str | None = None
    setup_ms: float = 0.0  # re-initialising the plan and compressing for it


class TuningReport(NamedTuple):
    """What :meth:`~pycusparselt.SparseMatmulPlan.autotune` did.

    ``source`` is "timed" (candidates timed now), "cache" (a stored winner applied, nothing timed) or
    "search" (``cusparseLtMatmulSearch`` only). ``candidates`` is empty unless timed.
    """

    method: str
    source: str
    best: PlanConfig
    candidates: tuple[Candidate, ...]
    seconds: float = 0.0

    def time_of(self, source: str) -> float | None:
        """The median time (ms) of the first candidate from ``source`` ("default", "search"), if timed."""
        for cand in self.candidates:
            if cand.source == source:
                return cand.median_ms
        return None

    @property
    def best_ms(self) -> float | None:
        """The winner's median time in milliseconds (None unless timed)."""
        times = [c.median_ms for c in self.candidates if c.median_ms is not None]
        return min(times) if times else None


class Tunable(Protocol):
    """What the tuner tunes: a plan on the operands of one call. The plan layer's
    :class:`~pycusparselt.gemm.plan.TuningTarget` is one; the tuner knows nothing else of plans."""

    device: int
    default_config: PlanConfig
    max_alg_id: int
    padded: bool
    config: PlanConfig  # setting it re-initialises the plan (on a selection shared by the problem's plans)

    def try_config(self, config: PlanConfig) -> None:
        """Set one candidate's configuration (on a selection of the plan's own, changed in place)."""

    def problem_signature(self) -> dict[str, Any]:
        """What the tuning cache keys the problem by."""

    def prepare(self, stream: Any) -> Any:
        """Compress for the current configuration and check one call on ``stream``: a
        :class:`~pycusparselt.gemm.plan.TimedCall`."""

    def search(self, stream: Any) -> None:
        """Run ``cusparseLtMatmulSearch``; ``config`` is then its choice."""


def tuning_key(plan: Any) -> dict[str, Any]:
    """The tuning cache key of ``plan`` (a :class:`~pycusparselt.SparseMatmulPlan` or its
    :class:`~pycusparselt.gemm.plan.TuningTarget`): GPU, library version and the full problem signature."""
    cupy = gpu.cupy()

    props = cupy.cuda.runtime.getDeviceProperties(plan.device)
    name = props["name"]
    return {
        "gpu": name.decode() if isinstance(name, bytes) else str(name),
        "compute_capability": f"{props['major']}.{props['minor']}",
        "cusparselt": ".".join(map(str, library_version())),
        "problem": plan.problem_signature(),
    }


def _copies(ptr: int, nbytes: int, count: int, stream_ptr: int, keep: list, slack: int = 0) -> list[int]:
    """``count`` device copies of ``nbytes`` at ``ptr`` (the first is ``ptr`` itself), each allocated with
    ``slack`` bytes more."""
    cupy = gpu.cupy()

    ptrs = [ptr]
    for _ in range(count - 1):
        buf = cupy.empty(nbytes + slack, dtype=cupy.uint8)
        cupy.cuda.runtime.memcpyAsync(buf.data.ptr, ptr, nbytes, cupy.cuda.runtime.memcpyDeviceToDevice, stream_ptr)
        keep.append(buf)
        ptrs.append(buf.data.ptr)
    return ptrs


def _rotation_count(target: Tunable, call: Any) -> int:
    """How many operand sets to cycle through so that timed calls read from memory as in real use: enough
    to overflow L2 when the whole problem fits in it, else 1."""
    cupy = gpu.cupy()

    if target.padded:  # the plan's own padded buffers are the operands
        return 1
    total = call.s_nbytes + call.x_nbytes + call.d_nbytes
    l2 = cupy.cuda.Device(target.device).attributes["L2CacheSize"]
    return 1 if total >= l2 else min(MAX_ROTATION, math.ceil(2 * l2 / total) + 1)


#: Why configurations other than the default are tried on device 0 only (see :func:`tuning_is_safe_on`).
TUNING_OFF_DEVICE_0 = (
    "with cuSPARSELt 0.8.0, on device 1 of two H200s, cusparseLtMatmulSearch and cusparseLtMatmul of some "
    "non-default configurations returned with device 0 current, and those configurations gave wrong products "
    "and illegal memory accesses; the default configuration ran correctly"
)


def tuning_is_safe_on(device: int) -> bool:
    """Whether configurations other than the library's default (and ``cusparseLtMatmulSearch``) may run for a
    plan on ``device``: only on device 0 (:data:`~pycusparselt.tuning.TUNING_OFF_DEVICE_0`). Elsewhere the
    timed tuner keeps the default configuration. A process that sees its one GPU as device 0
    (``CUDA_VISIBLE_DEVICES``) tunes."""
    return device == 0


def _measure(run, sets: list, stream: Any, repeats: int, warmup: int, warm_ms: float = WARM_MS) -> float:
    """Median GPU milliseconds per call of ``run`` over the rotating operand ``sets``.

    Calls are timed eagerly, behind a kernel that holds the stream until every timed call is queued
    (:func:`~pycusparselt.tuning.timing.time_gpu`'s ``hold_us``): a GEMM shorter than the host's launch cost (10-30 us)
    is otherwise timed at the host's pace, which hides the differences between configurations. CUDA graphs
    would do the same, but a tuner that captured its candidates ended the process with an illegal
    instruction while tuning FP16 4096^3 on the H100 (cuSPARSELt 0.8.0; the configuration was not isolated).
    """
    n = len(sets)

    def one(i: int) -> None:
        run(*sets[i % n])

    # Clocks drop while the GPU idles: keep it busy for about ``warm_ms`` before timing, whatever ``warmup``
    # says, so that every candidate is timed at the same clocks.
    first = time_gpu(one, repeats=1, warmup=warmup, stream=stream, hold_us=HOLD_US_PER_CALL).median_ms
    busy = min(2000, max(0, math.ceil(warm_ms / max(first, 1e-3))))
    return time_gpu(one, repeats=repeats, warmup=busy, stream=stream, hold_us=HOLD_US_PER_CALL * repeats).median_ms


def autotune(
    target: Tunable,
    *,
    repeats: int = 10,
    warmup: int = 3,
    budget_s: float | None = None,
    cache: TuningCache | bool | None = None,
) -> TuningReport:
    """Tune a plan on the operands of one call (``target``, see :meth:`pycusparselt.SparseMatmulPlan.autotune`)
    and keep the winner as its configuration."""
    cupy = gpu.cupy()

    if repeats < 1 or warmup < 0:
        raise ValueError(f"repeats must be >= 1 and warmup >= 0, got {repeats} and {warmup}")
    if budget_s is not None and budget_s < 0:
        raise ValueError(f"budget_s: expected a non-negative number of seconds, got {budget_s}")
    if cache is None or cache is True:
        cache = TuningCache()
    elif cache is not False and not isinstance(cache, TuningCache):
        raise TypeError(f"cache: expected a TuningCache, True, False or None, got {type(cache).__name__}")
    safe = tuning_is_safe_on(target.device)
    if not safe:  # a winner stored from device 0 of this GPU model is not for this device
        cache = False
    began = time.perf_counter()
    with cupy.cuda.Device(target.device):
        key = tuning_key(target) if cache else None
        if cache:
            stored = cache.get(key)
            if stored is not None:
                try:
                    target.config = PlanConfig(**stored["config"])
                    return TuningReport("timed", "cache", target.config, (), time.perf_counter() - began)
                except (KeyError, TypeError, ValueError, CuSparseLtError) as exc:
                    warnings.warn(
                        f"tuning cache entry {cache.path_for(key)} could not be applied ({exc}); tuning again",
                        TuningCacheWarning,
                        stacklevel=3,
                    )
        keep: list = []
        state: dict[str, Any] = {}
        # a stream of our own, after the caller's work is finished
        cupy.cuda.runtime.deviceSynchronize()
        tuning_stream = cupy.cuda.Stream(non_blocking=True)

        def prepare() -> tuple:
            """Compress for the plan's current configuration; return (run, operand sets)."""
            state.pop("s_keep", None)  # the previous candidate's copies
            call = target.prepare(tuning_stream)
            if "xd" not in state:
                count = _rotation_count(target, call)
                xs = _copies(call.x_ptr, call.x_nbytes, count, call.stream_ptr, keep)
                keep.extend(cupy.empty(call.d_nbytes, dtype=cupy.uint8) for _ in range(count - 1))
                ds = [call.d_ptr] + [buf.data.ptr for buf in keep[-(count - 1):]] if count > 1 else [call.d_ptr]
                state["xd"] = list(zip(xs, ds, strict=True))
            ss = _copies(call.s_ptr, call.s_nbytes, len(state["xd"]), call.stream_ptr,
                         state.setdefault("s_keep", []), call.s_slack)
            return call.run, [(s, x, d) for s, (x, d) in zip(ss, state["xd"], strict=True)]

        results: list[Candidate] = []
        tried: set[tuple] = set()

        def attempt(config: PlanConfig, source_name: str) -> CuSparseLtError | None:
            """Time ``config``; the library's refusal is recorded and returned."""
            if tuple(config) in tried:
                return None
            tried.add(tuple(config))
            setup = time.perf_counter()
            try:
                target.try_config(config)
                run, sets = prepare()
                setup = (time.perf_counter() - setup) * 1e3
                median = _measure(run, sets, tuning_stream, repeats, warmup, WARM_MS_NEXT if results else WARM_MS)
                results.append(Candidate(config, source_name, median, None, setup))
            except CuSparseLtError as exc:
                results.append(Candidate(config, source_name, None, f"{exc.function}: {exc.name}"))
                return exc
            return None

        default = target.default_config
        attempt(default, "default")
        if safe:
            # the library's search; its choice is then timed like any other configuration
            target.search(tuning_stream)
            tried.discard(tuple(default))
            attempt(target.config, "search")

        def in_budget() -> bool:
            return safe and (budget_s is None or time.perf_counter() - began < budget_s)

        for alg in range(target.max_alg_id):
            if not in_budget():
                break
            attempt(PlanConfig(alg, default.split_k, default.split_k_mode, default.split_k_buffers), "alg")
        timed = sorted((c for c in results if c.median_ms is not None), key=lambda c: c.median_ms)
        finalists = list(dict.fromkeys(c.config.alg_id for c in timed))[:SPLIT_K_FINALISTS]
        split_k_refused = False
        for alg in finalists:
            for factor in SPLIT_K_FACTORS:
                for mode in SPLIT_K_MODES:
                    if in_budget() and not split_k_refused:
                        error = attempt(PlanConfig(alg, factor, int(mode), None), "split-k")
                        # the architecture takes no split-K at all (SM 9.0 with 0.8.0): stop asking
                        split_k_refused = error is not None and error.name == "CUSPARSE_STATUS_INVALID_VALUE"
        # the closest few timed again with twice the repeats, so noise in one short measurement decides less
        for cand in sorted((c for c in results if c.median_ms is not None), key=lambda c: c.median_ms)[:RETIMED]:
            try:
                target.try_config(cand.config)
                run, sets = prepare()
                median = _measure(run, sets, tuning_stream, 2 * repeats, warmup, WARM_MS_NEXT)
            except CuSparseLtError:
                continue
            results[results.index(cand)] = cand._replace(median_ms=median)
        settable = sorted((c for c in results if c.median_ms is not None), key=lambda c: c.median_ms)
        if not settable:
            raise RuntimeError("autotune: the library refused every candidate configuration, the default included")
        best = settable[0]
        target.config = best.config
        tuning_stream.synchronize()
        keep.clear()
        state.clear()
        report = TuningReport("timed", "timed", target.config, tuple(results), time.perf_counter() - began)
        if cache:
            cache.put(key, {"config": best.config._asdict(), "median_ms": best.median_ms,
                            "default_ms": report.time_of("default")})
        return report
