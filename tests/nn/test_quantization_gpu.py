"""Quantization on the GPU: CuPy gives the NumPy results bit for bit; INT8 sparse GEMMs of quantized data are
exact; the float conversions round as ml_dtypes does."""

from __future__ import annotations

import ml_dtypes
import numpy as np
import pytest

from pycusparselt import SparseMatmulPlan, reference
from pycusparselt.nn import quantization as q

pytestmark = pytest.mark.gpu
cp = pytest.importorskip("cupy")

E4M3, E5M2 = np.dtype(ml_dtypes.float8_e4m3fn), np.dtype(ml_dtypes.float8_e5m2)


def _values(rng, n, dtype):
    """Many binades, the formats' own values and their midpoints (ties), and out-of-range values."""
    spread = rng.standard_normal(n) * 10.0 ** rng.integers(-4, 4, n)
    special = []
    for dt in (E4M3, E5M2):
        grid = np.arange(256, dtype=np.uint8).view(dt).astype(np.float64)
        grid = np.sort(grid[np.isfinite(grid)])
        special += [grid, (grid[1:] + grid[:-1]) / 2]
    special.append(np.arange(-300, 300) / 2.0)  # int8 ties at x.5
    return np.concatenate([spread, *special, [1e6, -1e6, 0.0, -0.0, np.inf, -np.inf]]).astype(dtype)


@pytest.mark.parametrize("fmt", ["int8", "e4m3", "e5m2"])
@pytest.mark.parametrize("dtype", [np.float16, ml_dtypes.bfloat16, np.float32])
def test_nan_and_infinity_quantize_as_on_the_cpu(fmt, dtype):
    """NaN: 0 in int8, NaN in FP8; infinity saturates (see quantize); CuPy kernels and quantize_into alike."""
    x = np.array([np.nan, -np.nan, np.inf, -np.inf, 1.0] * 8, dtype=dtype)
    host = q.quantize(x, 0.5, fmt)
    for device in (q.quantize(cp.asarray(x), 0.5, fmt),
                   q.quantize_into(cp.asarray(x), np.float32(2.0), fmt,
                                   cp.empty(x.shape, cp.int8 if fmt == "int8" else cp.uint8))):
        got = cp.asnumpy(device)
        if fmt == "int8":
            assert got.tolist() == host.tolist() and got[:5].tolist() == [0, 0, 127, -127, 2]
        else:
            got = got.view(host.dtype).astype(np.float32)
            want = host.astype(np.float32)
            assert np.array_equal(np.isnan(got), np.isnan(want)) and np.isnan(got[:2]).all()
            assert np.array_equal(got[~np.isnan(got)], want[~np.isnan(want)])


def _same_bits(a, b):
    a, b = np.asarray(a), np.asarray(b)
    assert a.dtype == b.dtype and a.shape == b.shape
    view = np.dtype(f"u{a.dtype.itemsize}")
    mismatch = np.flatnonzero(a.view(view).ravel() != b.view(view).ravel())
    assert mismatch.size == 0, f"{mismatch.size} of {a.size} differ, first at {mismatch[:5]}"


@pytest.mark.parametrize("fmt", ["int8", "e4m3", "e5m2"])
@pytest.mark.parametrize("dtype", [np.float16, ml_dtypes.bfloat16, np.float32])
@pytest.mark.parametrize("scale", [1.0, 0.5, 0.0123])
def test_quantize_on_the_gpu_equals_numpy(fmt, dtype, scale):
    x = _values(np.random.default_rng(0), 20000, dtype)
    host = q.quantize(x, scale, fmt)
    device = cp.asnumpy(q.quantize(cp.asarray(x), scale, fmt))
    if fmt != "int8":
        assert device.dtype == np.uint8  # CuPy holds FP8 as bytes
        device = device.view(host.dtype)
    _same_bits(device, host)
    back = cp.asnumpy(q.dequantize(q.quantize(cp.asarray(x), scale, fmt), scale, dtype=None if fmt == "int8" else fmt))
    _same_bits(back, q.dequantize(host, scale))


@pytest.mark.parametrize("fmt", ["int8", "e4m3", "e5m2"])
@pytest.mark.parametrize("granularity", ["channel", "tensor"])
def test_quantize_weight_on_the_gpu_equals_numpy(fmt, granularity):
    rng = np.random.default_rng(1)
    w = reference.prune_2to4((rng.standard_normal((96, 128)) * 10.0 ** rng.integers(-2, 2, (96, 1))).astype(np.float16))
    values, scales = q.quantize_weight(w, fmt, granularity=granularity)
    d_values, d_scales = q.quantize_weight(cp.asarray(w), fmt, granularity=granularity)
    _same_bits(cp.asnumpy(d_scales), scales)
    d_values = cp.asnumpy(d_values)
    _same_bits(d_values if fmt == "int8" else d_values.view(values.dtype), values)


def test_float32_to_bfloat16_rounds_to_nearest_even():
    rng = np.random.default_rng(2)
    bits = rng.integers(0, 2**32, 100000, dtype=np.uint64).astype(np.uint32)
    bits[:1000] = (bits[:1000] & 0xFFFF0000) | 0x8000  # exact ties
    x = bits.view(np.float32)
    x = x[np.isfinite(x)]
    device = cp.asnumpy(q.round_from_float32(cp.asarray(x), ml_dtypes.bfloat16, cp))
    _same_bits(device, x.astype(ml_dtypes.bfloat16))


@pytest.mark.parametrize("method", ["max", "percentile", "mse"])
@pytest.mark.parametrize("fmt", ["int8", "e4m3"])
def test_calibration_on_the_gpu_equals_numpy(method, fmt):
    rng = np.random.default_rng(3)
    batches = [np.maximum(rng.standard_normal((256, 64)) * s, 0).astype(np.float16) for s in (0.1, 2.0, 0.7, 9.0)]
    host, device = q.Calibrator(fmt, method=method), q.Calibrator(fmt, method=method)
    for b in batches:
        host.observe(b)
        device.observe(cp.asarray(b))
    h_counts, h_range = host.histogram()
    d_counts, d_range = device.histogram()
    assert h_range == d_range and np.array_equal(h_counts, d_counts)
    assert (host.count, host.zeros, host.amax) == (device.count, device.zeros, device.amax)
    assert host.scale() == device.scale()


def test_calibration_refuses_non_finite_device_batches():
    cal = q.Calibrator()
    with pytest.raises(ValueError, match="batch 0: 2 NaN or infinite"):
        cal.observe(cp.asarray(np.array([1.0, np.nan, np.inf], np.float32)))


@pytest.mark.parametrize("batch", [7, 64])
def test_int8_to_int32_of_quantized_data_is_exact(batch):
    """The sparse="b" product of a quantized layer's operands (x int8, W int8 2:4) with int32 output equals the
    reference's integer accumulation exactly."""
    rng = np.random.default_rng(4)
    w = reference.prune_2to4(rng.standard_normal((96, 128)).astype(np.float32))
    wq, _ = q.quantize_weight(w)
    xq = q.quantize(rng.standard_normal((batch, 128)).astype(np.float32), 0.02)
    x_d, w_d = cp.asarray(xq), cp.asarray(wq)
    plan = SparseMatmulPlan(x_d, w_d.T, sparse="b", out_dtype=np.int32)
    y = cp.asnumpy(plan.matmul(x_d, plan.compress(w_d.T)))
    assert np.array_equal(y.T, reference.matmul(wq, xq.T, out_dtype=np.int32))
    assert np.array_equal(y, xq.astype(np.int64) @ wq.astype(np.int64).T)
