"""The numbers a :class:`~pycusparselt.SparseLinear` layer keeps beside its weight, checked as they are stored,
and what its mode and weight must be (:data:`MODES`, :func:`is_sparse_host`).

A layer keeps its activation scales (``input_scale``, ``output_scale``), its weight scales and its ReLU bounds
as float32, the type the GPU receives them in. Each value is checked **after** that conversion, so a value
that only float64 holds (``1e39`` becomes ``inf``, ``1e-46`` becomes ``0``) is refused rather than stored as
something else. The constructor, the scale setters, ``calibrate``, ``save`` and ``load`` all check with these
functions, so what one accepts the others accept.

Every function raises :class:`TypeError` for a value that is not a real number and :class:`ValueError` for
one outside its range, the message naming the argument, the rule and the value given.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from .. import reference
from .._native import gpu
from ..types import BF16, F16, F32, I8

__all__ = ["SCALE_RANGE", "activation_scale", "weight_scales", "relu_upper_bound", "relu_threshold", "MODES",
           "MODE_DTYPE", "OUT_DTYPES", "padded", "is_sparse_host", "is_sparse_device", "device_copy",
           "prune_host"]

_F32 = np.finfo(np.float32)
#: The activation scales accepted: float32's normal positive numbers (a smaller scale's reciprocal, the
#: quantization's multiplier, overflows float32).
SCALE_RANGE = (float(_F32.tiny), float(_F32.max))


def _real(value: Any, name: str) -> float:
    if isinstance(value, (bool, np.bool_)):
        raise TypeError(f"{name}: expected a real number, got {value!r}")
    try:
        return float(value)
    except OverflowError:  # an integer beyond float64, such as 10**400
        raise ValueError(f"{name}: expected a number float32 can hold, got an integer of "
                         f"{int(value).bit_length()} bits") from None
    except (TypeError, ValueError):
        raise TypeError(f"{name}: expected a real number, got {value!r}") from None


def _float32(v: float) -> float:
    with np.errstate(over="ignore", under="ignore"):
        return float(np.float32(v))


def activation_scale(value: Any, name: str = "input_scale") -> float | None:
    """An activation scale as the layer stores it (a float32 value, as a Python float), or None for none.

    Parameters
    ----------
    value : real number or None
    name : str
        The argument's name, for the message ("input_scale" or "output_scale").

    Raises
    ------
    TypeError
        Not a real number.
    ValueError
        Not positive, NaN, or outside float32's normal range :data:`SCALE_RANGE` once converted to float32.
    """
    if value is None:
        return None
    v = _real(value, name)
    v32 = _float32(v)
    low, high = SCALE_RANGE
    if not (math.isfinite(v) and low <= v32 <= high):
        stored = f" (float32: {v32!r})" if math.isfinite(v) and v > 0 else ""
        raise ValueError(f"{name}: expected a positive finite scale that float32 holds as a normal number "
                         f"({low:.4g} to {high:.4g}), got {value!r}{stored}")
    return v32


def weight_scales(value: Any, name: str = "weight_scale") -> np.ndarray:
    """Weight scales (one per tensor or per output channel) as stored: a float32 array, every element positive
    and finite after the conversion.

    Raises
    ------
    TypeError
        Not an array of real numbers.
    ValueError
        Empty, or an element that is not positive and finite as float32 (named by its index).
    """
    try:
        with np.errstate(over="ignore", under="ignore"):
            scales = np.asarray(value, dtype=np.float32)
    except (TypeError, ValueError, OverflowError):
        raise TypeError(f"{name}: expected real numbers, got {value!r}") from None
    if scales.size == 0:
        raise ValueError(f"{name}: expected at least one scale, got an empty array")
    bad = ~(np.isfinite(scales) & (scales > 0))
    if bad.any():
        index = tuple(int(i) for i in np.argwhere(bad)[0])
        raise ValueError(f"{name}: expected finite positive float32 scales; element {index or '()'} is "
                         f"{float(scales[index])!r} as float32 ({int(bad.sum())} such element(s))")
    return scales


def relu_upper_bound(value: Any) -> float:
    """The ReLU's upper bound as stored (float32, as a Python float): any number but NaN; ``inf`` (also any
    number beyond float32's range) is no bound."""
    v = _real(value, "relu_upper_bound")
    if math.isnan(v):
        raise ValueError(f"relu_upper_bound: expected a number (inf for no bound), got {value!r}")
    return _float32(v)


def relu_threshold(value: Any) -> float:
    """The ReLU's threshold (outputs at or below it become 0) as stored: a number finite as float32."""
    v = _real(value, "relu_threshold")
    v32 = _float32(v)
    if not math.isfinite(v32):
        stored = f" (float32: {v32!r})" if math.isfinite(v) else ""
        raise ValueError(f"relu_threshold: expected a number finite as float32 (at most {SCALE_RANGE[1]:.4g} in "
                         f"magnitude), got {value!r}{stored}")
    return v32


# -- modes and the weight's sparsity -----------------------------------------------------------------------

#: The layer's modes: the type its GEMM reads. None (the default) computes in the weight's own dtype.
MODES = ("fp16", "bf16", "int8", "fp8")
#: The float modes' GEMM type.
MODE_DTYPE = {"fp16": F16, "bf16": BF16}
#: The quantized modes' output types (the first is the default).
OUT_DTYPES = {"int8": (F16, BF16, I8), "fp8": (F16, BF16, F32)}


def padded(w: np.ndarray, rows: int, cols: int) -> np.ndarray:
    """``w`` with zero rows and columns appended up to multiples of ``rows`` and ``cols``."""
    pr, pc = -w.shape[0] % rows, -w.shape[1] % cols
    if not (pr or pc):
        return w
    return np.pad(w, ((0, pr), (0, pc)))


def is_sparse_host(w: np.ndarray, pairs: bool) -> bool:
    """Whether a host weight is 2:4 (1:2 for ``pairs``, float32) along its inputs, any size."""
    if pairs:
        p = padded(w, 1, 2).reshape(w.shape[0], -1, 2)
        return bool(((p != 0).sum(axis=-1) <= 1).all())
    return reference.is_2to4(padded(w, 1, 4), axis=-1)


def is_sparse_device(w: Any, pairs: bool) -> bool:
    """:func:`is_sparse_host` for a CuPy weight, checked on its device (one small transfer: the answer), after
    the device's work so far (the weight may have been written on a stream CuPy's does not wait for, such as
    PyTorch's)."""
    cupy = gpu.cupy()

    group = 2 if pairs else 4
    out, inp = w.shape
    bits = np.dtype(f"u{w.dtype.itemsize}")
    magnitude = bits.type((1 << (8 * bits.itemsize - 1)) - 1)  # every bit but the sign
    device = cupy.cuda.Device(w.device.id)
    with device:
        device.synchronize()
        # -0.0 counts as zero and NaN as non-zero, as on the host; integer operations only (CuPy may not
        # compute in bfloat16)
        nonzero = (cupy.ascontiguousarray(w).view(bits) & magnitude) != 0
        if inp % group:
            nonzero = cupy.pad(nonzero, ((0, 0), (0, -inp % group)))
        return bool((nonzero.reshape(out, -1, group).sum(axis=-1) <= group // 2).all())


def device_copy(w: Any) -> Any:
    """A C-contiguous copy of a CuPy weight on its device, finished before returning (the caller may free or
    reuse the source on a stream CuPy's does not wait for)."""
    cupy = gpu.cupy()

    with cupy.cuda.Device(w.device.id):
        out = w.copy(order="C")
        cupy.cuda.get_current_stream().synchronize()
    return out


def prune_host(w: np.ndarray, method: str, pairs: bool) -> np.ndarray:
    """A layer's weight ``w`` (out, in) pruned on the host as every backend prunes it: 2:4 (1:2 for ``pairs``, the
    float32 weights' TF32 sparsity) by magnitude along the inputs, ``method`` "strip" or "tile", any size (zero
    padding is pruned away)."""
    out, inp = w.shape
    if pairs:
        if method != "strip":
            raise ValueError("prune: float32 weights are pruned 1:2 (cuSPARSELt's TF32 sparsity); use 'strip'")
        p = padded(w, 1, 2)
        mag = np.abs(p.astype(np.float64)).reshape(out, -1, 2)
        second = mag[..., 1] > mag[..., 0]  # ties keep the lower index, as the 2:4 rule does
        keep = np.stack([~second, second], axis=-1).reshape(p.shape)
        return np.where(keep, p, np.zeros((), p.dtype))[:, :inp]
    p = padded(w, 4 if method == "tile" else 1, 4)
    return reference.prune_2to4(p, axis=-1, method=method)[:out, :inp]
