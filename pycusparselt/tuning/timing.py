"""GPU timing with CUDA events: warm-up, then the median of several timed runs.

Used by the auto-tuner (:meth:`pycusparselt.SparseMatmulPlan.autotune`) and the benchmarks, so every figure
the project reports is measured the same way. :func:`time_gpu_interleaved` times several functions in
alternation, for comparisons that clock or thermal drift must not bias.
"""

from __future__ import annotations

import functools
import statistics
from typing import Any, Callable, Mapping, NamedTuple

from .._native import gpu

__all__ = ["Timing", "hold_stream", "time_gpu", "time_gpu_interleaved"]

#: One thread spins until ``ns`` nanoseconds of the GPU's global timer have passed (an elementwise kernel of one
#: element, compiled and loaded by CuPy for each device).
_HOLD_BODY = r"""
if (i == 0) {
    unsigned long long start, now;
    asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(start));
    do {
        asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(now));
    } while (now - start < ns);
    sink[0] = now - start;
}
"""

_hold_sinks: dict[int, Any] = {}  # per device: the kernel's one-element output


@functools.lru_cache(maxsize=1)
def _hold_kernel() -> Any:
    cupy = gpu.cupy()

    return cupy.ElementwiseKernel("uint64 ns", "raw uint64 sink", _HOLD_BODY, "pycusparselt_hold")


class Timing(NamedTuple):
    """Per-run GPU times of one timed function, in milliseconds."""

    median_ms: float
    min_ms: float
    times_ms: tuple[float, ...]


def hold_stream(stream: Any, microseconds: float) -> None:
    """Enqueue on ``stream`` a kernel that keeps it busy for ``microseconds`` (one thread spinning on the GPU's
    global timer), so that the host can queue the work that follows before the GPU reaches it. ``stream``: a
    CuPy stream or any stream ``pycusparselt._native.streams.stream_ptr`` takes, of the current device."""
    cupy = gpu.cupy()
    import numpy as np

    from .._native.streams import on_stream, stream_ptr

    device = cupy.cuda.runtime.getDevice()  # the caller makes the stream's device current
    sink = _hold_sinks.get(device)
    if sink is None:
        sink = _hold_sinks[device] = cupy.zeros(1, cupy.uint64)
    with on_stream(stream_ptr(stream)):
        _hold_kernel()(np.uint64(max(0, round(microseconds * 1e3))), sink, size=1)


def time_gpu(
    fn: Callable[[int], Any],
    *,
    repeats: int = 10,
    warmup: int = 3,
    inner: int = 1,
    stream: Any = None,
    hold_us: float = 0.0,
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
    hold_us : float
        When positive, the stream is held (:func:`hold_stream`) for this long before the first timed sample,
        so that all samples are queued before the GPU runs them: a call shorter than the host's launch cost is
        then timed at the GPU's pace, not the host's. Give it at least the host time of all timed calls.

    Returns
    -------
    Timing
    """
    cupy = gpu.cupy()

    if repeats < 1 or inner < 1 or warmup < 0:
        raise ValueError(f"repeats and inner must be >= 1 and warmup >= 0, got {repeats}, {inner}, {warmup}")
    stream = stream if stream is not None else cupy.cuda.get_current_stream()
    call = 0
    for _ in range(warmup):
        fn(call)
        call += 1
    events = [(cupy.cuda.Event(), cupy.cuda.Event()) for _ in range(repeats)]
    if hold_us > 0:
        hold_stream(stream, hold_us)
    for start, stop in events:
        start.record(stream)
        for _ in range(inner):
            fn(call)
            call += 1
        stop.record(stream)
    events[-1][1].synchronize()
    times = tuple(cupy.cuda.get_elapsed_time(start, stop) / inner for start, stop in events)
    return Timing(statistics.median(times), min(times), times)


def time_gpu_interleaved(
    fns: Mapping[str, Callable[[int], Any]],
    *,
    repeats: int = 10,
    warmup: int = 3,
    lead: int = 1,
    streams: Mapping[str, Any] | None = None,
    before: Callable[[str], Any] | None = None,
) -> dict[str, Timing]:
    """Time several functions on the GPU in alternation, so that drift (clocks, temperature) favours none.

    Each function is warmed up first. Then come ``repeats`` rounds; a round takes one sample of every function,
    and the function that goes first rotates from round to round (``a, b, c``, then ``b, c, a``, ...). A sample
    is ``lead`` untimed calls, then one call between two CUDA events, then a synchronisation, so samples never
    overlap and no function's work spills into another's.

    Parameters
    ----------
    fns : mapping of str to callable
        Each called as ``fn(i)`` with its own running call index (to rotate inputs), enqueuing its work on its
        stream.
    repeats : int
        Rounds, i.e. timed samples per function; the median is reported.
    warmup : int
        Untimed calls of each function first (library initialisation, caches, clocks).
    lead : int
        Untimed calls just before each timed one. The synchronisation after the previous sample leaves the GPU
        idle, so without them a sample would also time the host launching the call, and would start with the
        previous function's data in the caches; with them it starts behind queued work, as :func:`time_gpu`'s
        back-to-back samples do.
    streams : mapping of str to cupy.cuda.Stream, optional
        Where each function's events are recorded; CuPy's current stream for a function not in it.
    before : callable, optional
        Called as ``before(key)`` just before each timed call (after the lead calls, before the first event):
        untimed work it enqueues on the function's stream precedes the call, for example overwriting the L2
        cache so that every sample starts cold.

    Returns
    -------
    dict of str to Timing
        In the order of ``fns``.
    """
    cupy = gpu.cupy()

    if repeats < 1 or warmup < 0 or lead < 0:
        raise ValueError(f"repeats must be >= 1, warmup and lead >= 0, got {repeats}, {warmup}, {lead}")
    keys = list(fns)
    if not keys:
        return {}
    streams = dict(streams or {})
    current = cupy.cuda.get_current_stream()
    stream = {key: streams[key] if streams.get(key) is not None else current for key in keys}
    calls = dict.fromkeys(keys, 0)

    def call(key: str) -> None:
        fns[key](calls[key])
        calls[key] += 1

    for key in keys:
        for _ in range(warmup):
            call(key)
        stream[key].synchronize()
    times: dict[str, list[float]] = {key: [] for key in keys}
    for round_ in range(repeats):
        first = round_ % len(keys)
        for key in keys[first:] + keys[:first]:
            start, stop = cupy.cuda.Event(), cupy.cuda.Event()
            for _ in range(lead):
                call(key)
            if before is not None:
                before(key)
            start.record(stream[key])
            call(key)
            stop.record(stream[key])
            stop.synchronize()
            times[key].append(cupy.cuda.get_elapsed_time(start, stop))
    return {key: Timing(statistics.median(t), min(t), tuple(t)) for key, t in times.items()}
