"""Which kernel runs a :class:`~pycusparselt.SparseLinear` layer's inputs of 1 to 16 rows (a decode step):
cuSPARSELt's plan of 16 rows (inputs padded to it) or the decode kernel (:mod:`pycusparselt.gemm.decode`) on
the rows given.

The decode kernel has two forms (up to 8 rows, and 9 to 16), so the choice is made per *bucket* of rows, on the
bucket's largest row count (its slowest). On the first small input of a bucket the layer times the decode
kernel at each of its split-K settings against the layer's tuned cuSPARSELt plan, on the same input, in
alternation, each call after the L2 cache is overwritten (a network's weights are not in it when their layer
runs). The faster one serves the bucket, and the choice and both times are stored in the tuning cache
(:class:`~pycusparselt.tuning.cache.TuningCache`, keyed by GPU, library, weight shape, dtype, epilogue and
bucket), so a later process chooses without timing. Cache entries are checked as untrusted input: one that
does not hold a valid choice is ignored with a warning.

A layer whose weight the kernel reads in the compact form where it is (``LayerDecoder.for_compact``: the
``pycusparselt.torch`` modules, whose state is that form) is served by the kernel for every small input it
can, memory first: cuSPARSELt's product would keep two more copies of the weight (the dense one and the
compressed one, 1.5625 of the dense bytes against the state's 0.5625). Only its split of K is timed. On an
H100 that costs 8-15 % against cuSPARSELt's 16-row plan at 1 to 8 rows and 20-30 % at 9 to 16 (one call after
the L2 cache is overwritten, Llama-shaped layers).

``PYCUSPARSELT_DECODE_KERNEL`` sets the policy: ``auto`` (the default: timed as above), ``on`` (the decode
kernel wherever it can serve, untimed) or ``off`` (cuSPARSELt only). Layers that do not tune
(``autotune=False``) use cuSPARSELt unless the setting is ``on``, or the kernel reads their compact form
(memory first, above: then the kernel, untimed).

The kernel serves float16 and bfloat16 layers whose product is the whole layer: no quantization, no GELU (the
layer applies GELU after rounding the product; the kernel would apply it before), on a GPU it runs on. The
first small input of a layer chooses for both buckets (so one small call before a CUDA graph capture prepares
every row count): the kernel is compiled once per process and device (NVRTC, cached on disk by CuPy), and under
``auto`` each candidate is timed 16 times. A layer served by the decode kernel runs on one stream at a time
(the kernel's split-K workspace is the layer's), as its cuSPARSELt plan's workspace is.
"""

from __future__ import annotations

import math
import warnings
from typing import Any, Callable, NamedTuple

import numpy as np

from .. import _arrays
from .._native import gpu, settings
from ..gemm import decode
from ..tuning.cache import TuningCache, TuningCacheWarning
from ..tuning.timing import time_gpu_interleaved
from ..types import BF16, F16
from .layer_plans import device_identity

__all__ = ["BUCKETS", "SETTING", "POLICIES", "Choice", "LayerDecoder", "policy", "bucket_of", "unsupported_reason",
           "cache_key", "choice_from_entry", "choose"]

#: The buckets of input rows that one choice serves: (fewest, most).
BUCKETS = ((1, 8), (9, 16))
#: The environment variable that sets the policy, and its values.
SETTING = settings.DECODE_KERNEL
POLICIES = ("auto", "on", "off")
#: Timed calls of each candidate (the median counts).
_REPEATS = 15


class Choice(NamedTuple):
    """The kernel that serves one bucket: ``backend`` ``"decode"`` (with its ``splits``) or ``"cusparselt"``,
    the median times that decided it (None where not timed) and where it came from (``"timed"``, ``"cache"``,
    ``"setting"``, or ``"untimed"`` where cuSPARSELt's plan must pad the weight and the decode kernel serves)."""

    backend: str
    splits: int | None
    decode_us: float | None
    cusparselt_us: float | None
    source: str


def policy(env: Any = None) -> str:
    """The policy ``PYCUSPARSELT_DECODE_KERNEL`` sets: ``"auto"`` when unset or empty; ValueError naming the
    variable for a value that is not one of ``POLICIES``."""
    return settings.choice(SETTING, POLICIES, env)


def bucket_of(rows: int) -> int:
    """The index in :data:`BUCKETS` of the bucket holding ``rows`` (1..16)."""
    for index, (low, high) in enumerate(BUCKETS):
        if low <= rows <= high:
            return index
    raise ValueError(f"rows: expected 1..{BUCKETS[-1][1]}, got {rows}")


def unsupported_reason(*, on_device: bool, quantized: bool, dtype: np.dtype, post: bool,
                       device: int | None) -> str | None:
    """None where the decode kernel can serve a layer of these properties; else why not."""
    if not on_device:
        return "the layer runs on the NumPy reference"
    if quantized:
        return "the layer is quantized"
    if np.dtype(dtype) not in (F16, BF16):
        return f"the layer is {np.dtype(dtype).name} (the kernel takes float16 and bfloat16)"
    if post:
        return "the layer applies GELU after its product"
    return decode.unavailable_reason(device or 0)


def cache_key(identity: tuple, out_features: int, in_features: int, dtype: np.dtype, activation: str | None,
              bias: bool, bucket: int, layout: str = "packed") -> dict[str, Any]:
    """The tuning-cache key of a choice: ``identity`` is ``(GPU name, compute capability, cuSPARSELt
    version)`` (``pycusparselt.nn.layer_plans.device_identity``); ``layout`` the weight form the decode kernel
    reads (``"packed"``, or ``"compact"`` for ``DecodeGemm.from_compact``)."""
    gpu_name, cc, version = identity
    low, high = BUCKETS[bucket]
    key = {"kind": "small-batch kernel", "gpu": gpu_name, "cc": cc, "cusparselt": version,
           "n": int(out_features), "k": int(in_features), "dtype": np.dtype(dtype).name,
           "activation": activation, "bias": bool(bias), "rows": f"{low}-{high}"}
    if layout != "packed":  # the packed kernel's keys stay as they were stored
        key["layout"] = layout
    return key


def choice_from_entry(value: Any, max_splits: int) -> Choice | None:
    """The choice a cache entry's value holds, checked (a backend of ours, splits of 1..``max_splits`` for the
    decode kernel and None for cuSPARSELt, times positive and finite or absent); None, warned, for anything
    else."""
    try:
        backend, splits = value["backend"], value["splits"]
        times = [value.get("decode_us"), value.get("cusparselt_us")]
        ok = backend in ("decode", "cusparselt") and all(
            t is None or (type(t) in (int, float) and math.isfinite(t) and t > 0) for t in times)
        if backend == "decode":
            ok = ok and type(splits) is int and 1 <= splits <= max_splits
        elif splits is not None:
            ok = False
    except (KeyError, TypeError, AttributeError):
        ok = False
    if not ok:
        warnings.warn(f"tuning cache: a small-batch kernel entry holds no valid choice ({value!r:.200}); ignored",
                      TuningCacheWarning, stacklevel=3)
        return None
    return Choice(backend, splits, times[0], times[1], "cache")


def choose(gemm: decode.DecodeGemm, cusparselt: Callable[[int, int, int], None] | None, x16: Any, y16: Any,
           bucket: int, stream_ptr: int, key: dict[str, Any] | None, cache: TuningCache | None = None) -> Choice:
    """Time the decode kernel ``gemm`` (at each of its split-K settings) against the cuSPARSELt launcher
    ``cusparselt`` (``launcher(x_ptr, y_ptr, stream_ptr)`` on 16 rows; None: the decode kernel serves, only its
    splits are timed) for ``bucket``, on ``x16`` (16 rows of the layer's input) and ``y16`` (16 rows of output),
    on the stream ``stream_ptr`` of ``gemm``'s device; leave ``gemm`` on the winning splits, store the choice
    under ``key`` (None: not stored) and return it."""
    cupy = gpu.cupy()

    rows = BUCKETS[bucket][1]
    x_ptr, y_ptr = x16.data.ptr, y16.data.ptr
    props = cupy.cuda.runtime.getDeviceProperties(gemm.device)
    scrub = cupy.empty(2 * int(props.get("l2CacheSize", 64 << 20)) or (128 << 20), np.uint8)
    calls: dict[str, Callable[[int], None]] = {}
    for splits in sorted(set(gemm.split_choices(gemm.out_features, gemm.in_features) + [gemm.splits])):
        gemm.set_splits(splits)
        launch = gemm.launcher(rows)
        calls[f"decode/{gemm.splits}"] = lambda _, launch=launch: launch(x_ptr, y_ptr, stream_ptr)
    if cusparselt is not None:
        calls["cusparselt"] = lambda _: cusparselt(x_ptr, y_ptr, stream_ptr)
    stream = cupy.cuda.ExternalStream(stream_ptr)
    runtime = cupy.cuda.runtime
    # every sample after the L2 is overwritten (a network's weights are not in it), the candidates alternating
    timings = time_gpu_interleaved(
        calls, repeats=_REPEATS, warmup=1, lead=0, streams=dict.fromkeys(calls, stream),
        before=lambda _: runtime.memsetAsync(scrub.data.ptr, 0, scrub.nbytes, stream_ptr))
    times = {name: timing.median_ms * 1e3 for name, timing in timings.items()}
    best = min((t, name) for name, t in times.items() if name.startswith("decode/"))
    decode_us, splits = best[0], int(best[1].split("/")[1])
    cusparselt_us = times.get("cusparselt")
    backend = "decode" if cusparselt_us is None or decode_us < cusparselt_us else "cusparselt"
    gemm.set_splits(splits)
    choice = Choice(backend, splits if backend == "decode" else None, round(decode_us, 3),
                    None if cusparselt_us is None else round(cusparselt_us, 3), "timed")
    if key is not None:
        (cache or TuningCache()).put(key, {"backend": choice.backend, "splits": choice.splits,
                                           "decode_us": choice.decode_us, "cusparselt_us": choice.cusparselt_us})
    return choice


class LayerDecoder:
    """One layer's decode kernel (made on its first small input) and its choice per bucket; the layer
    (:class:`~pycusparselt.SparseLinear`) asks :meth:`launcher` for each new small input signature.

    Parameters
    ----------
    weight, bias : CuPy arrays
        The layer's pruned weight (out_features, in_features) and bias (or None), of its dtype, on ``device``.
    activation, relu_threshold, relu_upper_bound
        The layer's fused activation (None or "relu") and its bounds.
    device : int
    tune : bool
        Whether the layer tunes (its ``autotune``): under the ``auto`` policy a layer that does not uses
        cuSPARSELt.

    :meth:`for_compact` makes one whose kernel reads a weight in the compact form where it is.
    """

    def __init__(self, weight: Any, bias: Any, *, activation: str | None, relu_threshold: float,
                 relu_upper_bound: float, device: int, tune: bool) -> None:
        self._init(tuple(weight.shape), weight.dtype, bias, activation, relu_threshold, relu_upper_bound, device,
                   tune, "packed")
        epilogue = self.epilogue  # not self: a decoder in a reference cycle would wait for the collector
        self._make = lambda: decode.DecodeGemm(weight, bias, device=device, **epilogue)

    @classmethod
    def for_compact(cls, values: Any, indices: Any, bias: Any, *, in_features: int, activation: str | None,
                    relu_threshold: float, relu_upper_bound: float, device: int, tune: bool) -> LayerDecoder:
        """A decoder whose kernel reads the compact form ``values`` / ``indices`` (CUDA tensors or CuPy arrays,
        :meth:`pycusparselt.gemm.decode.DecodeGemm.from_compact`) where they are: it keeps no weight of its own.
        Its choices are stored under the ``"compact"`` layout."""
        self = cls.__new__(cls)
        self._init((int(values.shape[0]), int(in_features)), _arrays.dtype_of(values), bias, activation,
                   relu_threshold, relu_upper_bound, device, tune, "compact")
        epilogue = self.epilogue
        self._make = lambda: decode.DecodeGemm.from_compact(values, indices, bias, **epilogue)
        return self

    def _init(self, shape: tuple, dtype: Any, bias: Any, activation: str | None, relu_threshold: float,
              relu_upper_bound: float, device: int, tune: bool, layout: str) -> None:
        self.shape, self.dtype, self.layout = shape, np.dtype(dtype), layout
        self.bias, self.device, self.tune = bias, device, tune
        self.epilogue = dict(activation=activation)
        if activation == "relu":
            self.epilogue.update(relu_threshold=relu_threshold, relu_upper_bound=relu_upper_bound)
        self.gemm: decode.DecodeGemm | None = None
        #: bucket index -> the Choice that serves it
        self.choices: dict[int, Choice] = {}
        self._launchers: dict[tuple, Any] = {}

    def launcher(self, rows: int, sp: int, cusparselt16: Callable[[], Any]) -> Any:
        """The decode kernel's launcher for inputs of ``rows`` rows (1..16) on stream ``sp`` where it serves
        their bucket, else None. ``cusparselt16()`` gives the layer's prepared cuSPARSELt launcher of 16 rows
        (made and tuned on demand; None where its plan pads the weight), for the timing. The first call chooses
        for every bucket, so one small input before a CUDA graph capture prepares them all; RuntimeError where
        a choice or the packed weight would be made during capture."""
        if not self.choices:
            self._refuse_during_capture(sp)
            for bucket in range(len(BUCKETS)):
                self.choices[bucket] = self._choose(bucket, sp, cusparselt16)
            if all(choice.backend != "decode" for choice in self.choices.values()):
                self.close()  # the packed weight was made for the timing only
        choice = self.choices[bucket_of(rows)]
        if choice.backend != "decode":
            return None
        launch = self._launchers.get((rows, choice.splits))
        if launch is None:
            if self.gemm is None:
                self._refuse_during_capture(sp)
            gemm = self._gemm()
            gemm.set_splits(choice.splits)
            launch = self._launchers[(rows, choice.splits)] = gemm.launcher(rows)
        return launch

    @staticmethod
    def _refuse_during_capture(sp: int) -> None:
        cupy = gpu.cupy()

        if cupy.cuda.runtime.streamIsCapturing(sp):
            raise RuntimeError(
                "x: the first call with 1 to 16 input rows chooses between the decode kernel and cuSPARSELt and "
                "packs the decode kernel's weight, which cannot happen during CUDA graph capture; call the layer "
                "once with such an input before capturing")

    def _gemm(self) -> decode.DecodeGemm:
        if self.gemm is None:
            self.gemm = self._make()
        return self.gemm

    def _choose(self, bucket: int, sp: int, cusparselt16: Callable[[], Any]) -> Choice:
        cupy = gpu.cupy()

        mode = policy()
        memory_first = self.layout == "compact"  # the kernel reads the only copy of the weight
        if mode == "off" or (mode == "auto" and not self.tune and not memory_first):
            return Choice("cusparselt", None, None, None, "setting")
        if mode == "on" or not self.tune:
            return Choice("decode", self._gemm().splits, None, None, "setting")
        n, k = self.shape
        key = cache_key(device_identity(self.device), n, k, self.dtype, self.epilogue["activation"],
                        self.bias is not None, bucket, self.layout)
        cache = TuningCache()
        stored = cache.get(key)
        if stored is not None:
            found = choice_from_entry(stored, -(-k // 256))
            if found is not None:
                return found
        launch16 = None if memory_first else cusparselt16()
        if launch16 is None and not memory_first:  # cuSPARSELt takes this weight only padded: no contest
            return Choice("decode", self._gemm().splits, None, None, "untimed")
        x16 = cupy.random.standard_normal((16, k), dtype=np.float32).astype(self.dtype)
        y16 = cupy.empty((16, n), self.dtype)
        return choose(self._gemm(), launch16, x16, y16, bucket, sp, key, cache)

    def close(self) -> None:
        """Release the decode kernel (its packed weight; launchers made before then raise ClosedError; the next
        launcher makes it again); the choices are kept."""
        if self.gemm is not None:
            self.gemm.close()
        self.gemm = None
        self._launchers.clear()
