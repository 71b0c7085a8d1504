"""A layer's scales and ReLU bounds are checked as float32, the type they are stored in, by one validator that
the constructor, the setters, calibrate, save and load share: what one accepts, the others accept."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from pycusparselt import SparseLinear
from pycusparselt.errors import LayerFileError
from pycusparselt.nn import layer_values, quantization

RNG = np.random.default_rng(7)
W = RNG.standard_normal((32, 64)).astype(np.float16)
X = RNG.standard_normal((8, 64)).astype(np.float16)


@pytest.mark.parametrize("value", [1e39, 1e-46, 1e-40, 10**400, math.inf, math.nan, 0.0, -1.0])
def test_scales_that_float32_does_not_hold_as_positive_normal_numbers_are_refused(value):
    rule = "a number float32 can hold" if isinstance(value, int) else "a positive finite scale"
    with pytest.raises(ValueError, match=f"input_scale: expected {rule}"):
        SparseLinear(W, mode="int8", input_scale=value)
    layer = SparseLinear(W, mode="int8", out_dtype=np.int8)
    with pytest.raises(ValueError, match=f"output_scale: expected {rule}"):
        layer.output_scale = value
    assert layer.output_scale is None


@pytest.mark.parametrize("value", ["half", None, [1.0], True])
def test_a_scale_that_is_not_a_number_is_a_type_error(value):
    if value is None:
        assert SparseLinear(W, mode="int8", input_scale=None).input_scale is None
        return
    with pytest.raises(TypeError, match="input_scale: expected a real number"):
        SparseLinear(W, mode="int8", input_scale=value)


def test_an_accepted_scale_is_stored_as_its_float32_value():
    layer = SparseLinear(W, mode="int8", input_scale=0.1)
    assert layer.input_scale == float(np.float32(0.1))
    assert layer_values.activation_scale(3.4e38) == float(np.float32(3.4e38))


@pytest.mark.parametrize("bound, threshold, message", [
    (math.nan, 0.0, "relu_upper_bound: expected a number"),
    (6.0, math.nan, "relu_threshold: expected a number finite as float32"),
    (6.0, math.inf, "relu_threshold: expected a number finite as float32"),
    (6.0, 1e39, "relu_threshold: expected a number finite as float32.*float32: inf"),
    (10**400, 0.0, "relu_upper_bound: expected a number float32 can hold"),
])
def test_relu_bounds_are_checked_as_float32(bound, threshold, message):
    with pytest.raises(ValueError, match=message):
        SparseLinear(W, activation="relu", relu_upper_bound=bound, relu_threshold=threshold)


def test_an_upper_bound_beyond_float32_is_no_bound():
    layer = SparseLinear(W, activation="relu", relu_upper_bound=1e39)
    assert layer.relu_upper_bound == math.inf


def _tampered_load(tmp_path, layer, **meta_change):
    path = tmp_path / "layer.npz"
    layer.save(path)
    with np.load(path) as data:
        arrays = {k: data[k] for k in data.files}
    meta = json.loads(str(arrays.pop("meta")))
    meta.update(meta_change)
    with open(path, "wb") as f:
        np.savez(f, meta=np.array(json.dumps(meta)), **arrays)
    return SparseLinear.load(path, on_device=False)


@pytest.mark.parametrize("field, value", [
    ("input_scale", 0.02), ("input_scale", 1e39), ("input_scale", 1e-46), ("input_scale", 1e-40),
    ("input_scale", 3e38), ("relu_upper_bound", "nan"), ("relu_upper_bound", 1e39), ("relu_upper_bound", 6.5),
    ("relu_threshold", "inf"), ("relu_threshold", 1e39), ("relu_threshold", -0.25),
])
def test_load_accepts_exactly_what_the_constructor_accepts(tmp_path, field, value):
    kwargs = {field: float(value) if isinstance(value, str) else value}
    try:
        made = SparseLinear(W, mode="int8", activation="relu", **kwargs)
    except ValueError:
        made = None
    base = SparseLinear(W, mode="int8", activation="relu", input_scale=0.02)
    if made is None:
        with pytest.raises(LayerFileError, match=f"meta field '{field}'"):
            _tampered_load(tmp_path, base, **{field: value})
    else:
        loaded = _tampered_load(tmp_path, base, **{field: value})
        stored = {"input_scale": loaded.input_scale, "relu_upper_bound": loaded.relu_upper_bound,
                  "relu_threshold": loaded.relu_threshold}[field]
        assert stored == getattr(made, field)


def test_save_refuses_what_load_would_refuse_and_writes_nothing(tmp_path):
    layer = SparseLinear(W, activation="relu")
    layer.relu_threshold = math.inf  # a public attribute, set past the constructor's check
    path = tmp_path / "layer.npz"
    with pytest.raises(ValueError, match="relu_threshold"):
        layer.save(path)
    assert not path.exists()
    layer.relu_threshold = 0.5
    layer.save(path)
    assert SparseLinear.load(path, on_device=False).relu_threshold == 0.5


@pytest.mark.parametrize("value", [1e-46, 1e39, -2.0])
def test_weight_scales_are_checked_as_float32(value):
    scales = np.full(4, 0.1)
    scales[2] = value
    with pytest.raises(ValueError, match="weight_scale: expected finite positive float32 scales; element \\(2,\\)"):
        layer_values.weight_scales(scales)


# -- calibration on tiny activations ---------------------------------------------------------------


@pytest.mark.parametrize("method", ["max", "percentile", "mse"])
def test_calibrating_tiny_activations_refuses_a_scale_float32_cannot_hold(method):
    x = (RNG.standard_normal((64, 64)) * 1e-37).astype(np.float32)
    with pytest.raises(ValueError, match="calibration: .* below float32's smallest normal number"):
        quantization.calibrate([x], method=method)
    layer = SparseLinear(W, mode="int8")
    with pytest.raises(ValueError, match="too small for int8"):
        layer.calibrate([x.astype(np.float32)])
    assert layer.input_scale is None


@pytest.mark.parametrize("amplitude", [2.0**-120, 1e-35, 1e-20, 1.0, 1e30])
def test_calibration_histograms_hold_at_any_magnitude(amplitude):
    """Scaling the activations by a power of two scales every method's scale by the same power."""
    x = np.random.default_rng(11).standard_normal((256, 64))
    x = (x * (3.5 / np.abs(x).max())).astype(np.float32)  # at 2**-120, a histogram range of 2**-118
    power = 2.0 ** round(math.log2(amplitude))
    for method in ("max", "percentile", "mse"):
        unit = quantization.calibrate([x], method=method, percentile=99.0)
        scaled = quantization.calibrate([(x * np.float32(power)).astype(np.float32)], method=method, percentile=99.0)
        assert scaled == pytest.approx(unit * power, rel=1e-6, abs=0), method
