"""Quantization for 2:4 sparse inference: INT8 and FP8 values with their scales, and activation calibration.

The seed's last step of the recipe: train dense, prune 2:4 and retrain, *then* quantize. Symmetric linear
quantization maps a real value ``v`` to ``q = round(v / scale)``, saturated to the format's range, and back
to ``q * scale``. The formats:

========  ====================================================  ===========================
format    values                                                ``qmax`` (largest magnitude)
========  ====================================================  ===========================
int8      integers -127 .. 127 (-128 is not used: symmetric)    127
e4m3      ``ml_dtypes.float8_e4m3fn`` (3 mantissa bits)         448
e5m2      ``ml_dtypes.float8_e5m2`` (2 mantissa bits)           57344
========  ====================================================  ===========================

Weights get one scale per output channel (row) or one per tensor, ``max|w| / qmax``; zeros stay exactly
zero, so a 2:4 weight stays 2:4. Activations get one scale per tensor, chosen from calibration batches by
their maximum, a percentile of their magnitudes, or the clipping value that minimises the quantization's
mean squared error (:class:`Calibrator`).

Every function takes NumPy arrays (computed on the CPU) or CuPy arrays (computed on their GPU) and gives
bit-identical results on both: the arithmetic is one float32 multiply by ``1 / scale`` (itself a float32
division), then round-half-to-even and saturation. On the GPU, FP8 values are returned as their bytes
(``uint8``): CuPy cannot hold float8 arrays (view them with ``.view(ml_dtypes.float8_e4m3fn)`` or pass
``input_dtype=`` to :class:`~pycusparselt.gemm.plan.SparseMatmulPlan`); on the CPU they are ml_dtypes arrays.
Non-finite inputs to :func:`quantize` give unspecified values; the calibration and weight functions refuse
them.
"""

from __future__ import annotations

import functools
import math
from typing import Any, Iterable, Sequence

import numpy as np

from .._native import gpu
from .. import _arrays, types
from . import layer_values

__all__ = [
    "FORMATS",
    "as_float32",
    "round_from_float32",
    "quantize_on_device",
    "quantize_on_host",
    "qmax",
    "quantize",
    "dequantize",
    "weight_scales",
    "quantize_weight",
    "quantize_into",
    "Calibrator",
    "calibrate",
    "GELU_C",
    "GELU_K",
    "gelu32",
    "relu32",
    "epilogue_values",
    "float_forward",
    "gemm_operand",
    "check_batch",
    "calibrate_layer",
    "calibrate_chain",
]

_I8, _E4M3, _E5M2, _BF16, _F32 = types.I8, types.E4M3, types.E5M2, types.BF16, types.F32

#: Quantized formats by name: their NumPy dtype and largest magnitude.
FORMATS: dict[str, tuple[np.dtype, float]] = {
    "int8": (_I8, 127.0),
    "e4m3": (_E4M3, 448.0),
    "e5m2": (_E5M2, 57344.0),
}
_BY_DTYPE = {dt: name for name, (dt, _) in FORMATS.items()}
# float8 bit layout for the GPU conversion: mantissa bits, exponent of the smallest normal, exponent bias
_FP8_BITS = {"e4m3": (3, -6, 7), "e5m2": (2, -14, 15)}

_METHODS = ("max", "percentile", "mse")


def _format(dtype: Any, what: str = "dtype") -> str:
    """A format name from "int8" / "e4m3" / "e5m2" or the matching NumPy dtype."""
    if isinstance(dtype, str) and dtype.lower() in FORMATS:
        return dtype.lower()
    try:
        return _BY_DTYPE[np.dtype(dtype)]
    except (KeyError, TypeError):
        raise ValueError(
            f"{what}: expected one of {', '.join(FORMATS)} (or np.int8, ml_dtypes.float8_e4m3fn, "
            f"ml_dtypes.float8_e5m2), got {dtype!r}"
        ) from None


def qmax(dtype: Any) -> float:
    """The largest magnitude of a quantized format: 127 (int8), 448 (e4m3) or 57344 (e5m2)."""
    return FORMATS[_format(dtype)][1]


# -- arrays of either family ----------------------------------------------------------------------


def _namespace(a: Any, what: str) -> tuple[Any, Any]:
    """(array, numpy or cupy) as :func:`pycusparselt._arrays.namespace` sees ``a``, checked to be real."""
    arr, xp = _arrays.namespace(a)
    if xp is not np:
        return arr, xp
    if arr.dtype.kind not in "fiu" and arr.dtype not in (_BF16, _E4M3, _E5M2):
        raise TypeError(f"{what}: expected a real array, got dtype {arr.dtype}")
    return arr, np


def as_float32(x: Any, xp: Any) -> Any:
    """``x`` as float32 (exact for float16, bfloat16 and the 8-bit formats); ``xp`` is NumPy or CuPy, the
    array's module (CuPy has no bfloat16 arithmetic: its bits are widened)."""
    if x.dtype == _F32:
        return x
    if xp is not np and x.dtype == _BF16:
        # bfloat16 is the top half of a float32: widen the bits (CuPy has no bfloat16 arithmetic)
        return (x.view(xp.uint16).astype(xp.uint32) << 16).view(xp.float32)
    return x.astype(np.float32)


def round_from_float32(y32: Any, dtype: Any, xp: Any) -> Any:
    """float32 -> float16, bfloat16 or float32, rounding to nearest even (identical on both families)."""
    dtype = np.dtype(dtype)
    if dtype == _F32:
        return y32
    if dtype == _BF16 and xp is not np:
        return _device_kernels()["bf16"](y32).view(_BF16)
    return y32.astype(dtype)


def _inverse(scale: Any, xp: Any, what: str = "scale") -> Any:
    """float32 ``1 / scale``; host scales are checked to be positive and finite."""
    if xp is not np and isinstance(scale, xp.ndarray):
        return xp.float32(1.0) / scale.astype(xp.float32)
    s = np.asarray(scale, dtype=np.float32)
    if s.size == 0 or not np.all(np.isfinite(s)) or not np.all(s > 0):
        raise ValueError(f"{what}: expected positive finite scale(s), got {scale!r}")
    inv = np.float32(1.0) / s
    if xp is np or s.ndim == 0:
        return inv
    return xp.asarray(inv)


# -- GPU kernels ----------------------------------------------------------------------------------

_FP8_PREAMBLE = """
__device__ __forceinline__ unsigned char pycusparselt_to_fp8(float v, int mant, int emin, int bias,
                                                              float fmax) {
    if (isnan(v)) return 0x7F;
    unsigned char sign = signbit(v) ? 0x80 : 0;
    float a = fminf(fabsf(v), fmax);           // saturate: the formats' largest finite value
    if (a == 0.0f) return sign;
    int e;
    frexpf(a, &e);                             // a = m * 2^e, m in [0.5, 1)
    int q = max(e - 1, emin) - mant;           // exponent of one unit in the last place
    int r = (int)rintf(ldexpf(a, -q));         // the rounded significand (ties to even); exact scaling
    if (r == 0) return sign;
    if (q == emin - mant && r < (1 << mant)) return sign | r;   // subnormal
    int biased = q + mant + bias;
    if (r == (1 << (mant + 1))) { r >>= 1; biased += 1; }       // rounding carried into the exponent
    return sign | (biased << mant) | (r - (1 << mant));
}
"""


@functools.lru_cache(maxsize=None)
def _device_kernels() -> dict[str, Any]:
    cupy = gpu.cupy()

    kernels = {
        "int8": cupy.ElementwiseKernel(
            "T x, float32 inv",
            "int8 q",
            "float v = rintf((float)x * inv); q = isnan(v) ? 0 : (signed char)fminf(fmaxf(v, -127.0f), 127.0f);",
            "pycusparselt_quantize_int8",
        ),
        # float32 -> bfloat16 bits, round to nearest even (NaN stays a quiet NaN)
        "bf16": cupy.ElementwiseKernel(
            "float32 y",
            "uint16 b",
            "unsigned int u = __float_as_uint(y);"
            "b = isnan(y) ? (unsigned short)((u >> 16) | 0x40)"
            " : (unsigned short)((u + 0x7FFFu + ((u >> 16) & 1u)) >> 16);",
            "pycusparselt_float32_to_bf16",
        ),
    }
    # bfloat16 read as its bits (the top half of a float32): one kernel, no widened copy
    kernels["int8_bf16"] = cupy.ElementwiseKernel(
        "uint16 xb, float32 inv",
        "int8 q",
        "float v = rintf(__uint_as_float(((unsigned int)xb) << 16) * inv);"
        "q = isnan(v) ? 0 : (signed char)fminf(fmaxf(v, -127.0f), 127.0f);",
        "pycusparselt_quantize_int8_bf16",
    )
    for name, (mant, emin, bias) in _FP8_BITS.items():
        fmax = FORMATS[name][1]
        for suffix, params, value in (("", "T x", "(float)x"),
                                      ("_bf16", "uint16 xb", "__uint_as_float(((unsigned int)xb) << 16)")):
            kernels[name + suffix] = cupy.ElementwiseKernel(
                f"{params}, float32 inv",
                "uint8 q",
                f"q = pycusparselt_to_fp8({value} * inv, {mant}, {emin}, {bias}, {fmax:.1f}f);",
                f"pycusparselt_quantize_{name}{suffix}",
                preamble=_FP8_PREAMBLE,
            )
    return kernels


def quantize_into(x: Any, inverse_scale: Any, fmt: str, out: Any) -> Any:
    """Quantize the CuPy array ``x`` (float16, bfloat16 or float32) into ``out`` (int8, or uint8 bytes for
    FP8) with one kernel and no allocation: ``out = saturate(round(x * inverse_scale))``, bit-identical to
    :func:`quantize` with ``scale = 1 / inverse_scale``. On CuPy's current stream."""
    kernels = _device_kernels()
    if x.dtype == _BF16:
        return kernels[fmt + "_bf16"](x.view(np.uint16), inverse_scale, out)
    return kernels[fmt](x, inverse_scale, out)


def quantize_on_device(x: Any, inv: Any, fmt: str) -> Any:
    """Quantize a CuPy array with a float32 inverse scale (scalar or broadcastable array) in one kernel;
    ``fmt`` a key of :data:`FORMATS`. No checks: :func:`quantize` is the checked entry."""
    cupy = gpu.cupy()

    if x.dtype == _BF16:
        x = as_float32(x, cupy)
    return _device_kernels()[fmt](x, inv)


def quantize_on_host(x: np.ndarray, inv: Any, fmt: str) -> np.ndarray:
    """:func:`quantize_on_device`'s results for a NumPy array, bit for bit."""
    v = as_float32(x, np) * inv  # one float32 multiply, as on the GPU
    dt, limit = FORMATS[fmt]
    with np.errstate(invalid="ignore"):
        if fmt == "int8":  # int8 has no NaN: it becomes 0 (see quantize)
            return np.clip(np.nan_to_num(np.rint(v), nan=0.0), -limit, limit).astype(np.int8)
        return np.clip(v, -limit, limit).astype(dt)  # ml_dtypes rounds float32 to nearest even


# -- quantize / dequantize ------------------------------------------------------------------------


def quantize(x: Any, scale: Any, dtype: Any = "int8") -> Any:
    """Symmetric quantization ``q = saturate(round(x * (1 / scale)))``.

    Parameters
    ----------
    x : array
        float16, bfloat16 or float32 values: NumPy (CPU) or CuPy (GPU).
    scale : float or array
        Positive scale(s), broadcastable against ``x`` (a per-row vector as ``scale[:, None]``).
    dtype : {"int8", "e4m3", "e5m2"}
        The format; NumPy dtypes (``np.int8``, ``ml_dtypes.float8_e4m3fn``, ...) are accepted too.

    Returns
    -------
    array
        int8 values in -127 .. 127; or FP8 values, saturated to the format's largest finite magnitude
        (ml_dtypes arrays on the CPU, their bytes as uint8 on the GPU). Rounding is to nearest, ties to
        even.

    Notes
    -----
    NaN and infinity, the same on the CPU and the GPU: ±inf saturates to ±127 (int8) or to the FP8 format's
    largest finite magnitude (E4M3 has no infinity; E5M2's is not used, as for every out-of-range value); NaN
    stays NaN in FP8 and becomes 0 in int8, which has no NaN. A NaN activation is therefore lost in an INT8
    layer: check inputs with ``isnan`` first where they can hold one.

    Raises
    ------
    ValueError
        An unknown format, or a host scale that is not positive and finite.
    """
    fmt = _format(dtype)
    x, xp = _namespace(x, "x")
    if x.dtype.kind not in "f" and x.dtype != _BF16:
        raise TypeError(f"x: expected float16, bfloat16 or float32 values, got {x.dtype}")
    inv = _inverse(scale, xp)
    if xp is np:
        return quantize_on_host(x, inv, fmt)
    return quantize_on_device(x, inv, fmt)


def dequantize(q: Any, scale: Any, *, dtype: Any = None) -> Any:
    """``q * scale`` in float32 (the real values quantized ``q`` stands for).

    Parameters
    ----------
    q : array
        int8 values, FP8 values (ml_dtypes arrays), or FP8 bytes as uint8 with ``dtype`` naming the format.
    scale : float or array
        Broadcastable against ``q``.
    dtype : {None, "e4m3", "e5m2"}
        The FP8 format of uint8 bytes (CuPy cannot hold float8 arrays); None for int8 and float8 arrays.
    """
    q, xp = _namespace(q, "q")
    if q.dtype == np.uint8:
        if dtype is None:
            raise ValueError("dtype: uint8 values are FP8 bytes; name their format, dtype='e4m3' or 'e5m2'")
        fmt = _format(dtype)
        if fmt == "int8":
            raise ValueError("dtype: uint8 bytes hold FP8 values; int8 values are passed as int8")
        table = np.arange(256, dtype=np.uint8).view(FORMATS[fmt][0]).astype(np.float32)
        values = xp.asarray(table)[q]
    else:
        values = as_float32(q, xp)
    if xp is np or not isinstance(scale, xp.ndarray):
        scale = xp.asarray(np.asarray(scale, dtype=np.float32))
    return values * scale.astype(xp.float32)


# -- weights --------------------------------------------------------------------------------------


def weight_scales(
    w: Any, dtype: Any = "int8", *, granularity: str = "channel", allow_zero_channels: bool = False
) -> Any:
    """Scales for a weight of shape (out_features, in_features): ``max|w| / qmax`` per row or per tensor.

    Parameters
    ----------
    w : array, shape (out_features, in_features)
        The (pruned) weight, NumPy or CuPy, float16, bfloat16 or float32.
    dtype : {"int8", "e4m3", "e5m2"}
    granularity : {"channel", "tensor"}
        One scale per output channel (row), or one for the whole weight.
    allow_zero_channels : bool
        An all-zero row has no scale of its own. By default that raises ValueError naming the rows; with
        True such rows get scale 1 (they quantize to zeros, exactly, whatever the scale).

    Returns
    -------
    array of float32
        Shape (out_features,) for "channel", () for "tensor"; in ``w``'s array family.

    Raises
    ------
    ValueError
        A weight that is not 2-D, NaN or infinite values, an all-zero weight or channel (see above), an
        unknown granularity or format.
    """
    fmt = _format(dtype)
    if granularity not in ("channel", "tensor"):
        raise ValueError(f"granularity: expected 'channel' or 'tensor', got {granularity!r}")
    w, xp = _namespace(w, "w")
    if w.ndim != 2:
        raise ValueError(f"w: expected (out_features, in_features), got shape {tuple(w.shape)}")
    w32 = as_float32(w, xp)
    if not bool(xp.isfinite(w32).all()):
        raise ValueError("w: the weight has NaN or infinite values; they cannot be quantized")
    limit = np.float32(FORMATS[fmt][1])
    amax = xp.abs(w32).max(axis=1) if granularity == "channel" else xp.abs(w32).max()
    zero = amax == 0
    if bool(zero.any()):
        if granularity == "tensor":
            raise ValueError("w: every weight is zero; there is nothing to scale")
        if not allow_zero_channels:
            rows = np.flatnonzero(_host(zero, xp))
            shown = ", ".join(map(str, rows[:10])) + (" ..." if len(rows) > 10 else "")
            raise ValueError(
                f"w: {len(rows)} output channel(s) are all zero (rows {shown}); pass allow_zero_channels=True "
                f"to give them scale 1 (they stay exactly zero)"
            )
        amax = xp.where(zero, limit, amax)
    return (amax / limit).astype(xp.float32)


def quantize_weight(
    w: Any, dtype: Any = "int8", *, granularity: str = "channel", allow_zero_channels: bool = False
) -> tuple[Any, Any]:
    """Quantize a weight with :func:`weight_scales`: returns ``(values, scales)``.

    Zeros stay exactly zero, so a 2:4 weight stays 2:4 (a kept value may also round to zero, which keeps
    it 2:4). ``values`` are int8 (or FP8: ml_dtypes on the CPU, bytes on the GPU) of ``w``'s shape;
    ``dequantize(values, scales[:, None])`` approximates ``w`` to half a step of each row's scale.
    """
    fmt = _format(dtype)
    scales = weight_scales(w, fmt, granularity=granularity, allow_zero_channels=allow_zero_channels)
    w, xp = _namespace(w, "w")
    inv = xp.float32(1.0) / (scales[:, None] if scales.ndim else scales)
    values = quantize_on_host(w, inv, fmt) if xp is np else quantize_on_device(w, inv, fmt)
    return values, scales


def _host(a: Any, xp: Any) -> np.ndarray:
    return a if xp is np else xp.asnumpy(a)


# -- calibration ----------------------------------------------------------------------------------


class Calibrator:
    """Statistics of activation batches, and a per-tensor scale chosen from them.

    :meth:`observe` keeps the maximum magnitude and a histogram of the magnitudes (``bins`` equal bins
    over ``[0, R)``, ``R`` a power of two above the maximum seen; when a batch exceeds it, ``R`` doubles
    and pairs of bins merge, so nothing is stored per value and every batch is seen once). On the GPU the
    histogram is made there and only the counts come back; NumPy and CuPy give the same counts.

    Parameters
    ----------
    dtype : {"int8", "e4m3", "e5m2"}
        The format the scale is for.
    method : {"max", "percentile", "mse"}
        The default of :meth:`scale`: the maximum magnitude; the ``percentile`` of the magnitudes (the
        upper edge of its histogram bin, at most the maximum); or the clipping value, among 128 equally
        spaced up to the maximum, that minimises the histogram's quantization mean squared error
        (clipping error above it, rounding error below; exact zeros cost nothing).
    percentile : float
        In (0, 100], for "percentile".
    bins : int
        Histogram size, even and at least 16.
    """

    def __init__(self, dtype: Any = "int8", *, method: str = "max", percentile: float = 99.99,
                 bins: int = 2048) -> None:
        self.format = _format(dtype)
        self.method = self._check_method(method)
        self.percentile = self._check_percentile(percentile)
        if not isinstance(bins, (int, np.integer)) or bins < 16 or bins % 2:
            raise ValueError(f"bins: expected an even integer >= 16, got {bins!r}")
        self.bins = int(bins)
        self.count = 0  #: values observed
        self.zeros = 0  #: of which exactly zero
        self.batches = 0  #: batches observed
        self.amax = 0.0  #: largest magnitude observed
        self._range: float | None = None  # R, a power of two > amax, once a non-zero value was seen
        self._hist = np.zeros(self.bins, dtype=np.int64)

    @staticmethod
    def _check_method(method: str) -> str:
        if method not in _METHODS:
            raise ValueError(f"method: expected one of {', '.join(_METHODS)}, got {method!r}")
        return method

    @staticmethod
    def _check_percentile(percentile: float) -> float:
        p = float(percentile)
        if not 0 < p <= 100:
            raise ValueError(f"percentile: expected a value in (0, 100], got {percentile!r}")
        return p

    def observe(self, x: Any) -> None:
        """Add one batch (any shape; NumPy or CuPy; float16, bfloat16 or float32)."""
        x, xp = _namespace(x, "x")
        index = self.batches
        self.batches += 1
        if x.size == 0:
            return
        a = xp.abs(as_float32(x, xp)).ravel()
        if not bool(xp.isfinite(a).all()):
            bad = int((~xp.isfinite(a)).sum())
            raise ValueError(f"batch {index}: {bad} NaN or infinite value(s); calibration needs finite activations")
        amax = float(a.max())
        zeros = int(a.size - int(xp.count_nonzero(a)))
        self.count += int(a.size)
        self.zeros += zeros
        self.amax = max(self.amax, amax)
        if amax == 0:
            return
        if self._range is None:
            self._range = math.ldexp(1.0, math.frexp(amax)[1])  # the power of two above amax
        while amax >= self._range:
            merged = self._hist.reshape(-1, 2).sum(axis=1)
            self._hist = np.concatenate([merged, np.zeros(self.bins - merged.size, np.int64)])
            self._range *= 2
        # a / R is exact (R is a power of two), so this is a * (bins / R) rounded once, without bins / R
        # overflowing float32 for tiny activations (R below 2**-117)
        unit = xp.ldexp(a, np.int32(-math.frexp(self._range)[1] + 1))
        idx = xp.minimum(xp.floor(unit * np.float32(self.bins)), self.bins - 1).astype(xp.int32)
        counts = _host(xp.bincount(idx, minlength=self.bins), xp).astype(np.int64)
        counts[0] -= zeros  # exact zeros are counted apart
        self._hist += counts

    def histogram(self) -> tuple[np.ndarray, float]:
        """``(counts, R)``: counts of the non-zero magnitudes in ``bins`` equal bins over ``[0, R)``."""
        return self._hist.copy(), (self._range or 0.0)

    def clip_value(self, method: str | None = None, *, percentile: float | None = None) -> float:
        """The magnitude that maps to ``qmax`` (``scale * qmax``) by ``method`` (default: the calibrator's)."""
        method = self._check_method(method or self.method)
        if self.count == 0:
            raise ValueError("no calibration data: the batches were empty (observe() saw no values)")
        if self.amax == 0:
            raise ValueError(f"all {self.count} calibration values are zero: no scale can be chosen from them")
        if method == "max":
            return self.amax
        width = self._range / self.bins
        if method == "percentile":
            p = self._check_percentile(self.percentile if percentile is None else percentile)
            cumulative = self.zeros + np.cumsum(self._hist)
            i = int(np.searchsorted(cumulative, p / 100.0 * self.count, side="left"))
            return min((min(i, self.bins - 1) + 1) * width, self.amax)
        return self._mse_clip(width)

    def _mse_clip(self, width: float) -> float:
        limit = FORMATS[self.format][1]
        nonzero = np.flatnonzero(self._hist)
        centers = (nonzero + 0.5) * width
        counts = self._hist[nonzero].astype(np.float64)
        clips = self.amax * np.arange(1, 129) / 128.0
        step = clips[:, None] / limit  # value of one quantization unit per candidate
        v = np.minimum(centers[None, :], clips[:, None]) / step
        if self.format == "int8":
            q = np.rint(v)
        else:
            q = v.astype(np.float32).astype(FORMATS[self.format][0]).astype(np.float64)
        error = ((centers[None, :] - q * step) ** 2 * counts[None, :]).sum(axis=1)
        best = np.flatnonzero(error <= error.min() * (1 + 1e-12))
        return float(clips[best[-1]])  # ties: the largest clipping value

    def scale(self, method: str | None = None, *, percentile: float | None = None) -> float:
        """The per-tensor scale, ``clip_value / qmax``, as a float32 value (a Python float).

        Raises
        ------
        ValueError
            No values observed, every value zero, or values so small that the scale is not a normal float32
            number (see :func:`pycusparselt.nn.layer_values.activation_scale`).
        """
        clip = self.clip_value(method, percentile=percentile)
        with np.errstate(under="ignore"):
            scale = float(np.float32(clip) / np.float32(FORMATS[self.format][1]))
        try:
            return layer_values.activation_scale(scale, "scale")
        except ValueError:
            raise ValueError(f"calibration: the activations' clipping magnitude {clip:.4g} gives the scale {scale!r},"
                             f" below float32's smallest normal number {layer_values.SCALE_RANGE[0]:.4g}; scale the "
                             f"activations up (they are too small for {self.format})") from None

    def __repr__(self) -> str:
        return (f"Calibrator({self.format!r}, method={self.method!r}, batches={self.batches}, count={self.count}, "
                f"amax={self.amax:g})")


def calibrate(
    batches: Iterable[Any], dtype: Any = "int8", *, method: str = "max", percentile: float = 99.99,
    bins: int = 2048,
) -> float:
    """The per-tensor activation scale for ``batches`` (an iterable of arrays, consumed once).

    See :class:`Calibrator` for the methods. Raises ValueError for no data, all-zero data, or a batch
    with NaN or infinite values (naming the batch).
    """
    calibrator = Calibrator(dtype, method=method, percentile=percentile, bins=bins)
    try:
        iterator = iter(batches)
    except TypeError:
        raise TypeError(f"batches: expected an iterable of arrays, got {type(batches).__name__}") from None
    for batch in iterator:
        calibrator.observe(batch)
    if calibrator.batches == 0:
        raise ValueError("batches: no calibration data (the iterable was empty)")
    return calibrator.scale()


# -- the activations in float32 (the layers' float epilogue, and the real-valued layer calibration observes) --

GELU_C = np.float32(math.sqrt(2.0 / math.pi))
GELU_K = np.float32(0.044715)


def gelu32(z: Any, xp: Any) -> Any:
    """tanh-approximated GELU in float32 (the form of cuBLASLt's epilogue and of the reference).

    ``0.5 * z * (1 + tanh(u))`` is evaluated as ``z / (1 + exp(-2u))``, the same function without the
    cancellation of ``1 + tanh(u)`` for negative z (there, two correct tanh implementations can disagree by
    many units of the small result)."""
    u = GELU_C * (z + GELU_K * z * z * z)
    with np.errstate(over="ignore"):  # exp overflows to inf for z below about -10: the result is -0
        return z / (np.float32(1.0) + xp.exp(np.float32(-2.0) * u))


def relu32(z: Any, threshold: float, upper: float, xp: Any) -> Any:
    """ReLU with a threshold and an upper bound, in float32: 0 where ``z <= threshold``, at most ``upper``."""
    y = xp.where(z <= np.float32(threshold), np.float32(0.0), z)
    return y if upper == math.inf else xp.minimum(y, np.float32(upper))


# -- a SparseLinear layer's GEMM epilogue --------------------------------------------------------------------


def _no_input_scale(mode: str | None) -> ValueError:
    return ValueError(f"input_scale: this {mode} layer has no input scale yet; call calibrate(batches) or set "
                      f"input_scale")


def gemm_operand(x: Any, xp: Any, *, mode: str | None, dtype: np.dtype, fmt: str | None,
                 input_scale: float | None) -> Any:
    """A :class:`~pycusparselt.SparseLinear` layer's GEMM input: ``x`` as given for a float layer (of its
    ``dtype``), or as given when already quantized (int8; FP8, or its uint8 bytes), else float values quantized
    here with ``input_scale`` (``xp``: NumPy or CuPy, where ``x`` lives). TypeError for any other dtype,
    ValueError for a quantized layer without an input scale."""
    dt = np.dtype(x.dtype)
    if fmt is None:
        if dt != dtype:
            raise TypeError(f"x: expected {np.dtype(dtype).name} (the layer's type), got {dt}")
        return x
    fp8 = FORMATS[fmt][0]
    if (mode == "int8" and dt == _I8) or (mode == "fp8" and dt in (fp8, types.U8)):
        return x.view(fp8) if dt == types.U8 and xp is np else x  # already quantized, with this input scale
    if dt not in (types.F16, _BF16, _F32):
        raise TypeError(f"x: expected float16, bfloat16 or float32 values (or {fmt} values already quantized), "
                        f"got {dt}")
    if input_scale is None:
        raise _no_input_scale(mode)
    inv = np.float32(1.0) / np.float32(input_scale)
    return quantize_on_host(x, inv, fmt) if xp is np else quantize_on_device(x, inv, fmt)


def epilogue_values(mode: str | None, weight_scale: Any, input_scale: float | None, output_scale: float | None,
                    bias: np.ndarray | None, relu: dict[str, float], *, quantized: bool, gemm_out: np.dtype,
                    out_dtype: np.dtype, channel_fp8: bool, fused_bias: bool) -> tuple[Any, Any, dict[str, float]]:
    """A :class:`~pycusparselt.SparseLinear` layer's GEMM epilogue, computed on the host so that every backend
    uses the same float32 values: ``(alpha, bias, relu)`` for the product.

    Parameters
    ----------
    mode : {None, "fp16", "bf16", "int8", "fp8"}
    weight_scale : ndarray or None
        The float32 weight scales of a quantized layer.
    input_scale, output_scale : float or None
        The layer's activation scales (a quantized layer needs ``input_scale``, an int8 output ``output_scale``).
    bias : ndarray or None
        The layer's bias on the host (float32 for the quantized modes).
    relu : dict
        ``relu_upper_bound`` and ``relu_threshold`` of a fused ReLU, in the output's real units, or empty.
    quantized, gemm_out, out_dtype, channel_fp8, fused_bias
        Whether the layer is INT8 or FP8; the product's output dtype and the layer's; whether FP8 weight
        scales are applied per channel after the product; whether the bias is fused into the product.

    Returns
    -------
    alpha : float or ndarray
        The product's alpha: 1.0, the folded scales, or (INT8) a float32 vector, one per output feature.
    bias : ndarray or None
        The fused bias in the product's units and type, or None where the bias is not fused.
    relu : dict
        The ReLU bounds in the accumulator's units (scaled by the int8 output's scale).

    Raises
    ------
    ValueError
        A quantized layer without its input scale, or an int8 output without its scale.
    """
    alpha: Any = 1.0
    if quantized:
        if input_scale is None:
            raise _no_input_scale(mode)
        if out_dtype == _I8 and output_scale is None:
            raise ValueError("output_scale: an int8 output needs a scale; call calibrate(batches) or set output_scale")
        out_scale = 1.0
        if gemm_out == _I8:
            out_scale = output_scale
            relu = {k: v / out_scale for k, v in relu.items()}
        if channel_fp8:
            alpha = float(np.float32(input_scale))
        else:
            ws = weight_scale.astype(np.float64)
            alpha64 = ws * input_scale / out_scale
            alpha = alpha64.astype(np.float32) if mode == "int8" else float(np.float32(alpha64))
            if bias is not None:
                bias = (bias.astype(np.float64) / out_scale).astype(np.float32) if gemm_out == _I8 else bias
        if bias is not None and fused_bias:
            bias = bias.astype(np.float32).astype(gemm_out) if gemm_out != _I8 else bias
    return alpha, bias if fused_bias else None, relu


# -- calibrating SparseLinear layers --------------------------------------------------------------------------
# The functions take layers (pycusparselt.nn.linear.SparseLinear) and read their public attributes only; the
# layer's calibrate method and pycusparselt.nn.linear.calibrate_chain are these.


def float_forward(layer: Any, x: Any) -> Any:
    """``activation(x @ W.T + b)`` in float32 with the layer's pruned float weight: the real-valued layer that
    the quantized one approximates (what calibration observes).

    Parameters
    ----------
    layer : SparseLinear
    x : array
        Float inputs of shape (..., in_features), on the layer's backend.
    """
    xp = gpu.cupy() if layer.on_device else np
    if layer.on_device:
        x = _arrays.as_cupy(x)
    dt = np.dtype(x.dtype)
    if dt not in (types.F16, types.BF16, types.F32):
        raise TypeError(f"batches: calibration takes float activations, got {dt}")
    x32 = as_float32(x, xp)
    if layer.permutation is not None:
        x32 = x32[..., xp.asarray(layer.permutation)]
    y = x32 @ as_float32(layer.weight, xp).T
    if layer.bias is not None:
        y = y + as_float32(layer.bias, xp)
    if layer.activation == "relu":
        y = relu32(y, layer.relu_threshold, layer.relu_upper_bound, xp)
    elif layer.activation == "gelu":
        y = gelu32(y, xp)
    return y


def check_batch(layer: Any, x: Any) -> None:
    """TypeError unless calibration batch ``x`` lives where the layer does; ValueError unless it has the layer's
    input features."""
    if layer.on_device != _arrays.is_device(x):
        raise TypeError("batches: calibration data must live where the layer does (NumPy or device arrays)")
    if tuple(x.shape)[-1:] != (layer.in_features,):
        raise ValueError(f"batches: expected (..., {layer.in_features}) features, got shape {tuple(x.shape)}")


def calibrate_layer(layer: Any, batches: Iterable[Any], *, method: str = "max", percentile: float = 99.99,
                    bins: int = 2048) -> None:
    """Set a quantized layer's ``input_scale`` (and ``output_scale`` for an int8 output) from example inputs
    (:meth:`pycusparselt.nn.linear.SparseLinear.calibrate`).

    Parameters
    ----------
    layer : SparseLinear
        An int8 or fp8 layer.
    batches : iterable of arrays
        Float inputs of shape (batch, in_features), on the layer's backend; consumed once.
    method, percentile, bins
        As :class:`Calibrator`. The output scale is chosen from :func:`float_forward`'s outputs the same way.
    """
    if not layer.quantized:
        raise ValueError(f"calibrate: only int8 and fp8 layers have scales; this layer's mode is {layer.mode!r}")
    opts = dict(method=method, percentile=percentile, bins=bins)
    cal_in = Calibrator(layer.format, **opts)
    cal_out = Calibrator("int8", **opts) if layer.out_dtype == _I8 else None
    for x in batches:
        check_batch(layer, x)
        cal_in.observe(x)
        if cal_out is not None:
            cal_out.observe(float_forward(layer, x))
    if cal_in.batches == 0:
        raise ValueError("batches: no calibration data (the iterable was empty)")
    layer.input_scale = cal_in.scale()
    if cal_out is not None:
        layer.output_scale = cal_out.scale()


def calibrate_chain(
    layers: Sequence[Any], batches: Iterable[Any], *, method: str = "max", percentile: float = 99.99,
    bins: int = 2048,
) -> None:
    """Calibrate SparseLinear layers that run one after the other (``layers[i + 1]`` takes ``layers[i]``'s
    output); exported as :func:`pycusparselt.nn.linear.calibrate_chain`.

    Each batch runs once through the float32 layers (pruned float weights); every quantized layer's input
    scale comes from what it receives, and an int8 output's scale is the next layer's input scale (so the
    int8 output feeds the next INT8 layer as it is), or from the last layer's own outputs.
    """
    layers = list(layers)
    if not layers:
        raise ValueError("layers: expected at least one SparseLinear")
    for i, (a, b) in enumerate(zip(layers[:-1], layers[1:], strict=True)):
        if a.out_features != b.in_features:
            raise ValueError(f"layers: layer {i} has {a.out_features} outputs but layer {i + 1} takes "
                             f"{b.in_features} inputs")
    opts = dict(method=method, percentile=percentile, bins=bins)
    cal_in = [Calibrator(layer.format, **opts) if layer.quantized else None for layer in layers]
    cal_out = [Calibrator("int8", **opts) if layer.out_dtype == _I8 else None for layer in layers]
    seen = 0
    for x in batches:
        seen += 1
        check_batch(layers[0], x)
        h = x
        for layer, ci, co in zip(layers, cal_in, cal_out, strict=True):
            if ci is not None:
                ci.observe(h)
            h = float_forward(layer, h)
            if co is not None:
                co.observe(h)
    if seen == 0:
        raise ValueError("batches: no calibration data (the iterable was empty)")
    for layer, ci, co in zip(layers, cal_in, cal_out, strict=True):
        if ci is not None:
            layer.input_scale = ci.scale()
        if co is not None:
            layer.output_scale = co.scale()
    for a, b in zip(layers[:-1], layers[1:], strict=True):
        if a.out_dtype == _I8 and b.mode == "int8":
            b.input_scale = a.output_scale  # the same statistics; made identical so the int8 output chains
