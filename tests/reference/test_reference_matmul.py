"""The NumPy reference: matmul semantics against plain Python loops, and pinned edge cases (CPU)."""

from __future__ import annotations

import bisect
import functools
import itertools
import math

import ml_dtypes
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pycusparselt import reference as ref

F16, BF16, F32, I8, I32 = (np.dtype(np.float16), np.dtype(ml_dtypes.bfloat16),
                           np.dtype(np.float32), np.dtype(np.int8), np.dtype(np.int32))
E4M3, E5M2 = np.dtype(ml_dtypes.float8_e4m3fn), np.dtype(ml_dtypes.float8_e5m2)
COMBOS = [(i, o) for i, outs in ref.VALID_COMBINATIONS.items() for o in outs]
UINT = {1: np.uint8, 2: np.uint16, 4: np.uint32}


# ------------------------------------------------------------------------------------------------
# independent Python model
# ------------------------------------------------------------------------------------------------

@functools.lru_cache(maxsize=None)
def _grid(dt: np.dtype) -> tuple[list[float], list[int]]:
    """All finite non-negative values of an 8/16-bit float type, sorted, with their bit patterns."""
    bits = np.arange(2 ** (8 * dt.itemsize), dtype=UINT[dt.itemsize])
    with np.errstate(invalid="ignore"):
        vals = bits.view(dt).astype(np.float64)
    sign = 1 << (8 * dt.itemsize - 1)
    keep = np.isfinite(vals) & (bits < sign)
    order = np.argsort(vals[keep], kind="stable")
    return vals[keep][order].tolist(), bits[keep][order].tolist()


def _py_round_float(v: float, dt: np.dtype) -> float:
    """Nearest value of ``dt``, ties to the even bit pattern; IEEE overflow for 16/32-bit types,
    saturation for float8 (the documented rules)."""
    if math.isnan(v):
        return math.nan
    if dt == F32:
        with np.errstate(over="ignore"):
            return float(np.float32(v))
    vals, bits = _grid(dt)
    top = vals[-1]
    saturate = dt in (E4M3, E5M2)
    mag = abs(v)
    if saturate:
        mag = min(mag, top)
    else:
        # pretend the next binade exists (an "even" value); rounding there means overflow
        ulp_top = top - vals[-2]
        if mag >= top + ulp_top / 2:  # half-way rounds to even = the overflow value
            return math.copysign(math.inf, v)
    i = bisect.bisect_left(vals, mag)
    if i < len(vals) and vals[i] == mag:
        r = vals[i]
    else:
        lo, hi = vals[i - 1], vals[i]
        if mag - lo < hi - mag:
            r = lo
        elif hi - mag < mag - lo:
            r = hi
        else:
            r = lo if bits[i - 1] % 2 == 0 else hi
    return math.copysign(r, v)


def _py_convert(v: float, dt: np.dtype):
    if dt in (I8, I32):
        if math.isnan(v):
            return 0
        lo, hi = (-128, 127) if dt == I8 else (-2**31, 2**31 - 1)
        if math.isinf(v):
            return lo if v < 0 else hi
        return max(lo, min(hi, round(v)))  # round(): half to even
    return _py_round_float(v, dt)


def _as_py(x) -> float | int:
    arr = np.asarray(x)
    if arr.dtype.kind in "iu":
        return int(arr)
    with np.errstate(invalid="ignore"):
        return float(arr.astype(np.float64))


def _wrap32(v: int) -> int:
    return (v + 2**31) % 2**32 - 2**31


def _py_matmul(a, b, c=None, *, alpha=1.0, beta=0.0, bias=None, activation=None, out_dtype,
               relu_threshold=0.0, relu_upper_bound=math.inf, gelu_scaling=1.0):
    """D by plain loops; the operation order of the documented semantics."""
    in_dt = a.dtype
    f32 = lambda v: float(np.float32(v))  # noqa: E731
    m, k = a.shape[-2:]
    n = b.shape[-1]
    shapes = [a.shape[:-2], b.shape[:-2]] + ([c.shape[:-2]] if c is not None else []) + (
        [np.shape(bias)[:-1]] if bias is not None else [])
    batch = np.broadcast_shapes(*shapes)
    A = np.broadcast_to(a, batch + (m, k))
    B = np.broadcast_to(b, batch + (k, n))
    C = None if c is None else np.broadcast_to(c, batch + (m, n))
    bias_b = None if bias is None else np.broadcast_to(bias, batch + (m,))
    alpha_v = [f32(x) for x in np.ravel(alpha)] if np.ndim(alpha) else None
    beta_v = [f32(x) for x in np.ravel(beta)] if np.ndim(beta) else None
    out = np.zeros(batch + (m, n), dtype=out_dtype)
    plain = (in_dt == I8 and out_dtype == I32 and alpha_v is None and f32(alpha) == 1.0
             and (C is None or (beta_v is None and f32(beta) == 0.0)) and bias is None
             and activation is None)
    for idx in itertools.product(*[range(s) for s in batch]):
        for i in range(m):
            for j in range(n):
                if in_dt == I8:
                    acc = _wrap32(sum(int(A[idx + (i, kk)]) * int(B[idx + (kk, j)])
                                      for kk in range(k)))
                else:
                    acc = 0.0
                    for kk in range(k):
                        acc += _as_py(A[idx + (i, kk)]) * _as_py(B[idx + (kk, j)])
                if plain:
                    out[idx + (i, j)] = acc
                    continue
                al = alpha_v[i] if alpha_v is not None else f32(alpha)
                x = al * float(acc)
                be = beta_v[i] if beta_v is not None else f32(beta)
                if C is not None and (beta_v is not None or be != 0.0):
                    x = x + be * _as_py(C[idx + (i, j)])
                if bias_b is not None:
                    x = x + _as_py(bias_b[idx + (i,)])
                if activation == "relu":
                    x = 0.0 if x <= f32(relu_threshold) else x
                    x = min(x, f32(relu_upper_bound)) if not math.isnan(x) else x
                elif activation == "gelu":
                    # GELU acts on x / alpha; alpha scales its output (measured on the H100)
                    x = al * _py_gelu(x / al) * f32(gelu_scaling)
                out[idx + (i, j)] = _py_convert(x, out_dtype)
    return out


def _py_gelu(x: float) -> float:
    """The documented formula 0.5 x (1 + tanh(u)) = x / (1 + exp(-2u)) (no cancellation)."""
    if math.isnan(x):
        return x
    u = math.sqrt(2.0 / math.pi) * (x + 0.044715 * x * x * x)
    try:
        e = math.exp(-2.0 * u)
    except OverflowError:
        return math.copysign(0.0, x)
    return x / (1.0 + e)


def test_gelu_forms_agree():
    """The stable form equals 0.5 x (1 + tanh(u)) wherever the latter has no cancellation."""
    for x in np.linspace(-3, 8, 1001):
        u = math.sqrt(2.0 / math.pi) * (x + 0.044715 * x ** 3)
        assert _py_gelu(x) == pytest.approx(0.5 * x * (1 + math.tanh(u)), rel=1e-13, abs=1e-300)
    a = np.zeros((3, 4), F32)
    a[:, 0] = [-7.2, -30.0, -np.inf]
    b = np.zeros((4, 1), F32)
    b[0, 0] = 1
    d = ref.matmul(a, b, activation="gelu")[:, 0]
    assert -1e-15 < d[0] < 0 and d[1] == 0 and d[2] == 0  # tiny negative, not NaN


def _ulp_distance(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Distance in representable steps (same dtype), via the sorted-grid position; ints: |x - y|."""
    if x.dtype.kind == "i":
        return np.abs(x.astype(np.int64) - y.astype(np.int64))
    xf, yf = x.astype(np.float64), y.astype(np.float64)
    if x.dtype == F32:
        xi = x.view(np.int32).astype(np.int64)
        yi = y.view(np.int32).astype(np.int64)
        xi = np.where(xi < 0, -(xi & 0x7FFFFFFF), xi)
        yi = np.where(yi < 0, -(yi & 0x7FFFFFFF), yi)
        return np.where(xf == yf, 0, np.abs(xi - yi))
    vals, _ = _grid(x.dtype)
    pos = lambda v: np.sign(v) * np.searchsorted(vals, np.abs(v))  # noqa: E731
    return np.where(xf == yf, 0, np.abs(pos(xf) - pos(yf)))


def _assert_same(actual: np.ndarray, desired: np.ndarray, ulps: int = 0) -> None:
    assert actual.dtype == desired.dtype and actual.shape == desired.shape
    if actual.dtype.kind == "f" or actual.dtype in (BF16, E4M3, E5M2):
        with np.errstate(invalid="ignore"):
            a64, d64 = actual.astype(np.float64), desired.astype(np.float64)
        assert (np.isnan(a64) == np.isnan(d64)).all(), (actual, desired)
        fin = ~np.isnan(a64)
        if ulps == 0:
            np.testing.assert_array_equal(a64[fin], d64[fin])
            # signs of zeros too
            np.testing.assert_array_equal(np.signbit(a64[fin]), np.signbit(d64[fin]))
        else:
            assert (_ulp_distance(actual[fin], desired[fin]) <= ulps).all(), (actual, desired)
    else:
        np.testing.assert_array_equal(actual, desired)


# ------------------------------------------------------------------------------------------------
# strategies: dyadic data, so every float64 sum is exact and the two models must agree bit for bit
# ------------------------------------------------------------------------------------------------

def _values(draw, dt: np.dtype, shape) -> np.ndarray:
    n = int(np.prod(shape))
    if dt == I8:
        ints = draw(st.lists(st.integers(-128, 127), min_size=n, max_size=n))
        return np.array(ints, dtype=np.int8).reshape(shape)
    if dt == I32:
        ints = draw(st.lists(st.integers(-10**6, 10**6), min_size=n, max_size=n))
        return np.array(ints, dtype=np.int32).reshape(shape)
    ints = draw(st.lists(st.integers(-64, 64), min_size=n, max_size=n))
    return (np.array(ints, dtype=np.float64) / 8).astype(np.float32).astype(dt).reshape(shape)


SCALARS = [1.0, 0.5, -2.0, 0.1, 3.0, 1 / 3, 0.0]


@st.composite
def gemm_case(draw, combos=tuple(COMBOS)):
    in_dt, out_dt = draw(st.sampled_from(combos))
    m, k, n = draw(st.integers(1, 4)), 4 * draw(st.integers(1, 3)), draw(st.integers(1, 3))
    batch_a, batch_b = draw(st.sampled_from([((), ()), ((2,), ()), ((), (2,)), ((2,), (2,)),
                                             ((1,), (3,)), ((2, 1), (1, 2))]))
    a = ref.prune_2to4(_values(draw, in_dt, batch_a + (m, k)))
    b = _values(draw, in_dt, batch_b + (k, n))
    kw = {"out_dtype": out_dt}
    c = None
    if draw(st.booleans()):
        c = _values(draw, out_dt, draw(st.sampled_from([(), (1,)])) + (m, n))
        kw["beta"] = draw(st.sampled_from(SCALARS))
    vector = draw(st.booleans())
    if vector:
        kw["alpha"] = np.array(draw(st.lists(st.sampled_from(SCALARS), min_size=m, max_size=m)))
        if c is not None and draw(st.booleans()):
            kw["beta"] = np.array(draw(st.lists(st.sampled_from(SCALARS), min_size=m, max_size=m)))
    else:
        kw["alpha"] = draw(st.sampled_from(SCALARS))
    if draw(st.booleans()):
        bias_dt = F32 if out_dt in (I8, I32) else out_dt
        kw["bias"] = _values(draw, bias_dt, draw(st.sampled_from([(), (1,)])) + (m,))
    act = draw(st.sampled_from([None, "relu", "gelu"]))
    kw["activation"] = act
    if act == "relu":
        kw["relu_threshold"] = draw(st.sampled_from([0.0, 0.5, -1.0, 2.0]))
        kw["relu_upper_bound"] = draw(st.sampled_from([math.inf, 1.5, 6.0]))
    elif act == "gelu":
        kw["gelu_scaling"] = draw(st.sampled_from([1.0, 2.0, -0.5]))
        if np.any(np.asarray(kw["alpha"]) == 0):
            kw["alpha"] = np.where(np.asarray(kw["alpha"]) == 0, 1.0, kw["alpha"]) if vector else 1.0
    return a, b, c, kw


@settings(max_examples=1000, deadline=None)
@given(gemm_case())
def test_matmul_matches_python_loops(case):
    a, b, c, kw = case
    got = ref.matmul(a, b, c, **kw)
    want = _py_matmul(a, b, c, **kw)
    # GELU: numpy's and libm's tanh may differ in the last float64 bit, which can move D by one
    # step of its type when it lands on a rounding boundary; everything else is bit-exact.
    _assert_same(got, want, ulps=1 if kw.get("activation") == "gelu" else 0)


@settings(max_examples=300, deadline=None)
@given(st.sampled_from(COMBOS), st.integers(1, 3), st.integers(1, 3), st.integers(1, 3),
       st.data())
def test_matmul_plain_bit_exact_all_combos(combo, m, kg, n, data):
    """No epilogue: every combination, bit for bit against the loops (NaN-free dyadic data)."""
    in_dt, out_dt = combo
    a = _values(data.draw, in_dt, (m, 4 * kg))
    b = _values(data.draw, in_dt, (4 * kg, n))
    _assert_same(ref.matmul(a, b, out_dtype=out_dt), _py_matmul(a, b, out_dtype=out_dt))


# ------------------------------------------------------------------------------------------------
# int8 -> int32: exact, extremes, large K
# ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("k, av, bv", [
    (131064, -128, -128),   # 2147352576: just under 2**31 - 1
    (131064, 127, -128),
    (131064, 127, 127),
    (4096, -128, 127),
])
def test_int8_int32_exact_extremes(k, av, bv):
    a = np.full((2, k), av, dtype=np.int8)
    b = np.full((k, 3), bv, dtype=np.int8)
    b[:, 1] = -b[:, 1] if bv != -128 else 127
    d = ref.matmul(a, b)
    assert d.dtype == I32
    want0 = av * bv * k
    assert -2**31 <= want0 < 2**31
    assert (d[:, 0] == want0).all() and (d[:, 2] == want0).all()
    assert (d[:, 1] == av * int(b[0, 1]) * k).all()


def test_int8_int32_mixed_values_exact():
    rng = np.random.default_rng(7)
    a = ref.prune_2to4(rng.integers(-128, 128, (5, 4096)).astype(np.int8))
    b = rng.integers(-128, 128, (4096, 6)).astype(np.int8)
    want = a.astype(np.int64) @ b.astype(np.int64)
    np.testing.assert_array_equal(ref.matmul(a, b), want.astype(np.int32))


def test_int32_accumulator_wraps():
    """Assumed rule: the 32-bit accumulator wraps (2**31 -> -2**31)."""
    a = np.full((1, 131072), -128, dtype=np.int8)
    b = np.full((131072, 1), -128, dtype=np.int8)
    assert ref.matmul(a, b)[0, 0] == -2**31
    assert ref.matmul(a, b, alpha=0.5)[0, 0] == -2**30  # the epilogue sees the wrapped value


# ------------------------------------------------------------------------------------------------
# output conversion: rounding and saturation, pinned
# ------------------------------------------------------------------------------------------------

def _scaled_ones(in_dt, values, out_dt, **kw):
    """D[i, 0] = alpha[i] * 1 exactly: a way to feed chosen values to the output conversion."""
    m = len(values)
    a = np.zeros((m, 4), dtype=in_dt)
    a[:, 0] = np.array(1, dtype=np.float32).astype(in_dt)
    b = np.zeros((4, 1), dtype=in_dt)
    b[0, 0] = np.array(1, dtype=np.float32).astype(in_dt)
    return ref.matmul(a, b, alpha=np.array(values), out_dtype=out_dt, **kw)[:, 0]


def test_int8_output_rounding_and_saturation():
    got = _scaled_ones(I8, [127.5, -128.5, 2.5, 3.5, 1000, -1000, -2.5, 0.5, -0.5, 126.5], I8)
    np.testing.assert_array_equal(got, [127, -128, 2, 4, 127, -128, -2, 0, 0, 126])


def test_int32_output_rounding_and_saturation():
    got = _scaled_ones(I8, [0.5, 1.5, 2.5, -2.5, 3e9, -3e9, 2**31], I32)
    np.testing.assert_array_equal(got, [0, 2, 2, -2, 2**31 - 1, -2**31, 2**31 - 1])
    a = np.array([[3, 5, -3, 0]], dtype=np.int8).T.copy()  # (4, 1) rows: acc = 3, 5, -3, 0
    a = np.concatenate([a, np.zeros((4, 3), np.int8)], axis=1)
    b = np.zeros((4, 1), np.int8)
    b[0, 0] = 1
    np.testing.assert_array_equal(ref.matmul(a, b, alpha=0.5)[:, 0], [2, 2, -2, 0])


def test_int_output_nan_becomes_zero():
    """NaN reaches an int8 D only through the float epilogue, here a NaN bias (float32)."""
    a = np.ones((2, 4), np.int8)
    b = np.ones((4, 1), np.int8)
    d = ref.matmul(a, b, bias=np.array([np.nan, 1], np.float32), out_dtype=I8)
    np.testing.assert_array_equal(d[:, 0], [0, 5])


def test_fp16_overflow():
    got = _scaled_ones(F16, [65504.0, 65519.0, 65520.0, -65520.0, 1e6], F16)
    np.testing.assert_array_equal(got.astype(np.float64), [65504, 65504, np.inf, -np.inf, np.inf])


def test_bf16_single_rounding_and_ties():
    # 1 + 2**-8 + 2**-40 is just above the half-way point: one correct rounding goes up (a detour
    # through float32 would land on the tie and go to even, i.e. down to 1)
    a = np.array([[1.0, 2.0**-8, 2.0**-40, 0.0]], dtype=np.float32).astype(BF16)
    b = np.ones((4, 1), dtype=BF16)
    assert float(ref.matmul(a, b)[0, 0]) == 1 + 2**-7
    got = _scaled_ones(BF16, [1 + 2**-8, 1 + 3 * 2**-8], BF16)  # exact ties: to even
    np.testing.assert_array_equal(got.astype(np.float64), [1.0, 1 + 2**-6])


@pytest.mark.parametrize("dt, big", [(E4M3, 448.0), (E5M2, 57344.0)])
def test_fp8_output_saturates(dt, big):
    """FP8 D is no combination matmul offers (pycusparselt.types); its conversion rule still saturates."""
    got = ref.semantics.convert_output(np.array([big, big * 1.1, big * 2, -big * 2, 1e30, -1e30, np.inf]), dt)
    np.testing.assert_array_equal(got.astype(np.float64), [big, big, big, -big, big, -big, big])
    # the same values into fp16 D overflow to inf when beyond fp16's range
    f16 = _scaled_ones(dt, [1e30], F16)
    assert np.isinf(f16.astype(np.float64)).all()


def test_fp8_nan_and_inf_inputs():
    a = np.zeros((3, 4), dtype=E5M2)
    a[0, 0], a[1, 0], a[2, 0] = np.inf, -np.inf, np.nan
    b = np.zeros((4, 1), dtype=E5M2)
    b[0, 0] = 1
    d = ref.matmul(a, b).astype(np.float64)[:, 0]  # float16 D (the default): infinities stay, NaN stays
    assert d[0] == np.inf and d[1] == -np.inf and np.isnan(d[2])
    d32 = ref.matmul(a, b, out_dtype=F32)[:, 0]
    assert d32[0] == np.inf and d32[1] == -np.inf and np.isnan(d32[2])
    e4 = np.zeros((1, 4), E4M3)
    e4[0, 0] = np.nan
    assert np.isnan(ref.matmul(e4, np.ones((4, 1), E4M3)).astype(np.float64)[0, 0])


def test_fp8_output_ties():
    # e4m3 steps by 1/8 just above 1: 1 + 1/16 is a tie (to even: 1.0); 2**-9 more rounds up
    def to_e4m3(x):
        return float(ref.semantics.convert_output(np.array([x]), E4M3)[0])

    assert to_e4m3(1.0 + 0.0625) == 1.0
    assert to_e4m3(1.0 + 0.0625 + 2.0**-9) == 1.125
    assert to_e4m3(1.125 + 0.0625) == 1.25  # tie between 1.125 (odd) and 1.25


# ------------------------------------------------------------------------------------------------
# epilogue rules, pinned
# ------------------------------------------------------------------------------------------------

def _column(values, dt=F32):
    """A (M, 4) with values in column 0 and B picking it: A @ B is ``values`` as a column."""
    values = np.asarray(values, dtype=np.float64)
    a = np.zeros((len(values), 4), dtype=dt)
    a[:, 0] = values.astype(np.float32).astype(dt)
    b = np.zeros((4, 1), dtype=dt)
    b[0, 0] = 1
    return a, b


def test_relu_threshold_and_upper_bound():
    a, b = _column([-1, 0, 0.5, 0.75, 1, 2, 10, np.nan])
    d = ref.matmul(a, b, activation="relu", relu_threshold=0.5, relu_upper_bound=6)[:, 0]
    np.testing.assert_array_equal(d, [0, 0, 0, 0.75, 1, 2, 6, np.nan])
    d0 = ref.matmul(a, b, activation="relu")[:, 0]
    np.testing.assert_array_equal(d0, [0, 0, 0.5, 0.75, 1, 2, 10, np.nan])


def test_gelu_is_tanh_approximation_with_output_scaling():
    a, b = _column([1.0, -1.0, 3.0, -10.0, 0.0, np.nan])
    d = ref.matmul(a, b, activation="gelu")[:, 0].astype(np.float64)
    # tanh form: gelu(1) = 0.841192; the erf form would give 0.841345 (distinguishable in float32)
    np.testing.assert_allclose(d[:5], [0.8411919906082768, -0.15880800939172324,
                                       2.9963626384625795, -0.0, 0.0], rtol=2**-23, atol=1e-30)
    assert np.isnan(d[5])
    d2 = ref.matmul(a, b, activation="gelu", gelu_scaling=2.0)[:, 0].astype(np.float64)
    np.testing.assert_allclose(d2[:3], 2 * d[:3], rtol=2**-23)  # scales the output, not the input
    assert abs(d2[0] - 1.9545976940) > 0.1


def test_alpha_vector_and_bias_index_rows():
    a = np.eye(3, 4, dtype=np.float32)
    b = np.arange(8, dtype=np.float32).reshape(4, 2)  # rows of A @ B: [0,1], [2,3], [4,5]
    d = ref.matmul(a, b, alpha=np.array([1.0, 2.0, 3.0]), bias=np.array([10, 20, 30], np.float32))
    np.testing.assert_array_equal(d, [[10, 11], [24, 26], [42, 45]])
    c = np.ones((3, 2), np.float32)
    d = ref.matmul(a, b, c, alpha=np.array([1.0, 1, 1]), beta=np.array([0.0, 1.0, -1.0]))
    np.testing.assert_array_equal(d, [[0, 1], [3, 4], [3, 4]])


def test_batched_bias_and_broadcasting():
    a = np.stack([np.eye(2, 4, dtype=np.float16), 2 * np.eye(2, 4, dtype=np.float16)])  # (2,2,4)
    b = np.ones((1, 4, 3), np.float16)
    bias = np.array([[1, 2], [3, 4]], dtype=np.float16)  # (batch, M)
    d = ref.matmul(a, b, bias=bias)
    assert d.shape == (2, 2, 3)
    np.testing.assert_array_equal(d[0], [[2] * 3, [3] * 3])
    np.testing.assert_array_equal(d[1], [[5] * 3, [6] * 3])
    d_shared = ref.matmul(a, b, bias=np.array([1, 2], np.float16))
    np.testing.assert_array_equal(d_shared[1], [[3] * 3, [4] * 3])


def test_scalars_are_float32():
    a, b = _column([1.0])
    d = ref.matmul(a, b, alpha=0.1)[0, 0]
    assert d == np.float32(0.1)
    d64 = ref.matmul(a.astype(np.float32), b, alpha=1 + 2**-30)[0, 0]
    assert d64 == 1.0  # 1 + 2**-30 is 1.0 in float32


def test_beta_zero_does_not_read_c():
    a, b = _column([1.0, 2.0])
    c = np.array([[np.nan], [np.inf]], np.float32)
    np.testing.assert_array_equal(ref.matmul(a, b, c, beta=0.0)[:, 0], [1, 2])
    assert np.isnan(ref.matmul(a, b, c, beta=1.0)[0, 0])


def test_default_out_dtypes():
    for in_dt, want in [(F16, F16), (BF16, BF16), (F32, F32), (I8, I32), (E4M3, F16),
                        (E5M2, F16)]:
        a = np.zeros((2, 4), in_dt)
        assert ref.matmul(a, np.zeros((4, 2), in_dt)).dtype == want
    c = np.zeros((2, 2), BF16)
    assert ref.matmul(np.zeros((2, 4), E4M3), np.zeros((4, 2), E4M3), c).dtype == BF16


# ------------------------------------------------------------------------------------------------
# errors
# ------------------------------------------------------------------------------------------------

def test_bad_type_combination_lists_valid():
    with pytest.raises(TypeError, match=r"A/B float16 with C/D int8; cuSPARSELt supports "
                                        r"float16 -> float16; .*int8 -> int32, int8, float16, "
                                        r"bfloat16; float8_e4m3fn -> float16, bfloat16, float32"):
        ref.matmul(np.zeros((2, 4), F16), np.zeros((4, 2), F16), out_dtype=np.int8)
    with pytest.raises(TypeError, match="A/B float8_e4m3fn with C/D float8_e5m2"):
        ref.matmul(np.zeros((2, 4), E4M3), np.zeros((4, 2), E4M3), out_dtype=E5M2)
    with pytest.raises(TypeError, match="a and b must have the same dtype"):
        ref.matmul(np.zeros((2, 4), E4M3), np.zeros((4, 2), E5M2))
    with pytest.raises(TypeError, match="b: unsupported dtype float64"):
        ref.matmul(np.zeros((2, 4), F16), np.zeros((4, 2)))
    with pytest.raises(TypeError, match="c has dtype float32 but out_dtype is float16"):
        ref.matmul(np.zeros((2, 4), E4M3), np.zeros((4, 2), E4M3), np.zeros((2, 2), F32),
                   out_dtype=F16)
    with pytest.raises(TypeError, match="bias must have dtype float32 for A/B int8"):
        ref.matmul(np.zeros((2, 4), I8), np.zeros((4, 2), I8), bias=np.zeros(2, I32))
    with pytest.raises(TypeError, match="bias must have dtype float16"):
        ref.matmul(np.zeros((2, 4), F16), np.zeros((4, 2), F16), bias=np.zeros(2, F32))


@pytest.mark.parametrize("args, kw, pattern", [
    (((2, 4), (8, 2)), {}, r"inner dimensions differ: a is \(\.\.\., M, K\) = \(2, 4\), b is "
                           r"\(\.\.\., K, N\) = \(8, 2\)"),
    (((4,), (4, 2)), {}, "must be matrices"),
    (((2, 4), (4, 2), (2, 3)), {"beta": 1.0},
     r"c must have shape \(\.\.\., M, N\) = \(\.\.\., 2, 2\)"),
    (((2, 4), (4, 2)), {"bias": (3,)}, r"bias must have shape \(M,\) or \(batch, M\) with M=2"),
    (((2, 4), (4, 2)), {"alpha": [1.0, 2.0, 3.0]},
     r"alpha must be a scalar or a vector of length M=2"),
    (((2, 4), (4, 2), (2, 2)), {"beta": [1.0, 2.0]}, "a vector beta needs a vector alpha"),
    (((2, 4), (4, 2)), {"beta": 1.0}, "beta is non-zero but c is None"),
    (((2, 2, 4), (3, 4, 2)), {},
     r"batch dimensions do not broadcast: a \(2, 2, 4\), b \(3, 4, 2\)"),
    (((2, 4), (4, 2)), {"activation": "tanh"}, "activation must be None, 'relu' or 'gelu'"),
    (((2, 4), (4, 2)), {"relu_threshold": 1.0}, "need activation='relu'"),
    (((2, 4), (4, 2)), {"gelu_scaling": 2.0, "activation": "relu"}, "needs activation='gelu'"),
])
def test_shape_and_argument_errors(args, kw, pattern):
    arrays = [np.zeros(s, F16) for s in args]
    if "bias" in kw:
        kw = dict(kw, bias=np.zeros(kw["bias"], F16))
    with pytest.raises(ValueError, match=pattern):
        ref.matmul(*arrays, **kw)
