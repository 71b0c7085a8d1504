"""cuSPARSELt's GEMM semantics in NumPy: :func:`matmul`, with every rule that is not plain arithmetic in one
small function listed in :data:`SEMANTICS`."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Mapping, NamedTuple

import numpy as np

from .. import types
from ..types import BF16, F16, F32, FLOAT_FORMATS, I8, I32, VALID_COMBINATIONS
from .elements import as_array, to_float64

__all__ = ["Rule", "SEMANTICS", "matmul", "Product", "compute_product", "convert_output", "apply_relu",
           "apply_gelu", "GELU_C", "combinations_text"]


class Rule(NamedTuple):
    """One semantic rule of :func:`matmul` (or of pruning), as quoted in the documentation."""

    rule: str
    function: str
    established: str


_DOCS = "cuSPARSELt documentation; to be confirmed on the H100"
_ASSUMED = "assumption (unconfirmed); to be confirmed on the H100"
_GPU = "experiment on an H100 with cuSPARSELt 0.8.0 (docs/semantics.rst, case {})"
_OURS = "our choice (cuSPARSELt's own choice not known; compare on the H100)"

#: Every non-arithmetic rule of the reference (exported as :data:`pycusparselt.reference.SEMANTICS`).
SEMANTICS: Mapping[str, Rule] = {
    "epilogue_order": Rule(
        "x = alpha * (A @ B) + beta * C + bias, in real arithmetic (float64 here, float32 on the "
        "GPU); then the activation; then the conversion to D's type",
        "_epilogue",
        _GPU.format("order_fp16, relu_int8_int8_bias_beta")),
    "scalar_precision": Rule(
        "alpha, beta, the ReLU bound and threshold and the GELU scaling are host float32: the "
        "reference rounds them to float32 first",
        "_as_f32_scalar", _DOCS),
    "alpha_vector": Rule(
        "alpha may be a float32 vector of length M: alpha[i] scales row i of A @ B",
        "_epilogue",
        _GPU.format("int8_alpha_vector") + " (INT8 inputs with compute 32I)"),
    "beta_vector": Rule(
        "beta may be a float32 vector of length M (row i of C), only together with a vector alpha",
        "_epilogue", _DOCS + " (INT8 with compute 32I only)"),
    "beta_zero": Rule(
        "beta = 0: C is not read, so NaN or Inf in C do not reach D (the BLAS convention)",
        "compute_product", _ASSUMED),
    "bias": Rule(
        "bias has one value per row of D (length M), added to every column; float32 for integer D "
        "(int8, int32), else D's type (int8 -> float16/bfloat16 and fp8 -> float16 included); batches "
        "share one (M,) vector or have one per batch (batch, M)",
        "_bias_dtype",
        _GPU.format("bias_len_m_fp16, int8_bias_len, int8_to_fp16, e4m3_to_fp16_bias")),
    "relu": Rule(
        "y = 0 where x <= threshold, else x; then y = min(y, upper_bound) (defaults: threshold 0, "
        "upper bound +inf); NaN passes through. The threshold and the bound act only with ReLU on",
        "apply_relu",
        _GPU.format("relu_threshold_upper_fp16, relu_threshold_only_fp16")),
    "gelu": Rule(
        "y = 0.5 * x * (1 + tanh(sqrt(2/pi) * (x + 0.044715 * x**3))) (tanh approximation; "
        "evaluated as x / (1 + exp(-2 * sqrt(2/pi) * (x + 0.044715 * x**3))) to avoid "
        "cancellation)",
        "apply_gelu",
        "tanh form assumed (cuBLASLt's GELU epilogue); on the H100 the only GELU the library accepts "
        "has int8 output, where the tanh and erf forms round alike on every experiment value"),
    "gelu_alpha": Rule(
        "with GELU, D = alpha * gelu(x / alpha) * scaling where x = alpha * (A @ B) + beta * C + bias, "
        "i.e. gelu(A @ B + (beta * C + bias) / alpha) scaled by alpha; alpha must be non-zero. GELU is "
        "an int8 -> int8 epilogue (the library refuses it for every other type combination)",
        "_activation", _GPU.format("gelu_int8_int8, gelu_int8_int8_bias_beta")),
    "gelu_scaling": Rule(
        "the GELU scaling multiplies the output: y = gelu(x) * scaling",
        "apply_gelu",
        _GPU.format("gelu_scaling_int8_int8") + "; the GPU's tanh approximation can move a value "
        "across an int8 rounding boundary (exactly 13.5 came out as 13 on all 118 such outputs)"),
    "float_output": Rule(
        "float16/bfloat16/float32 D: round to nearest, ties to even, from the exact value (one "
        "rounding); overflow gives +-inf; NaN stays NaN",
        "convert_output",
        _GPU.format("e4m3_to_bf16, bf16_alpha_beta, e4m3_to_fp32") + "; overflow and NaN from the documentation"),
    "fp8_output": Rule(
        "float8 D: round to nearest even, then saturate to the largest finite value (+-448 for "
        "e4m3, +-57344 for e5m2; +-inf saturates too); NaN stays NaN",
        "convert_output",
        _ASSUMED + "; not a combination matmul offers: e4m3 -> e4m3 with C and D of one type was "
        "refused (NOT_SUPPORTED) on the H100, case e4m3_to_e4m3_saturate"),
    "int8_output": Rule(
        "int8 D: round half to even, then saturate to [-128, 127]; NaN becomes 0",
        "convert_output",
        _GPU.format("int8_round_half, int8_saturate") + "; NaN -> 0 assumed"),
    "int32_output": Rule(
        "int32 D: with alpha = 1, beta = 0 (or no C), no bias and no activation, the integer "
        "accumulator itself; otherwise round half to even and saturate to the int32 range; NaN "
        "becomes 0",
        "convert_output",
        _GPU.format("int8_to_int32, int8_to_int32_alpha_half") + "; saturation and NaN -> 0 assumed"),
    "int32_accumulator": Rule(
        "int8 products are summed in a 32-bit integer that wraps modulo 2**32 (only reachable "
        "for K >= 2**17)",
        "_wrap_int32", _ASSUMED),
    "default_out_dtype": Rule(
        "D's type when neither out_dtype nor c gives it: the input type for float16, bfloat16 and "
        "float32, int32 for int8 (exact), float16 for fp8 (pycusparselt.types, shared with the GPU layer)",
        "_resolve_out_dtype",
        "our choice (cuSPARSELt has no default: the caller picks C/D's type)"),
    "prune_strip_ties": Rule(
        "strip pruning keeps the two largest magnitudes per group; equal magnitudes: lower index "
        "kept; NaN ranks above +-inf",
        "_top2_mask", _OURS),
    "prune_tile_ties": Rule(
        "tile pruning keeps the pattern (2 per row and column of each 4x4 tile) with the most "
        "NaNs, then infinities, then finite magnitude kept; ties: lowest index in TILE_PATTERNS",
        "_tile_choice", _OURS),
    "compress_spare_slots": Rule(
        "a group with fewer than 2 non-zeros stores zeros in its spare slots, preferring -0.0 "
        "elements, then the lowest index; indices increase within each group",
        "compress", _OURS),
}


def _as_f32_scalar(name: str, value: Any) -> float:
    """A host float parameter as the GPU receives it (float32), returned as float64."""
    try:
        v = float(value)
    except (TypeError, ValueError):
        raise TypeError(f"{name} must be a real number, got {value!r}") from None
    return float(np.float32(v)) if math.isfinite(v) else v


def _as_f32_vector(name: str, value: Any, m: int) -> np.ndarray:
    arr = np.asarray(value)
    if arr.ndim != 1 or arr.shape[0] != m:
        raise ValueError(
            f"{name} must be a scalar or a vector of length M={m}, got shape {arr.shape}"
        )
    if not (np.issubdtype(arr.dtype, np.floating) or np.issubdtype(arr.dtype, np.integer)
            or arr.dtype == BF16):
        raise TypeError(f"{name} must be real numbers, got dtype {arr.dtype}")
    return to_float64(arr).astype(np.float32).astype(np.float64)


def _bias_dtype(out_dt: np.dtype) -> np.dtype:
    """The bias element type (SEMANTICS["bias"]): float32 for integer D, else D's type."""
    return types.bias_dtype(out_dt)


def apply_relu(x: np.ndarray, threshold: float, upper_bound: float) -> np.ndarray:
    """ReLU with threshold and upper bound (SEMANTICS["relu"])."""
    y = np.where(x <= threshold, 0.0, x)
    return np.minimum(y, upper_bound)


GELU_C = math.sqrt(2.0 / math.pi)


def apply_gelu(x: np.ndarray, scaling: float) -> np.ndarray:
    """tanh-approximated GELU, output times ``scaling`` (SEMANTICS["gelu"], ["gelu_scaling"]).

    0.5 * x * (1 + tanh(u)) is evaluated as x / (1 + exp(-2u)), the same function without the
    cancellation of 1 + tanh(u) for large negative x.
    """
    with np.errstate(over="ignore", invalid="ignore"):
        u = GELU_C * (x + 0.044715 * x * x * x)
        y = x / (1.0 + np.exp(-2.0 * u))
        y = np.where(np.isneginf(x), -0.0, y)  # -inf / inf
        return y * scaling


def _wrap_int32(acc: np.ndarray) -> np.ndarray:
    """The int64 accumulator as a wrapping 32-bit accumulator sees it
    (SEMANTICS["int32_accumulator"])."""
    return ((acc + 2**31) % 2**32 - 2**31).astype(np.int64)


def _round_float(x: np.ndarray, dt: np.dtype) -> np.ndarray:
    """Round float64 ``x`` to the nearest value of float type ``dt`` (ties to even), in float64.

    One correct rounding from float64 (ml_dtypes' astype rounds through float32, which can round
    twice). Values beyond the range come back unrounded-but-huge for the caller to overflow or
    saturate; subnormals of ``dt`` are honoured.
    """
    info = FLOAT_FORMATS[dt]
    with np.errstate(over="ignore", invalid="ignore", divide="ignore"):
        _, e = np.frexp(x)  # |x| = m * 2**e, m in [0.5, 1)
        quantum_exp = np.maximum(e - 1, info.emin) - info.mant
        scale = np.ldexp(1.0, -quantum_exp)
        scaled = x * scale
        rounded = np.where(np.isfinite(scaled), np.rint(scaled) / scale, x)
    return rounded


def convert_output(y: np.ndarray, dt: np.dtype) -> np.ndarray:
    """float64 epilogue result -> D's type (SEMANTICS["float_output"], ["fp8_output"],
    ["int8_output"], ["int32_output"] for the non-exact path)."""
    if dt in (I8, I32):
        info = np.iinfo(dt)
        with np.errstate(invalid="ignore"):
            r = np.clip(np.rint(y), info.min, info.max)
            r = np.where(np.isnan(r), 0.0, r)
        return r.astype(dt)
    info = FLOAT_FORMATS[dt]
    r = _round_float(np.asarray(y, dtype=np.float64), dt)
    if info.saturate:
        r = np.clip(r, -info.max, info.max)  # NaN stays NaN
    else:
        r = np.where(np.abs(r) > info.max, np.copysign(np.inf, r), r)
    if dt == F32:
        return r.astype(np.float32)
    if dt == F16:
        return r.astype(np.float16)  # exact: r is representable (or +-inf / NaN)
    with np.errstate(over="ignore", invalid="ignore"):
        return r.astype(np.float32).astype(dt)  # exact: r is representable in dt


def _resolve_out_dtype(in_dt: np.dtype, out_dtype: Any, c: np.ndarray | None) -> np.ndarray:
    """D's type (SEMANTICS["default_out_dtype"]) and the type-combination check."""
    if out_dtype is not None:
        out = np.dtype(out_dtype)
        if c is not None and c.dtype != out:
            raise TypeError(f"c has dtype {c.dtype} but out_dtype is {out}; C and D share one type")
    elif c is not None:
        out = c.dtype
    else:
        out = types.default_out_dtype(in_dt)
    if out not in VALID_COMBINATIONS[in_dt]:
        raise TypeError(
            f"unsupported type combination: A/B {in_dt} with C/D {out}; cuSPARSELt supports "
            + combinations_text()
        )
    return out


def combinations_text() -> str:
    return types.combinations_text()


# --------------------------------------------------------------------------------------------------
# matmul
# --------------------------------------------------------------------------------------------------


@dataclass
class Product:
    """Everything matmul computes before the conversion to D's type."""

    a: np.ndarray
    b: np.ndarray
    in_dtype: np.dtype
    out_dtype: np.dtype
    k: int
    out_shape: tuple[int, ...]
    acc: np.ndarray  # float64, or int64 (already wrapped to 32 bits) for int8 inputs
    alpha: Any  # float or (M, 1) float64
    beta: Any
    c64: np.ndarray | None  # broadcast to out_shape
    bias64: np.ndarray | None  # broadcastable to out_shape, (..., M, 1)
    x: np.ndarray  # float64 epilogue input of the activation
    y: np.ndarray  # float64 after the activation
    activation: str | None
    relu_threshold: float
    relu_upper_bound: float
    gelu_scaling: float
    exact_int32: bool  # the plain int8 -> int32 path (D = the accumulator)


def _epilogue(acc64: np.ndarray, alpha: Any, beta: Any, c64: np.ndarray | None,
              bias64: np.ndarray | None) -> np.ndarray:
    """x = alpha * acc + beta * C + bias (SEMANTICS["epilogue_order"], alpha/beta/bias indexing)."""
    with np.errstate(invalid="ignore", over="ignore"):
        x = alpha * acc64
        if c64 is not None:
            x = x + beta * c64
        if bias64 is not None:
            x = x + bias64
    return x


def _activation(x: np.ndarray, activation: str | None, threshold: float, upper: float,
                scaling: float, alpha: Any) -> np.ndarray:
    if activation is None:
        return x
    if activation == "relu":
        return apply_relu(x, threshold, upper)
    # SEMANTICS["gelu_alpha"]: GELU acts on x / alpha and its output is scaled by alpha again
    with np.errstate(invalid="ignore", over="ignore"):
        return alpha * apply_gelu(x / alpha, scaling)


def compute_product(
    a: Any, b: Any, c: Any, *, alpha: Any, beta: Any, bias: Any, activation: str | None,
    out_dtype: Any, relu_upper_bound: float, relu_threshold: float, gelu_scaling: float,
) -> Product:
    a = as_array(a, "a")
    b = as_array(b, "b")
    if a.dtype != b.dtype:
        raise TypeError(f"a and b must have the same dtype, got {a.dtype} and {b.dtype}")
    in_dt = a.dtype
    if a.ndim < 2 or b.ndim < 2:
        raise ValueError(
            f"a and b must be matrices (..., M, K) and (..., K, N); got shapes {a.shape} and "
            f"{b.shape}"
        )
    m, k = a.shape[-2:]
    k2, n = b.shape[-2:]
    if k != k2:
        raise ValueError(
            f"inner dimensions differ: a is (..., M, K) = {a.shape}, b is (..., K, N) = {b.shape}"
        )
    c_arr = None if c is None else np.asarray(c)
    out_dt = _resolve_out_dtype(in_dt, out_dtype, c_arr)

    batch_shapes = [a.shape[:-2], b.shape[:-2]]
    if c_arr is not None:
        if c_arr.ndim < 2 or c_arr.shape[-2:] != (m, n):
            raise ValueError(f"c must have shape (..., M, N) = (..., {m}, {n}), got {c_arr.shape}")
        batch_shapes.append(c_arr.shape[:-2])

    # activation and its parameters
    if activation is not None:
        if not isinstance(activation, str) or activation.lower() not in ("relu", "gelu"):
            raise ValueError(f"activation must be None, 'relu' or 'gelu', got {activation!r}")
        activation = activation.lower()
    threshold = _as_f32_scalar("relu_threshold", relu_threshold)
    upper = _as_f32_scalar("relu_upper_bound", relu_upper_bound)
    scaling = _as_f32_scalar("gelu_scaling", gelu_scaling)
    if activation != "relu" and (threshold != 0.0 or upper != math.inf):
        raise ValueError("relu_threshold and relu_upper_bound need activation='relu'")
    if activation != "gelu" and scaling != 1.0:
        raise ValueError("gelu_scaling needs activation='gelu'")

    # alpha and beta: float32 scalars, or float32 vectors of length M (per row of D)
    alpha_is_vec = np.ndim(alpha) > 0
    beta_is_vec = np.ndim(beta) > 0
    if alpha_is_vec:
        alpha_v = _as_f32_vector("alpha", alpha, m)[:, None]
    else:
        alpha_v = _as_f32_scalar("alpha", alpha)
    if beta_is_vec:
        if not alpha_is_vec:
            raise ValueError("a vector beta needs a vector alpha (cuSPARSELt's BETA_VECTOR_SCALING "
                             "requires ALPHA_VECTOR_SCALING)")
        beta_v = _as_f32_vector("beta", beta, m)[:, None]
    else:
        beta_v = _as_f32_scalar("beta", beta)
    beta_zero = (not beta_is_vec) and beta_v == 0.0
    if c_arr is None and not beta_zero:
        raise ValueError(
            "beta is non-zero but c is None; pass C (cuSPARSELt reads C when beta != 0)"
        )

    # bias: one value per row of D
    bias64 = None
    if bias is not None:
        bias_arr = np.asarray(bias)
        want = _bias_dtype(out_dt)
        if bias_arr.dtype != want:
            raise TypeError(f"bias must have dtype {want} for A/B {in_dt} and D {out_dt}, "
                            f"got {bias_arr.dtype}")
        if bias_arr.ndim < 1 or bias_arr.shape[-1] != m:
            raise ValueError(f"bias must have shape (M,) or (batch, M) with M={m} (one value per "
                             f"row of D), got {bias_arr.shape}")
        batch_shapes.append(bias_arr.shape[:-1])
        bias64 = to_float64(bias_arr)[..., :, None]

    try:
        batch = np.broadcast_shapes(*batch_shapes)
    except ValueError:
        raise ValueError(
            "batch dimensions do not broadcast: a " + str(a.shape) + ", b " + str(b.shape)
            + ("" if c_arr is None else f", c {c_arr.shape}")
            + ("" if bias is None else f", bias {np.shape(bias)}")
        ) from None
    out_shape = tuple(batch) + (m, n)

    a64, b64 = to_float64(a), to_float64(b)
    with np.errstate(invalid="ignore", over="ignore"):
        acc = np.broadcast_to(np.matmul(a64, b64), out_shape)
    if in_dt == I8:
        # exact: every partial sum is an integer below K * 2**14, far under 2**53 (BLAS speed)
        acc = _wrap_int32(acc.astype(np.int64))
        acc64 = acc.astype(np.float64)
    else:
        acc64 = acc
    c64 = None
    if c_arr is not None:
        c64 = np.broadcast_to(to_float64(c_arr), out_shape)
        if beta_zero:
            c64 = None  # beta == 0: C does not contribute (and NaN in C does not propagate)
    if activation == "gelu" and np.any(np.asarray(alpha_v) == 0):
        raise ValueError("alpha must be non-zero with activation='gelu' (cuSPARSELt applies GELU to x / alpha)")
    x = np.broadcast_to(_epilogue(acc64, alpha_v, beta_v, c64, bias64), out_shape)
    y = _activation(x, activation, threshold, upper, scaling, alpha_v)
    exact = (in_dt == I8 and out_dt == I32 and not alpha_is_vec and alpha_v == 1.0
             and c64 is None and bias64 is None and activation is None)
    return Product(a, b, in_dt, out_dt, k, out_shape, acc, alpha_v, beta_v, c64, bias64, x, y,
                    activation, threshold, upper, scaling, exact)


def matmul(
    a: Any,
    b: Any,
    c: Any = None,
    *,
    alpha: float | Any = 1.0,
    beta: float | Any = 0.0,
    bias: Any = None,
    activation: str | None = None,
    out_dtype: Any = None,
    relu_upper_bound: float = math.inf,
    relu_threshold: float = 0.0,
    gelu_scaling: float = 1.0,
) -> np.ndarray:
    """``D = activation(alpha * (A @ B) + beta * C + bias)`` with cuSPARSELt's semantics.

    Parameters
    ----------
    a : array_like, shape (..., M, K)
        The sparse operand, exactly as the GPU sees it (already pruned and in its dtype; the
        reference does not require it to be 2:4).
    b : array_like, shape (..., K, N)
        The dense operand; same dtype as ``a``.
    c : array_like, shape (..., M, N), optional
        C, of D's type. Needed when ``beta`` is non-zero.
    alpha : float or array_like of shape (M,)
        Scale of ``A @ B``: a scalar, or one value per row of D ("alpha vector scaling",
        ``alpha[i]`` scales row ``i``). Rounded to float32, as the GPU receives it.
    beta : float or array_like of shape (M,)
        Scale of C; a vector (one per row) only together with a vector ``alpha``, as in cuSPARSELt.
    bias : array_like, shape (M,) or (batch..., M), optional
        One value per **row** of D (``bias[i]`` is added to every element of row ``i``). float32
        for an integer D (int8, int32), else D's type (as measured on the H100: an int8 -> float16
        GEMM reads its bias as float16). A batch shares an ``(M,)`` bias or has one row per batch.
    activation : {None, "relu", "gelu"}
        See ``relu_threshold``, ``relu_upper_bound``, ``gelu_scaling`` and :data:`SEMANTICS`.
    out_dtype : dtype-like, optional
        D's type. Default: ``c``'s dtype if given, else the input type for float inputs and int32
        for int8 inputs. Valid combinations: :data:`~pycusparselt.reference.VALID_COMBINATIONS`.
    relu_upper_bound : float
        ReLU clips at this value (default +inf).
    relu_threshold : float
        ReLU zeroes ``x <= relu_threshold`` (default 0).
    gelu_scaling : float
        GELU's output is multiplied by this (default 1). With GELU, alpha must be non-zero: the GPU
        computes ``alpha * gelu(x / alpha) * gelu_scaling`` (:data:`SEMANTICS` ``gelu_alpha``).

    Returns
    -------
    numpy.ndarray, shape (batch..., M, N), D's dtype
        Batch dimensions broadcast like :func:`numpy.matmul` (a batch of one broadcasts).

    Raises
    ------
    TypeError
        Unsupported dtype, ``a``/``b`` of different dtypes, an invalid A/B -> C/D combination
        (the message lists the valid ones), or a bias of the wrong dtype.
    ValueError
        Shape mismatches (inner dimension, C, bias, alpha/beta vectors, batches), an unknown
        activation, activation parameters without their activation, or a non-zero ``beta`` without
        ``c``.

    Notes
    -----
    Products accumulate in float64 (exact for every input type: products are exact and the sums'
    rounding, at most ``K * 2**-53`` relative to ``|A| @ |B|``, is far below any GPU tolerance);
    int8 inputs accumulate exactly as integers, wrapped to 32 bits. The epilogue runs in float64
    and the result is converted with one correct rounding. The rules not fixed by arithmetic are
    in :data:`SEMANTICS`.
    """
    p = compute_product(
        a, b, c, alpha=alpha, beta=beta, bias=bias, activation=activation, out_dtype=out_dtype,
        relu_upper_bound=relu_upper_bound, relu_threshold=relu_threshold, gelu_scaling=gelu_scaling,
    )
    if p.exact_int32:
        return np.ascontiguousarray(p.acc.astype(np.int32))
    return np.ascontiguousarray(convert_output(p.y, p.out_dtype))

