"""Quantization utilities on the CPU: round-trip bounds, rounding rules, 2:4 preservation, calibration."""

from __future__ import annotations

import ml_dtypes
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from pycusparselt.nn import quantization as q
from pycusparselt import reference

E4M3, E5M2 = np.dtype(ml_dtypes.float8_e4m3fn), np.dtype(ml_dtypes.float8_e5m2)


def _spread(rng, shape, dtype=np.float32):
    """Values over many binades, both signs."""
    return (rng.standard_normal(shape) * 10.0 ** rng.integers(-3, 3, size=shape)).astype(dtype)


# -- quantize / dequantize -------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [np.float16, ml_dtypes.bfloat16, np.float32])
def test_int8_round_trip_is_within_half_a_step(dtype):
    rng = np.random.default_rng(0)
    x = _spread(rng, (64, 48), dtype)
    scale = float(np.abs(x.astype(np.float32)).max()) / 127
    values = q.quantize(x, scale)
    assert values.dtype == np.int8 and values.shape == x.shape
    assert values.min() >= -127 and values.max() <= 127
    err = np.abs(q.dequantize(values, scale).astype(np.float64) - x.astype(np.float64))
    assert err.max() <= 0.5 * scale * (1 + 2**-20)
    assert np.abs(values).max() == 127  # the largest magnitude maps to qmax


@pytest.mark.parametrize("dtype", [np.float16, ml_dtypes.bfloat16, np.float32])
def test_nan_and_infinity_have_one_documented_result(dtype):
    x = np.array([np.nan, -np.nan, np.inf, -np.inf, 1.0], dtype=dtype)
    assert q.quantize(x, 0.5, "int8").tolist() == [0, 0, 127, -127, 2]
    for fmt, dt in (("e4m3", E4M3), ("e5m2", E5M2)):
        y = q.quantize(x, 0.5, fmt).astype(np.float32)
        largest = float(ml_dtypes.finfo(dt).max)
        assert np.isnan(y[:2]).all() and y[2:].tolist() == [largest, -largest, 2.0]


def test_int8_rounds_half_to_even_and_saturates():
    scale = 0.25  # a power of two: x * (1 / scale) is exact, so the rounding rule alone decides
    x = np.array([0.125, 0.375, -0.125, -0.375, 0.625, 31.75, 40.0, -1000.0, 31.875], np.float32)
    assert q.quantize(x, scale).tolist() == [0, 2, 0, -2, 2, 127, 127, -127, 127]


@pytest.mark.parametrize("fmt, dt", [("e4m3", E4M3), ("e5m2", E5M2)])
def test_fp8_is_the_correctly_rounded_and_saturated_value(fmt, dt):
    rng = np.random.default_rng(1)
    everything = np.arange(256, dtype=np.uint8).view(dt).astype(np.float32)
    finite = np.sort(everything[np.isfinite(everything)])
    midpoints = ((finite[1:].astype(np.float64) + finite[:-1]) / 2).astype(np.float32)  # ties
    x = np.concatenate([finite, midpoints, _spread(rng, 4000), [1e9, -1e9]]).astype(np.float32)
    scale = 0.5  # exact scaling
    values = q.quantize(x, scale, fmt)
    assert values.dtype == dt
    limit = q.qmax(fmt)
    expected = np.clip(x * 2, -limit, limit).astype(dt)  # ml_dtypes: round to nearest even
    assert np.array_equal(values.view(np.uint8), expected.view(np.uint8))
    assert np.isfinite(values.astype(np.float32)).all()  # saturated, never inf or NaN


@pytest.mark.parametrize("fmt, rel", [("e4m3", 2.0**-4), ("e5m2", 2.0**-3)])
def test_fp8_round_trip_relative_bound(fmt, rel):
    rng = np.random.default_rng(2)
    x = _spread(rng, 5000)
    scale = float(np.abs(x).max()) / q.qmax(fmt)
    back = q.dequantize(q.quantize(x, scale, fmt), scale).astype(np.float64)
    # relative half-ulp in the normal range; absolute half-ulp of the smallest binade below it
    tiny = {"e4m3": 2.0**-9, "e5m2": 2.0**-16}[fmt] * scale
    assert np.all(np.abs(back - x) <= rel * np.abs(x) * (1 + 1e-6) + tiny / 2 * (1 + 1e-6))


def test_dequantize_fp8_bytes_needs_the_format():
    values = q.quantize(np.array([1.0, -2.0], np.float32), 1.0, "e4m3")
    with pytest.raises(ValueError, match="name their format"):
        q.dequantize(values.view(np.uint8), 1.0)
    assert q.dequantize(values.view(np.uint8), 1.0, dtype="e4m3").tolist() == [1.0, -2.0]


@pytest.mark.parametrize("scale", [0.0, -1.0, np.inf, np.nan, np.array([1.0, 0.0])])
def test_bad_scales_are_refused(scale):
    with pytest.raises(ValueError, match="scale"):
        q.quantize(np.ones((2, 2), np.float32), scale)


def test_unknown_format_is_refused():
    with pytest.raises(ValueError, match="int8, e4m3, e5m2"):
        q.quantize(np.ones(3, np.float32), 1.0, "int4")
    with pytest.raises(TypeError, match="float16, bfloat16 or float32"):
        q.quantize(np.ones(3, np.int32), 1.0)


# -- weights -------------------------------------------------------------------------------------


@given(st.integers(0, 2**31), st.sampled_from(["int8", "e4m3", "e5m2"]), st.sampled_from(["channel", "tensor"]))
def test_quantized_weights_stay_2to4_and_zeros_stay_zero(seed, fmt, granularity):
    rng = np.random.default_rng(seed)
    w = reference.prune_2to4(_spread(rng, (16, 32)), axis=-1)
    values, scales = q.quantize_weight(w, fmt, granularity=granularity, allow_zero_channels=True)
    as_float = values.astype(np.float32)
    assert reference.is_2to4(as_float, axis=-1)
    assert np.all(as_float[w == 0] == 0)
    assert scales.dtype == np.float32 and scales.shape == ((16,) if granularity == "channel" else ())


def test_channel_scales_are_row_maxima_over_qmax():
    rng = np.random.default_rng(3)
    w = _spread(rng, (8, 16))
    values, scales = q.quantize_weight(w, "int8")
    assert np.array_equal(scales, (np.abs(w).max(axis=1) / np.float32(127)).astype(np.float32))
    assert np.all(np.abs(values).max(axis=1) == 127)  # every row reaches qmax
    back = q.dequantize(values, scales[:, None])
    assert np.all(np.abs(back - w) <= 0.5 * scales[:, None] * (1 + 2**-20))
    t_values, t_scale = q.quantize_weight(w, "int8", granularity="tensor")
    assert t_scale.shape == () and float(t_scale) == float(np.float32(np.abs(w).max()) / np.float32(127))


def test_all_zero_channels_are_an_error_unless_allowed():
    w = np.ones((6, 8), np.float32)
    w[[1, 4]] = 0
    with pytest.raises(ValueError, match=r"2 output channel\(s\) are all zero \(rows 1, 4\)"):
        q.weight_scales(w)
    scales = q.weight_scales(w, allow_zero_channels=True)
    assert scales[1] == scales[4] == 1.0 and scales[0] == np.float32(1 / 127)
    values, _ = q.quantize_weight(w, allow_zero_channels=True)
    assert not values[[1, 4]].any()
    with pytest.raises(ValueError, match="every weight is zero"):
        q.weight_scales(np.zeros((2, 4), np.float32), granularity="tensor")


@pytest.mark.parametrize(
    "w, kwargs, error, words",
    [
        (np.array([[1.0, np.nan]], np.float32), {}, ValueError, "NaN or infinite"),
        (np.array([[1.0, np.inf]], np.float32), {}, ValueError, "NaN or infinite"),
        (np.ones((2, 2, 2), np.float32), {}, ValueError, r"\(out_features, in_features\)"),
        (np.ones((2, 2), np.float32), {"granularity": "row"}, ValueError, "granularity"),
    ],
)
def test_weight_errors(w, kwargs, error, words):
    with pytest.raises(error, match=words):
        q.weight_scales(w, **kwargs)


# -- calibration ---------------------------------------------------------------------------------


def test_max_calibration_is_amax_over_qmax():
    rng = np.random.default_rng(4)
    batches = [rng.standard_normal((32, 16)).astype(np.float32) * s for s in (1, 3, 0.5)]
    amax = max(float(np.abs(b).max()) for b in batches)
    assert q.calibrate(batches) == float(np.float32(amax) / np.float32(127))
    assert q.calibrate(batches, "e4m3") == float(np.float32(amax) / np.float32(448))


def test_histogram_merging_equals_one_pass():
    """Batches of growing range (the histogram doubles its range and merges bins) give the counts of one
    pass over all the data at the final range."""
    rng = np.random.default_rng(5)
    batches = [rng.standard_normal(1000).astype(np.float32) * s for s in (0.01, 0.3, 7.0, 1.5)]
    one = q.Calibrator(bins=64)
    for b in batches:
        one.observe(b)
    counts, r = one.histogram()
    everything = np.abs(np.concatenate(batches))
    nonzero = everything[everything > 0]
    expected = np.bincount(np.minimum(np.floor(nonzero * np.float32(64 / r)), 63).astype(int), minlength=64)
    assert r / 2 <= float(everything.max()) < r and np.log2(r) == int(np.log2(r))  # the power of two above
    assert np.array_equal(counts, expected)
    assert one.count == 4000 and one.batches == 4


def test_percentile_is_within_one_bin_of_the_exact_percentile():
    rng = np.random.default_rng(6)
    x = np.abs(rng.standard_cauchy(20000)).astype(np.float32)  # heavy tail: the percentile clips far below max
    cal = q.Calibrator(bins=4096, method="percentile", percentile=99.0)
    cal.observe(x)
    clip = cal.clip_value()
    exact = float(np.percentile(x, 99.0))
    width = cal.histogram()[1] / 4096
    assert exact <= clip <= exact + width
    assert clip < 0.2 * float(x.max())
    assert cal.clip_value(percentile=100.0) == float(x.max())


def test_zeros_count_toward_percentiles_but_not_error():
    x = np.concatenate([np.zeros(900), np.linspace(0.01, 1.0, 100)]).astype(np.float32)
    cal = q.Calibrator(method="percentile", percentile=50.0)
    cal.observe(x)
    assert cal.zeros == 900 and cal.histogram()[0].sum() == 100
    assert 0 < cal.clip_value() <= cal.histogram()[1] / cal.bins  # the median is a zero: the first bin
    mse = cal.clip_value("mse")
    assert 0 < mse <= 1.0


def _data_mse(x, scale, fmt):
    return float(np.mean((q.dequantize(q.quantize(x, scale, fmt), scale) - x).astype(np.float64) ** 2))


@pytest.mark.parametrize("fmt", ["int8", "e4m3"])
def test_mse_choice_matches_a_search_on_the_data(fmt):
    """The histogram's MSE choice is (within one candidate) the clipping value a brute-force search over the
    same 128 candidates picks on the data itself, and never worse than the maximum."""
    rng = np.random.default_rng(7)
    data = rng.laplace(size=50000).astype(np.float32)
    cal = q.Calibrator(fmt, method="mse")
    cal.observe(data)
    clips = cal.amax * np.arange(1, 129) / 128
    errors = [_data_mse(data, float(np.float32(t) / np.float32(q.qmax(fmt))), fmt) for t in clips]
    best = clips[int(np.argmin(errors))]
    assert abs(cal.clip_value() - best) <= cal.amax / 128 * 1.0001
    assert cal.clip_value() < cal.amax  # Laplace tails are worth clipping
    assert _data_mse(data, cal.scale(), fmt) <= _data_mse(data, cal.scale("max"), fmt)
    uniform = q.Calibrator(fmt, method="mse")
    uniform.observe(rng.uniform(-1, 1, 50000).astype(np.float32))
    if fmt == "int8":
        assert uniform.clip_value() >= 0.95 * uniform.amax  # clipping uniform data only adds error


@pytest.mark.parametrize(
    "batches, words",
    [
        ([], "no calibration data"),
        ([np.zeros((0, 4), np.float32)], "the batches were empty"),
        ([np.zeros((3, 4), np.float32)], "all 12 calibration values are zero"),
        ([np.ones(3, np.float32), np.array([1.0, np.nan], np.float32)], r"batch 1: 1 NaN or infinite"),
        ([np.array([np.inf], np.float32)], r"batch 0: 1 NaN or infinite"),
    ],
)
def test_calibration_errors(batches, words):
    with pytest.raises(ValueError, match=words):
        q.calibrate(batches)


@pytest.mark.parametrize(
    "kwargs, words",
    [({"method": "entropy"}, "method"), ({"percentile": 0}, "percentile"), ({"percentile": 101}, "percentile"),
     ({"bins": 15}, "bins"), ({"bins": 33}, "bins")],
)
def test_calibrator_argument_errors(kwargs, words):
    with pytest.raises(ValueError, match=words):
        q.Calibrator(**kwargs)


def test_calibrate_needs_an_iterable():
    with pytest.raises(TypeError, match="iterable"):
        q.calibrate(3)
