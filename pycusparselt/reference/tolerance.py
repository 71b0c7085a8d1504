"""Tolerances for comparing GPU results with the reference: per element, the interval a correct result lies
in, from the data types, ``K`` and ``|A| @ |B|`` (:class:`Tolerance`, :func:`matmul_bounds`,
:func:`assert_close`)."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Mapping

import numpy as np

from ..types import BF16, COMPUTE_TYPES, E4M3, E5M2, F16, F32, FLOAT_FORMATS, I8, VALID_COMBINATIONS
from .elements import bit_patterns, format_value, to_float64
from .semantics import (
    GELU_C,
    Product,
    apply_gelu,
    apply_relu,
    combinations_text,
    compute_product,
    convert_output,
    matmul,
)

__all__ = ["Tolerance", "matmul_tolerance", "matmul_bounds", "assert_close"]

# unit round-off (half an ulp at 1) of each floating type: 2**-(mantissa bits + 1)
_UNIT_ROUNDOFF = {dt: 2.0 ** -(f.mant + 1) for dt, f in FLOAT_FORMATS.items()}

# accumulator significand bits (p, including the implicit bit) per (input type, compute)
_ACC_BITS = {
    (F16, "32F"): 24, (BF16, "32F"): 24, (F32, "32F"): 24, (F32, "TF32"): 24,
    (F16, "16F"): 11,
    # FP8 Tensor Core accumulation on Hopper keeps about 14 bits (DeepSeek-V3 report): assumed
    (E4M3, "32F"): 14, (E5M2, "32F"): 14,
}
# smallest exponent at which accumulation is certainly exact (normal range: flush-to-zero safe)
_ACC_MIN_EXP = {24: -126, 14: -126, 11: -14}
_ACC_MAX = {24: float(np.finfo(np.float32).max), 14: float(np.finfo(np.float32).max), 11: 65504.0}
# per-operation absolute allowance for underflow (flush-to-zero of float32; fp16 subnormal half-ulp)
_ACC_TINY = {24: 2.0**-126, 14: 2.0**-126, 11: 2.0**-24}
# TF32 input rounding per operand: truncation-safe (2**-11 if the hardware rounds to nearest)
_TF32_INPUT_REL = 2.0**-10
_GELU_ALLOWANCE = 2.0**-10  # the GPU's tanh approximation: |tanh error| <= 2**-11, doubled


@dataclass(frozen=True)
class Tolerance:
    """How far a correct cuSPARSELt result may be from :func:`matmul`, and where that comes from.

    The GPU's value before the conversion to D's type, ``x_gpu``, is bounded element-wise by::

        |x_gpu - x| <= |alpha| * E_acc
                       + epilogue_ops * epilogue_unit * (|alpha*AB| + |beta*C| + |bias|)
        E_acc = (acc_rel + input_rel) * S + k * acc_tiny,      S = |A| @ |B|

    ``E_acc`` is 0 for an element whose accumulation is certainly exact: integer inputs, or all
    products and partial sums representable in the accumulator (``S <= 2**acc_bits * q`` where
    ``q`` is the smallest power of two dividing every product of that row of A and column of B).
    The activation maps the interval ``[x - E, x + E]`` (GELU widened by ``gelu_rel * |x| / 2``),
    and D's rounding maps its ends: :func:`matmul_bounds` returns those per-element limits. A
    correct result is within one ulp of D's type (``rtol``) plus the propagated error; a wrong one
    (a lost or extra product, a wrong row) is caught whenever its error exceeds that, which exact
    (e.g. small-integer) test data makes certain.

    Attributes
    ----------
    in_dtype, out_dtype : numpy.dtype
        Types of A/B and C/D.
    compute : str
        Compute type: "32F", "16F", "TF32" or "32I".
    k : int
        Reduction size.
    acc_bits : int or None
        Significand bits of the accumulator (None for integer accumulation).
    acc_rel : float
        ``k * 2**(1 - acc_bits)``: worst-case accumulation error relative to ``|A| @ |B|``, for
        additions that truncate (Tensor Cores align and add with round-toward-zero: Fasi, Higham,
        Mikaitis and Pranesh, "Numerical behavior of NVIDIA tensor cores", PeerJ CS 2021).
    acc_tiny : float
        Absolute allowance per addition for underflow / flush-to-zero.
    input_rel : float
        Rounding of the inputs inside the Tensor Cores relative to ``|A| @ |B|`` (TF32: two
        operands of ``2**-10`` each, truncation-safe; else 0).
    epilogue_unit : float
        Unit round-off of the epilogue arithmetic (float32: ``2**-24``; compute 16F: ``2**-11``).
    gelu_rel : float
        Allowance for the GPU's tanh approximation in GELU, relative to ``|x| / 2``.
    out_roundoff : float
        Unit round-off of D's type (0 for integer D, which rounds to integers).
    """

    in_dtype: np.dtype
    out_dtype: np.dtype
    compute: str
    k: int
    acc_bits: int | None
    acc_rel: float
    acc_tiny: float
    input_rel: float
    epilogue_unit: float
    gelu_rel: float
    out_roundoff: float

    @property
    def rtol(self) -> float:
        """One ulp of D's type relative to ``|D|`` (two unit round-offs); 0 for integer D."""
        return 2.0 * self.out_roundoff

    @property
    def atol_scale(self) -> float:
        """Coefficient of ``|alpha| * (|A| @ |B|)`` in the worst-case bound
        (``acc_rel + input_rel``)."""
        return self.acc_rel + self.input_rel

    @property
    def exact(self) -> bool:
        """True when the accumulation is exact (int8 inputs, compute 32I)."""
        return self.acc_bits is None


def matmul_tolerance(
    in_dtype: Any, out_dtype: Any, k: int, *, compute: str | None = None
) -> Tolerance:
    """The error model of a cuSPARSELt GEMM for these types, reduction size and compute type.

    Parameters
    ----------
    in_dtype, out_dtype : dtype-like
        A/B and C/D types (a combination from :data:`~pycusparselt.reference.VALID_COMBINATIONS`).
    k : int
        The reduction dimension K.
    compute : {"32F", "16F", "TF32", "32I"}, optional
        Compute type; default the first of :data:`~pycusparselt.reference.DEFAULT_COMPUTE` for ``in_dtype``.

    Returns
    -------
    Tolerance
        See its docstring for the bound and every constant's origin.

    Raises
    ------
    TypeError
        Invalid type combination or compute type for ``in_dtype``.
    ValueError
        Negative ``k``.
    """
    in_dt, out_dt = np.dtype(in_dtype), np.dtype(out_dtype)
    if in_dt not in VALID_COMBINATIONS or out_dt not in VALID_COMBINATIONS[in_dt]:
        raise TypeError(
            f"unsupported type combination: A/B {in_dt} with C/D {out_dt}; cuSPARSELt supports "
            + combinations_text()
        )
    if compute is None:
        compute = COMPUTE_TYPES[in_dt][0]
    if compute not in COMPUTE_TYPES[in_dt]:
        raise TypeError(f"compute type {compute!r} is not valid for A/B {in_dt}; valid: "
                        f"{', '.join(COMPUTE_TYPES[in_dt])}")
    k = int(k)
    if k < 0:
        raise ValueError(f"k must be >= 0, got {k}")
    if in_dt == I8:
        acc_bits, acc_rel, acc_tiny = None, 0.0, 0.0
    else:
        acc_bits = _ACC_BITS[(in_dt, compute)]
        # truncation-safe: Tensor Cores align and add with round-toward-zero (Fasi et al., 2021),
        # so each addition may lose up to one ulp (2 unit round-offs) rather than half of one
        acc_rel, acc_tiny = k * 2.0 ** (1 - acc_bits), _ACC_TINY[acc_bits]
    input_rel = 2 * _TF32_INPUT_REL + _TF32_INPUT_REL**2 if in_dt == F32 else 0.0
    epilogue_unit = 2.0**-11 if compute == "16F" else 2.0**-24
    out_roundoff = _UNIT_ROUNDOFF.get(out_dt, 0.0)
    return Tolerance(in_dt, out_dt, compute, k, acc_bits, acc_rel, acc_tiny, input_rel,
                     epilogue_unit, _GELU_ALLOWANCE, out_roundoff)


def _lowbit_exponent(x64: np.ndarray) -> np.ndarray:
    """Exponent of the least significant set bit of each value (+inf for 0 and non-finite)."""
    finite = np.isfinite(x64) & (x64 != 0)
    safe = np.where(finite, np.abs(x64), 1.0)
    m, e = np.frexp(safe)
    mant = np.ldexp(m, 53).astype(np.int64)  # exact integer in [2**52, 2**53)
    low = mant & -mant
    tz = np.frexp(low.astype(np.float64))[1] - 1
    return np.where(finite, (e - 53 + tz).astype(np.float64), np.inf)


def _tf32_representable(x64: np.ndarray) -> np.ndarray:
    """True where the value has at most 11 significant bits (TF32 inputs are used unchanged)."""
    finite = np.isfinite(x64) & (x64 != 0)
    top = np.frexp(np.where(finite, x64, 1.0))[1] - 1
    return ~finite | (top - _lowbit_exponent(x64) <= 10)


def _accumulation_error(p: Product, tol: Tolerance) -> np.ndarray:
    """Per-element bound E_acc on |acc_gpu - acc| (see :class:`Tolerance`)."""
    if tol.acc_bits is None:
        return np.zeros(p.out_shape)
    a64, b64 = to_float64(p.a), to_float64(p.b)
    with np.errstate(invalid="ignore", over="ignore"):
        s = np.broadcast_to(np.matmul(np.abs(a64), np.abs(b64)), p.out_shape)
        qa = _lowbit_exponent(a64).min(axis=-1, initial=np.inf)  # (..., M)
        qb = _lowbit_exponent(b64).min(axis=-2, initial=np.inf)  # (..., N)
        q = np.broadcast_to(qa[..., :, None] + qb[..., None, :], p.out_shape)
        s_in = s * (1.0 + tol.input_rel)
        exact_acc = (s == 0) | (
            (s_in <= np.ldexp(1.0, np.minimum(tol.acc_bits + q, 2000).astype(np.int32)))
            & (q >= _ACC_MIN_EXP[tol.acc_bits])
            & (s_in <= _ACC_MAX[tol.acc_bits])
        )
        err = np.where(exact_acc, 0.0, tol.acc_rel * s_in + tol.k * tol.acc_tiny)
        if tol.input_rel:
            ra = _tf32_representable(a64).all(axis=-1)
            rb = _tf32_representable(b64).all(axis=-2)
            inputs_exact = np.broadcast_to(ra[..., :, None] & rb[..., None, :], p.out_shape)
            err = err + np.where(inputs_exact, 0.0, tol.input_rel * s)
    return err


def _fits_f32(v: np.ndarray) -> np.ndarray:
    with np.errstate(over="ignore", invalid="ignore"):
        return v.astype(np.float32).astype(np.float64) == v


def _epilogue_exact(p: Product, e_acc: np.ndarray) -> np.ndarray:
    """Where the float32 epilogue cannot round: the accumulator is exact and float32, and the
    terms alpha*acc, beta*C and bias are float32 values whose every partial sum is too (all are
    multiples of 2**q and their magnitudes add up to at most 2**(24 + q))."""
    acc64 = p.acc.astype(np.float64)
    with np.errstate(over="ignore", invalid="ignore"):
        terms = [p.alpha * acc64]
        ok = (e_acc == 0) & _fits_f32(acc64)
        if p.c64 is not None:
            ok &= _fits_f32(p.c64)
            terms.append(p.beta * p.c64)
        if p.bias64 is not None:
            terms.append(p.bias64)
        terms = [np.broadcast_to(t, p.out_shape) for t in terms]
        total = np.zeros(p.out_shape)
        q = np.full(p.out_shape, np.inf)
        for t in terms:
            ok &= _fits_f32(t)  # products of float32 values are exact in float64
            total = total + np.abs(t)
            q = np.minimum(q, _lowbit_exponent(t))
        limit = np.ldexp(1.0, np.clip(24 + q, -1074, 1000).astype(np.int32))
        return ok & ((total == 0) | ((total <= limit) & (q >= -149)))


def _relu_image(
    lo: np.ndarray, hi: np.ndarray, t: float, u: float
) -> tuple[np.ndarray, np.ndarray]:
    """Bounds of ReLU(x) for x in [lo, hi]: monotone on each side of the threshold jump."""
    ylo, yhi = apply_relu(lo, t, u), apply_relu(hi, t, u)
    spans = (lo <= t) & (hi > t)
    jump = min(t, u)  # limit of ReLU just above the threshold
    return (np.where(spans, np.minimum(np.minimum(ylo, yhi), min(0.0, jump)), np.minimum(ylo, yhi)),
            np.where(spans, np.maximum(np.maximum(ylo, yhi), max(0.0, jump)), np.maximum(ylo, yhi)))


def _gelu_argmin() -> float:
    """The minimiser of the tanh-approximated GELU (about -0.7518), by golden-section search."""
    lo, hi = -1.5, 0.0
    f = lambda v: 0.5 * v * (1 + math.tanh(GELU_C * (v + 0.044715 * v**3)))  # noqa: E731
    for _ in range(200):
        m1, m2 = lo + (hi - lo) * 0.382, lo + (hi - lo) * 0.618
        if f(m1) < f(m2):
            hi = m2
        else:
            lo = m1
    return 0.5 * (lo + hi)


_GELU_XMIN = _gelu_argmin()


def _gelu_image(lo: np.ndarray, hi: np.ndarray, scaling: float, rel: float
                ) -> tuple[np.ndarray, np.ndarray]:
    """Bounds of gelu(x) * scaling for x in [lo, hi], widened for the GPU's tanh approximation."""
    g_lo, g_hi = apply_gelu(lo, 1.0), apply_gelu(hi, 1.0)
    gmin = np.minimum(g_lo, g_hi)
    gmin = np.where((lo <= _GELU_XMIN) & (hi >= _GELU_XMIN), apply_gelu(np.array(_GELU_XMIN), 1.0), gmin)
    gmax = np.maximum(g_lo, g_hi)
    with np.errstate(invalid="ignore", over="ignore"):
        slack = 0.5 * rel * np.maximum(np.abs(lo), np.abs(hi)) + 4 * 2.0**-24 * np.maximum(
            np.abs(gmin), np.abs(gmax))
        gmin, gmax = gmin - slack, gmax + slack
        if scaling >= 0:
            return gmin * scaling, gmax * scaling
        return gmax * scaling, gmin * scaling


def matmul_bounds(
    a: Any,
    b: Any,
    c: Any = None,
    *,
    compute: str | None = None,
    **kwargs: Any,
) -> tuple[np.ndarray, np.ndarray]:
    """Per-element limits ``lo <= D_gpu <= hi`` for a correct cuSPARSELt result.

    Parameters
    ----------
    a, b, c
        As for :func:`matmul`.
    compute : {"32F", "16F", "TF32", "32I"}, optional
        The compute type the GPU used (default: :data:`~pycusparselt.reference.DEFAULT_COMPUTE`).
    **kwargs
        The other keyword arguments of :func:`matmul` (alpha, beta, bias, activation, out_dtype,
        relu_upper_bound, relu_threshold, gelu_scaling).

    Returns
    -------
    lo, hi : numpy.ndarray
        D's shape and dtype. Where the reference is NaN both are NaN (the GPU must give NaN; for
        integer D, NaN converts to 0). The plain int8 -> int32 path gives ``lo == hi`` (exact).

    Notes
    -----
    The pre-conversion value ``x`` gets the radius of :class:`Tolerance`; the activation's image of
    ``[x - E, x + E]`` is taken exactly (ReLU's jump at the threshold and GELU's minimum included);
    the conversion to D's type is monotone, so the limits are the converted ends. Elements whose
    reference is not finite are not widened.
    """
    p = compute_product(a, b, c, **_matmul_kwargs(kwargs))
    if p.exact_int32:
        d = p.acc.astype(np.int32)
        return d, d.copy()
    tol = matmul_tolerance(p.in_dtype, p.out_dtype, p.k, compute=compute)
    e_acc = _accumulation_error(p, tol)
    alpha_abs = np.abs(p.alpha)
    acc64 = p.acc.astype(np.float64)
    with np.errstate(invalid="ignore", over="ignore"):
        ops = np.zeros(p.out_shape)
        magnitude = np.abs(p.alpha * acc64)
        if np.ndim(p.alpha) or p.alpha != 1.0:
            ops = ops + 1
        if p.in_dtype == I8:  # int32 accumulator -> float32
            ops = ops + (np.abs(acc64) > 2.0**24)
        if p.c64 is not None:
            magnitude = magnitude + np.abs(p.beta * p.c64)
            ops = ops + 2 + (np.abs(p.c64) > 2.0**24)  # beta*C, the add, int32 C -> float32
        if p.bias64 is not None:
            magnitude = magnitude + np.abs(p.bias64)
            ops = ops + 1
        if tol.compute == "16F":
            ops = ops + 1  # alpha/beta possibly rounded to half
        else:  # no rounding at all where every step is exact in float32, in any order
            ops = np.where(_epilogue_exact(p, e_acc), 0, ops)
        radius = alpha_abs * e_acc + ops * tol.epilogue_unit * magnitude
        radius = np.where(ops > 0, radius + _ACC_TINY[24], radius)
        finite = np.isfinite(p.x) & np.isfinite(radius)
        x_lo = np.where(finite, p.x - radius, p.x)
        x_hi = np.where(finite, p.x + radius, p.x)
    if p.activation == "relu":
        y_lo, y_hi = _relu_image(x_lo, x_hi, p.relu_threshold, p.relu_upper_bound)
    elif p.activation == "gelu":
        # y = alpha * gelu(x / alpha) (SEMANTICS["gelu_alpha"]): map the interval through each step
        with np.errstate(invalid="ignore", over="ignore"):
            z1, z2 = x_lo / p.alpha, x_hi / p.alpha
            g_lo, g_hi = _gelu_image(np.minimum(z1, z2), np.maximum(z1, z2), p.gelu_scaling, tol.gelu_rel)
            y1, y2 = p.alpha * g_lo, p.alpha * g_hi
        y_lo, y_hi = np.minimum(y1, y2), np.maximum(y1, y2)
        y_lo = np.where(finite, y_lo, p.y)
        y_hi = np.where(finite, y_hi, p.y)
    else:
        y_lo, y_hi = x_lo, x_hi
    return convert_output(y_lo, p.out_dtype), convert_output(y_hi, p.out_dtype)


_MATMUL_KWARGS = ("alpha", "beta", "bias", "activation", "out_dtype", "relu_upper_bound",
                  "relu_threshold", "gelu_scaling")


def _matmul_kwargs(kwargs: Mapping[str, Any]) -> dict[str, Any]:
    unknown = set(kwargs) - set(_MATMUL_KWARGS)
    if unknown:
        raise TypeError(f"unexpected keyword argument(s): {', '.join(sorted(unknown))}")
    full = {"alpha": 1.0, "beta": 0.0, "bias": None, "activation": None, "out_dtype": None,
            "relu_upper_bound": math.inf, "relu_threshold": 0.0, "gelu_scaling": 1.0}
    full.update(kwargs)
    return full


def assert_close(
    actual: Any,
    desired: Any,
    *,
    a: Any,
    b: Any,
    c: Any = None,
    compute: str | None = None,
    max_report: int = 5,
    **kwargs: Any,
) -> None:
    """Assert that a GPU result ``actual`` is a correct cuSPARSELt result for these operands.

    Parameters
    ----------
    actual : array_like
        The GPU's D (host copy), of D's shape and dtype.
    desired : array_like
        :func:`matmul` of the same operands and keywords (checked to be consistent with them, so a
        mismatch between the test's reference and its GPU call cannot go unnoticed).
    a, b, c : array_like
        The operands exactly as given to the GPU (A already pruned). The types come from these and
        ``desired``: A/B from ``a``, C/D from ``desired``.
    compute : str, optional
        Compute type used on the GPU (default: :data:`~pycusparselt.reference.DEFAULT_COMPUTE`).
    max_report : int
        How many offending elements the message lists.
    **kwargs
        The keyword arguments given to :func:`matmul` (alpha, beta, bias, activation, ...).

    Raises
    ------
    AssertionError
        Shape or dtype mismatch, or elements outside :func:`matmul_bounds`; the message gives the
        count and the worst elements with actual, desired and the limits.
    ValueError
        ``desired`` is not :func:`matmul`'s result for these arguments.

    Notes
    -----
    The check is ``lo <= actual <= hi`` element-wise (NaN must match NaN), the tightest bound the
    error model of :class:`Tolerance` allows: about one ulp of D plus the float32 accumulation error
    ``K * 2**-23 * (|A| @ |B|)`` where the accumulation can round at all, nothing where it cannot
    (and nothing at all for int8 -> int32 without an epilogue). With random data the worst-case
    accumulation term can hide a single lost product for large K; GPU tests that must catch such
    errors should use data whose accumulation is exact (small integers or dyadic values), where
    the allowed range shrinks to D's own rounding.
    """
    kw = _matmul_kwargs(kwargs)
    desired = np.asarray(desired)
    if kw["out_dtype"] is None:
        kw["out_dtype"] = desired.dtype
    lo, hi = matmul_bounds(a, b, c, compute=compute, **kw)
    ref = matmul(a, b, c, **kw)
    if desired.shape != ref.shape or desired.dtype != ref.dtype or not np.array_equal(
            bit_patterns(desired), bit_patterns(ref)):
        raise ValueError("desired is not reference.matmul(a, b, c, ...) for these arguments")
    actual = np.asarray(actual)
    if actual.shape != ref.shape:
        raise AssertionError(f"shape mismatch: actual {actual.shape}, desired {ref.shape}")
    if actual.dtype != ref.dtype:
        raise AssertionError(f"dtype mismatch: actual {actual.dtype}, desired {ref.dtype}")
    act64, lo64, hi64 = to_float64(actual), to_float64(lo), to_float64(hi)
    ref_nan = np.isnan(lo64)
    with np.errstate(invalid="ignore"):
        ok = np.where(ref_nan, np.isnan(act64), (lo64 <= act64) & (act64 <= hi64))
    if ok.all():
        return
    bad = np.argwhere(~ok)
    with np.errstate(invalid="ignore", over="ignore"):
        excess = np.where(ref_nan | np.isnan(act64), np.inf,
                          np.maximum(lo64 - act64, act64 - hi64))
    worst = sorted(bad.tolist(), key=lambda i: -excess[tuple(i)])[:max_report]
    lines = [
        f"  D{tuple(i)}: actual {format_value(act64[tuple(i)])}, desired "
        f"{format_value(to_float64(ref)[tuple(i)])}, allowed [{format_value(lo64[tuple(i)])}, "
        f"{format_value(hi64[tuple(i)])}]"
        for i in worst
    ]
    tol = matmul_tolerance(np.asarray(a).dtype, ref.dtype, np.shape(a)[-1], compute=compute)
    raise AssertionError(
        f"{len(bad)} of {ok.size} elements outside the allowed range ({np.asarray(a).dtype} -> "
        f"{ref.dtype}, compute {tol.compute}, K={tol.k}); worst:\n" + "\n".join(lines)
    )
