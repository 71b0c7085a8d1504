"""The reference's tolerance model: simulated GPU arithmetic passes, wrong answers fail (CPU).

The "GPU" here is a NumPy simulation of what the hardware does: float32 (or float16 for compute
16F, integer for int8) accumulation in a chosen order with round-to-nearest or truncating adds,
TF32 input rounding, a float32 epilogue and a single rounding of the float32 result to D's type.
"""

from __future__ import annotations

import math
import pathlib

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
DOCS = pathlib.Path(__file__).resolve().parents[2] / "docs" / "reference.rst"


# ------------------------------------------------------------------------------------------------
# a simulated GPU
# ------------------------------------------------------------------------------------------------

def _tf32(x: np.ndarray, mode: str) -> np.ndarray:
    """float32 -> TF32 (10 explicit mantissa bits), truncating or rounding to nearest even."""
    bits = x.astype(np.float32).view(np.uint32).astype(np.uint64)
    if mode == "rn":
        bits = bits + 0xFFF + ((bits >> 13) & 1)
    return (bits & 0xFFFFE000).astype(np.uint32).view(np.float32)


def _add_rz32(acc: np.ndarray, term: np.ndarray) -> np.ndarray:
    """float32 addition rounding toward zero (as Tensor Core adders do)."""
    exact = acc.astype(np.float64) + term.astype(np.float64)  # exact for these magnitudes
    r = exact.astype(np.float32)
    away = np.abs(r.astype(np.float64)) > np.abs(exact)
    return np.where(away, np.nextafter(r, np.float32(0)), r)


def _simulate(a, b, c=None, *, compute=None, mode="rn", order="forward", alpha=1.0, beta=0.0,
              bias=None, activation=None, out_dtype=None, relu_threshold=0.0,
              relu_upper_bound=math.inf, gelu_scaling=1.0):
    in_dt = a.dtype
    out_dt = np.dtype(out_dtype) if out_dtype is not None else (
        c.dtype if c is not None else (in_dt if in_dt != I8 else I32))
    compute = compute or ref.DEFAULT_COMPUTE[in_dt][0]
    k = a.shape[-1]
    ks = range(k) if order == "forward" else range(k - 1, -1, -1)
    if in_dt == I8:
        acc64 = a.astype(np.int64) @ b.astype(np.int64)
        acc = ((acc64 + 2**31) % 2**32 - 2**31).astype(np.int32)
        if out_dt == I32 and np.ndim(alpha) == 0 and alpha == 1.0 and beta == 0.0 \
                and bias is None and activation is None:
            return acc
        accf = acc.astype(np.float32)
    else:
        a32, b32 = a.astype(np.float32), b.astype(np.float32)
        if in_dt == F32:
            a32, b32 = _tf32(a32, mode), _tf32(b32, mode)
        acc_t = np.float16 if compute == "16F" else np.float32
        accf = np.zeros(np.broadcast_shapes(a.shape[:-1] + (1,), b.shape[:-2] + (1, b.shape[-1])),
                        dtype=acc_t)
        for kk in ks:
            term = (a32[..., :, kk:kk + 1] * b32[..., kk:kk + 1, :]).astype(acc_t)
            if mode == "rz" and acc_t == np.float32:
                accf = _add_rz32(accf, term)
            else:
                accf = (accf + term).astype(acc_t)
        accf = accf.astype(np.float32)
    f32 = np.float32
    al = np.asarray(alpha, dtype=np.float32)
    al = al[:, None] if al.ndim else al
    x = al * accf
    if c is not None and (np.ndim(beta) or beta != 0):
        be = np.asarray(beta, dtype=np.float32)
        be = be[:, None] if be.ndim else be
        x = x + be * c.astype(np.float32)
    if bias is not None:
        x = x + bias.astype(np.float32)[..., :, None]
    x = x.astype(np.float32)
    if activation == "relu":
        x = np.minimum(np.where(x <= f32(relu_threshold), f32(0), x), f32(relu_upper_bound))
    elif activation == "gelu":
        z = (x / al).astype(np.float32)  # GELU acts on x / alpha; alpha scales its output
        inner = f32(math.sqrt(2 / math.pi)) * (z + f32(0.044715) * z * z * z)
        x = (al * (f32(0.5) * z * (f32(1) + np.tanh(inner))) * f32(gelu_scaling)).astype(np.float32)
    if out_dt in (I8, I32):
        info = np.iinfo(out_dt)
        r = np.clip(np.rint(x.astype(np.float64)), info.min, info.max)
        return np.where(np.isnan(r), 0, r).astype(out_dt)
    if out_dt in (E4M3, E5M2):
        top = 448.0 if out_dt == E4M3 else 57344.0
        x = np.clip(x, -top, top)
    with np.errstate(over="ignore"):
        return x.astype(out_dt)  # from float32: one rounding, as the GPU converts


# ------------------------------------------------------------------------------------------------
# data
# ------------------------------------------------------------------------------------------------

def _random(rng, dt, shape, scale=1.0):
    if dt == I8:
        return rng.integers(-128, 128, shape).astype(np.int8)
    if dt == I32:
        return rng.integers(-10**6, 10**6, shape).astype(np.int32)
    x = rng.standard_normal(shape) * scale
    return x.astype(np.float32).astype(dt)


def _small_ints(rng, dt, shape):
    return rng.integers(-3, 4, shape).astype(np.float32).astype(dt) if dt != I8 else \
        rng.integers(-3, 4, shape).astype(np.int8)


@st.composite
def sim_case(draw):
    in_dt, out_dt = draw(st.sampled_from(COMBOS))
    compute = draw(st.sampled_from(ref.DEFAULT_COMPUTE[in_dt]))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    m, n = draw(st.integers(1, 8)), draw(st.integers(1, 8))
    k = draw(st.sampled_from([16, 64, 256]))
    scale = draw(st.sampled_from([1.0, 1e-3, 30.0])) if in_dt != I8 else 1.0
    if compute == "16F":
        scale = min(scale, 1.0)  # keep fp16 accumulation away from overflow
    a = ref.prune_2to4(_random(rng, in_dt, (m, k), scale))
    b = _random(rng, in_dt, (k, n), scale)
    kw = {"out_dtype": out_dt}
    c = None
    if draw(st.booleans()):
        c = _random(rng, out_dt, (m, n))
        kw["beta"] = draw(st.sampled_from([1.0, -0.5, 0.3]))
    if draw(st.booleans()):
        kw["alpha"] = draw(st.sampled_from([1.0, 0.7, -2.0, 1e-2]))
    if draw(st.booleans()):
        bias_dt = F32 if out_dt in (I8, I32) else out_dt
        kw["bias"] = _random(rng, bias_dt, (m,))
    act = draw(st.sampled_from([None, "relu", "gelu"]))
    kw["activation"] = act
    if act == "relu":
        kw["relu_threshold"] = draw(st.sampled_from([0.0, 0.3]))
        kw["relu_upper_bound"] = draw(st.sampled_from([math.inf, 2.0]))
    if act == "gelu":
        kw["gelu_scaling"] = draw(st.sampled_from([1.0, 0.5]))
    mode = draw(st.sampled_from(["rn", "rz"]))
    order = draw(st.sampled_from(["forward", "reverse"]))
    return a, b, c, kw, compute, mode, order


# ------------------------------------------------------------------------------------------------
# correct results pass
# ------------------------------------------------------------------------------------------------

@settings(max_examples=800, deadline=None)
@given(sim_case())
def test_simulated_gpu_passes(case):
    a, b, c, kw, compute, mode, order = case
    gpu = _simulate(a, b, c, compute=compute, mode=mode, order=order, **kw)
    desired = ref.matmul(a, b, c, **kw)
    ref.assert_close(gpu, desired, a=a, b=b, c=c, compute=compute, **kw)


@pytest.mark.parametrize("in_dt, out_dt", COMBOS)
def test_simulated_gpu_passes_large_k(in_dt, out_dt):
    rng = np.random.default_rng(3)
    a = ref.prune_2to4(_random(rng, in_dt, (8, 2048)))
    b = _random(rng, in_dt, (2048, 8))
    for mode in ("rn", "rz"):
        gpu = _simulate(a, b, mode=mode, out_dtype=out_dt)
        ref.assert_close(gpu, ref.matmul(a, b, out_dtype=out_dt), a=a, b=b, out_dtype=out_dt)


def test_double_rounding_on_gpu_is_allowed():
    """The GPU rounds the sum to float32, then to bfloat16 (1.0); the reference rounds once
    (1 + 2**-7): both are within the bounds."""
    a = np.array([[1.0, 2.0**-8, 2.0**-40, 0.0]], dtype=np.float32).astype(BF16)
    b = np.ones((4, 1), dtype=BF16)
    gpu = _simulate(a, b)
    desired = ref.matmul(a, b)
    assert float(gpu[0, 0]) == 1.0 and float(desired[0, 0]) == 1 + 2**-7
    ref.assert_close(gpu, desired, a=a, b=b)


# ------------------------------------------------------------------------------------------------
# wrong results fail
# ------------------------------------------------------------------------------------------------

def _next_up(x: np.ndarray, idx) -> np.ndarray:
    """x with element idx moved one representable step up."""
    y = x.copy()
    if y.dtype.kind == "i":
        y[idx] += 1
        return y
    bits = y.view(UINT[y.dtype.itemsize])
    v = float(y[idx])
    if v > 0:
        bits[idx] += 1
    elif v < 0:
        bits[idx] -= 1
    else:
        bits[idx] = 1
    return y


@pytest.mark.parametrize("in_dt, out_dt", COMBOS)
def test_exact_data_has_zero_width_and_one_step_fails(in_dt, out_dt):
    """Small integers: the accumulation is exact on any hardware, so the allowed range is D's own
    rounding of the exact value; a result one step off fails."""
    rng = np.random.default_rng(11)
    a = ref.prune_2to4(_small_ints(rng, in_dt, (6, 64)))
    b = _small_ints(rng, in_dt, (64, 5))
    desired = ref.matmul(a, b, out_dtype=out_dt)
    lo, hi = ref.matmul_bounds(a, b, out_dtype=out_dt)
    np.testing.assert_array_equal(lo.astype(np.float64), desired.astype(np.float64))
    np.testing.assert_array_equal(hi.astype(np.float64), desired.astype(np.float64))
    gpu = _simulate(a, b, out_dtype=out_dt)
    ref.assert_close(gpu, desired, a=a, b=b, out_dtype=out_dt)
    for idx in [(0, 0), (5, 4), (2, 3)]:
        with pytest.raises(AssertionError, match=r"1 of 30 elements outside the allowed range"):
            ref.assert_close(_next_up(gpu, idx), desired, a=a, b=b, out_dtype=out_dt)


@pytest.mark.parametrize("in_dt, out_dt", COMBOS)
def test_lost_product_fails(in_dt, out_dt):
    """A GPU that dropped one product (wrong metadata, say) is caught on exact data."""
    rng = np.random.default_rng(5)
    a = ref.prune_2to4(_small_ints(rng, in_dt, (4, 32)))
    a[1, :] = np.array(0, np.float32).astype(in_dt)
    a[1, 4] = np.array(3, np.float32).astype(in_dt)  # row 1 = one product: 3 * b[4, :]
    b = _small_ints(rng, in_dt, (32, 4))
    b[4, :] = np.array(2, np.float32).astype(in_dt)
    desired = ref.matmul(a, b, out_dtype=out_dt)
    wrong_a = a.copy()
    wrong_a[1, 4] = np.array(0, np.float32).astype(in_dt)
    wrong = _simulate(wrong_a, b, out_dtype=out_dt)
    with pytest.raises(AssertionError, match=r"(?s)4 of 16 elements outside.*D\(1, "):
        ref.assert_close(wrong, desired, a=a, b=b, out_dtype=out_dt)


def test_transposed_or_swapped_rows_fail_on_random_data():
    rng = np.random.default_rng(9)
    a = ref.prune_2to4(_random(rng, F16, (16, 256)))
    b = _random(rng, F16, (256, 16))
    desired = ref.matmul(a, b)
    gpu = _simulate(a, b)
    ref.assert_close(gpu, desired, a=a, b=b)
    with pytest.raises(AssertionError):
        ref.assert_close(gpu[::-1].copy(), desired, a=a, b=b)
    with pytest.raises(AssertionError):
        ref.assert_close(gpu.T.copy(), desired, a=a, b=b)
    dense = _random(np.random.default_rng(9), F16, (16, 256))  # the unpruned A
    with pytest.raises(AssertionError):
        ref.assert_close(_simulate(dense, b), desired, a=a, b=b)


def test_nan_mismatches_fail():
    a = np.eye(2, 4, dtype=np.float16)
    b = np.ones((4, 2), np.float16)
    desired = ref.matmul(a, b)
    bad = desired.copy()
    bad[0, 0] = np.nan
    with pytest.raises(AssertionError, match="actual nan"):
        ref.assert_close(bad, desired, a=a, b=b)
    a_nan = a.copy()
    a_nan[0, 0] = np.nan
    d_nan = ref.matmul(a_nan, b)
    ref.assert_close(d_nan.copy(), d_nan, a=a_nan, b=b)
    with pytest.raises(AssertionError, match=r"2 of 4 elements"):
        ref.assert_close(desired, d_nan, a=a_nan, b=b)


def test_int8_int32_off_by_one_fails():
    rng = np.random.default_rng(1)
    a = ref.prune_2to4(_random(rng, I8, (4, 4096)))
    b = _random(rng, I8, (4096, 4))
    desired = ref.matmul(a, b)
    lo, hi = ref.matmul_bounds(a, b)
    np.testing.assert_array_equal(lo, desired)
    np.testing.assert_array_equal(hi, desired)
    ref.assert_close(desired.copy(), desired, a=a, b=b)
    with pytest.raises(AssertionError, match=r"D\(2, 1\): actual"):
        ref.assert_close(_next_up(desired, (2, 1)), desired, a=a, b=b)


def test_int8_epilogue_rounding_boundary():
    """int8 D with a float epilogue: exactly at a half-integer the GPU may round either way only
    if its float32 epilogue can land on the other side; 2.5 * 1 is exact, so only 2 passes."""
    a = np.zeros((1, 4), np.int8)
    a[0, 0] = 1
    b = np.zeros((4, 1), np.int8)
    b[0, 0] = 5
    desired = ref.matmul(a, b, alpha=0.5, out_dtype=I8)
    assert desired[0, 0] == 2
    lo, hi = ref.matmul_bounds(a, b, alpha=0.5, out_dtype=I8)
    assert lo[0, 0] == hi[0, 0] == 2  # 2.5 exactly: float32 has no error here but the rule allows
    with pytest.raises(AssertionError):
        ref.assert_close(np.array([[3]], np.int8), desired, a=a, b=b, alpha=0.5, out_dtype=I8)


def test_shape_dtype_and_consistency_checks():
    a = np.eye(2, 4, dtype=np.float16)
    b = np.ones((4, 2), np.float16)
    desired = ref.matmul(a, b)
    with pytest.raises(AssertionError, match="dtype mismatch"):
        ref.assert_close(desired.astype(np.float32), desired, a=a, b=b)
    with pytest.raises(AssertionError, match="shape mismatch"):
        ref.assert_close(desired[:1], desired, a=a, b=b)
    with pytest.raises(ValueError, match="desired is not reference.matmul"):
        ref.assert_close(desired, ref.matmul(a, b, alpha=2.0), a=a, b=b)
    with pytest.raises(TypeError, match="unexpected keyword argument"):
        ref.assert_close(desired, desired, a=a, b=b, alpha=1.0, relu=True)


# ------------------------------------------------------------------------------------------------
# the bounds themselves
# ------------------------------------------------------------------------------------------------

def test_bounds_width_follows_the_model():
    """Random fp16 data, K = 1024: the allowed range is D's rounding of [x - E, x + E] with
    E = K * 2**-23 * (|A| @ |B|)."""
    rng = np.random.default_rng(2)
    a = ref.prune_2to4(_random(rng, F16, (32, 1024)))
    b = _random(rng, F16, (1024, 32))
    lo, hi = ref.matmul_bounds(a, b)
    x = a.astype(np.float64) @ b.astype(np.float64)
    e = 1024 * 2.0**-23 * (np.abs(a.astype(np.float64)) @ np.abs(b.astype(np.float64)))
    assert (lo.astype(np.float64) <= x).all() and (x <= hi.astype(np.float64)).all()
    want_lo = (x - e).astype(np.float16)  # numpy rounds float64 -> float16 once, like the model
    want_hi = (x + e).astype(np.float16)
    np.testing.assert_array_equal(lo, want_lo)
    np.testing.assert_array_equal(hi, want_hi)
    assert (hi != lo).any()


def test_relu_bounds_span_the_threshold_jump():
    """Where x is within the error radius of the threshold, both 0 and about the threshold are
    allowed; away from it, only the ReLU of the range."""
    rng = np.random.default_rng(6)
    a = ref.prune_2to4(_random(rng, F16, (2, 256)))
    b = _random(rng, F16, (256, 1))
    x = a.astype(np.float64) @ b.astype(np.float64)
    t = float(np.float32(x[0, 0]))
    lo, hi = ref.matmul_bounds(a, b, activation="relu", relu_threshold=t)
    t16 = float(np.float16(t))
    assert float(lo[0, 0]) <= min(0.0, t16) and float(hi[0, 0]) >= max(0.0, t16)
    assert float(hi[0, 0]) - float(lo[0, 0]) <= abs(t16) * (1 + 2**-9)  # and not much more
    # row 1 is far from the threshold: ordinary (narrow) range
    lo1, hi1 = ref.matmul_bounds(a, b, activation="relu", relu_threshold=float(x[1, 0]) - 1.0)
    for v in (lo1[1, 0], hi1[1, 0]):
        assert abs(float(v) - x[1, 0]) <= 2**-10 * abs(x[1, 0])


def test_gelu_bounds_cover_float32_tanh():
    rng = np.random.default_rng(4)
    a = ref.prune_2to4(_random(rng, BF16, (16, 64)))
    b = _random(rng, BF16, (64, 16))
    for scaling in (1.0, -2.0):
        gpu = _simulate(a, b, activation="gelu", gelu_scaling=scaling)
        ref.assert_close(gpu, ref.matmul(a, b, activation="gelu", gelu_scaling=scaling), a=a, b=b,
                         activation="gelu", gelu_scaling=scaling)


def test_matmul_tolerance_values():
    t = ref.matmul_tolerance(F16, F16, 1024)
    assert (t.compute, t.acc_bits, t.acc_rel, t.input_rel, t.rtol) == ("32F", 24, 2.0**-13, 0.0,
                                                                        2.0**-10)
    assert t.atol_scale == 2.0**-13 and not t.exact
    t16 = ref.matmul_tolerance(F16, F16, 1024, compute="16F")
    assert t16.acc_rel == 1024 * 2.0**-10 and t16.epilogue_unit == 2.0**-11
    tf = ref.matmul_tolerance(F32, F32, 8)
    assert tf.input_rel == 2 * 2.0**-10 + 2.0**-20 and tf.out_roundoff == 2.0**-24
    ti = ref.matmul_tolerance(I8, I32, 10**6)
    assert ti.exact and ti.acc_rel == 0 and ti.rtol == 0
    assert ref.matmul_tolerance(E4M3, BF16, 64).out_roundoff == 2.0**-8
    with pytest.raises(TypeError, match="unsupported type combination"):  # no FP8 D (pycusparselt.types)
        ref.matmul_tolerance(E5M2, E5M2, 64)
    with pytest.raises(TypeError, match="compute type '16F' is not valid for A/B bfloat16"):
        ref.matmul_tolerance(BF16, BF16, 64, compute="16F")
    with pytest.raises(TypeError, match="A/B int8 with C/D float32"):
        ref.matmul_tolerance(I8, F32, 64)
    with pytest.raises(ValueError, match="k must be >= 0"):
        ref.matmul_tolerance(F16, F16, -1)


# ------------------------------------------------------------------------------------------------
# the output conversion against brute force over every value of the type
# ------------------------------------------------------------------------------------------------

def _all_values(dt):
    bits = np.arange(2 ** (8 * dt.itemsize), dtype=UINT[dt.itemsize])
    with np.errstate(invalid="ignore"):
        v = bits.view(dt).astype(np.float64)
    keep = np.isfinite(v)
    return v[keep], bits[keep]


@pytest.mark.parametrize("dt", [F16, BF16, E4M3, E5M2])
def test_conversion_is_correct_rounding(dt):
    """Every midpoint between neighbours (ties to even), and points just either side of it."""
    vals, bits = _all_values(dt)
    pos = vals >= 0
    v, bt = vals[pos], bits[pos]
    order = np.argsort(v, kind="stable")
    v, bt = v[order], bt[order]
    v, idx = np.unique(v, return_index=True)  # drop -0/+0 duplicates
    bt = bt[idx]
    mid = (v[:-1] + v[1:]) / 2
    even_up = (bt[1:] % 2) == 0
    tie = np.where(even_up, v[1:], v[:-1])
    for sgn in (1.0, -1.0):
        got_mid = ref.semantics.convert_output(sgn * mid, dt).astype(np.float64)
        np.testing.assert_array_equal(got_mid, sgn * tie)
        below = np.nextafter(mid, 0)
        above = np.nextafter(mid, np.inf)
        np.testing.assert_array_equal(ref.semantics.convert_output(sgn * below, dt).astype(np.float64),
                                      sgn * v[:-1])
        np.testing.assert_array_equal(ref.semantics.convert_output(sgn * above, dt).astype(np.float64),
                                      sgn * v[1:])


@settings(max_examples=1000, deadline=None)
@given(st.floats(allow_nan=True, allow_infinity=True, width=64),
       st.sampled_from([F16, BF16, F32, E4M3, E5M2, I8, I32]))
def test_conversion_nearest(x, dt):
    got = ref.semantics.convert_output(np.array([x]), dt)[0]
    if dt in (I8, I32):
        info = np.iinfo(dt)
        want = 0 if math.isnan(x) else max(info.min, min(info.max, round(x) if math.isfinite(x)
                                                         else (info.max if x > 0 else info.min)))
        assert int(got) == want
        return
    g = float(got)
    if math.isnan(x):
        assert math.isnan(g)
        return
    top = {F16: 65504.0, BF16: float(ml_dtypes.finfo(BF16).max),
           F32: float(np.finfo(np.float32).max), E4M3: 448.0, E5M2: 57344.0}[dt]
    if dt in (E4M3, E5M2):
        xs = max(-top, min(top, x))
        assert abs(g) <= top
    else:
        xs = x
    if math.isinf(g):
        assert dt not in (E4M3, E5M2) and abs(x) > top
        assert math.copysign(1, g) == math.copysign(1, x)
        return
    if dt == F32:
        with np.errstate(over="ignore"):
            assert g == float(np.float32(x))  # the hardware conversion is correctly rounded
        return
    vals, _ = _all_values(dt)
    err = abs(g - xs)
    assert err <= np.min(np.abs(vals - xs))  # nothing representable is closer


# ------------------------------------------------------------------------------------------------
# the semantics table and the documentation
# ------------------------------------------------------------------------------------------------

def test_semantics_table_names_real_functions():
    parts = (ref.sparsity, ref.semantics, ref.tolerance, ref.elements)
    for key, rule in ref.SEMANTICS.items():
        assert any(hasattr(part, rule.function) for part in parts), (key, rule.function)
        assert rule.established and rule.rule


def test_docs_quote_every_rule():
    text = DOCS.read_text(encoding="utf-8")
    for key in ref.SEMANTICS:
        assert f"``{key}``" in text, f"docs/reference.rst does not mention rule {key!r}"
    assert ".. automodule:: pycusparselt.reference" in text
