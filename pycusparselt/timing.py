"""GPU timing with CUDA events: warm-up, then the median of several timed runs.

Used by the auto-tuner (:meth:`pycusparselt.SparseMatmulPlan.autotune`) and the benchmarks, so every figure
the project reports is measured the same way.
"""

from __future__ import annotations

import statistics
from typing import Any, Callable, NamedTuple

__all__ = ["Timing", "time_gpu"]


class Timing(NamedTuple):
    """Per-run GPU times of one timed function, in milliseconds."""

    median_ms: float
    min_ms: float
    times_ms: tuple[float, ...]


def time_gpu(
    fn: Callable[[int], Any],
    *,
    repeats: int = 10,
    warmup: int = 3,
    inner: int = 1,
    stream: Any = None,
) -> Timing:
    """Time ``fn`` on the GPU with CUDA events.

    Parameters
    ----------
    fn : callable
        Called as ``fn(i)`` with a running call index (to rotate inputs), enqueuing its work on ``stream``.
    repeats : int
        Timed samples; the median is reported.
    warmup : int
        Untimed calls first (library initialisation, caches, clocks).
    inner : int
        Calls per sample; a sample's time is divided by it (amortises launch gaps for tiny problems).
    stream : cupy.cuda.Stream, optional
        Where the events are recorded; CuPy's current stream when omitted.

    Returns
    -------
    Timing
    """
    import cupy

    if repeats < 1 or inner < 1 or warmup < 0:
        raise ValueError(f"repeats and inner must be >= 1 and warmup >= 0, got {repeats}, {inner}, {warmup}")
    stream = stream if stream is not None else cupy.cuda.get_current_stream()
    call = 0
    for _ in range(warmup):
        fn(call)
        call += 1
    events = [(cupy.cuda.Event(), cupy.cuda.Event()) for _ in range(repeats)]
    for start, stop in events:
        start.record(stream)
        for _ in range(inner):
            fn(call)
            call += 1
        stop.record(stream)
    events[-1][1].synchronize()
    times = tuple(cupy.cuda.get_elapsed_time(start, stop) / inner for start, stop in events)
    return Timing(statistics.median(times), min(times), times)

