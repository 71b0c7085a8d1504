"""SparseLinear on the CPU (the reference path): exact on integer data, permutations, validation, the
quantized modes' arithmetic, calibration, saving and loading."""

from __future__ import annotations

import math

import ml_dtypes
import numpy as np
import pytest

import pycusparselt as psl
from pycusparselt import SparseLinear, reference
from pycusparselt.nn import quantization
from pycusparselt.nn.layer_files import find_config as _find_config
from pycusparselt.nn.linear import calibrate_chain


def _int_data(rng, shape, lo=-4, hi=4, dtype=np.float16):
    return rng.integers(lo, hi + 1, size=shape).astype(dtype)


@pytest.mark.parametrize("activation", [None, "relu"])
@pytest.mark.parametrize("dtype", [np.float16, np.float32])
def test_reference_layer_is_exact_on_integer_data(activation, dtype):
    rng = np.random.default_rng(0)
    w, b = _int_data(rng, (24, 64), dtype=dtype), _int_data(rng, (24,), dtype=dtype)
    x = _int_data(rng, (5, 64), dtype=dtype)
    layer = SparseLinear(w, b, activation=activation)
    y = layer(x)
    mask = reference.mask_2to4(w, axis=-1) if dtype == np.float16 else _mask_1to2(w)
    expected = x.astype(np.float64) @ np.where(mask, w, 0).astype(np.float64).T + b.astype(np.float64)
    if activation == "relu":
        expected = np.maximum(expected, 0)
    assert y.dtype == dtype and y.shape == (5, 24)
    assert np.array_equal(y.astype(np.float64), expected)  # integers below 2048: exact in float16
    assert reference.is_2to4(layer.weight, axis=-1)
    assert np.array_equal(layer(x[0]), y[0])  # a single vector


def _mask_1to2(w):
    """The larger magnitude of every pair along the inputs (the lower index on ties)."""
    pairs = np.abs(w.astype(np.float64)).reshape(w.shape[0], -1, 2)
    second = pairs[..., 1] > pairs[..., 0]
    return np.stack([~second, second], axis=-1).reshape(w.shape)


def test_float32_weights_are_pruned_1to2():
    """FP32 sparse GEMMs run on TF32 with cuSPARSELt's 1:2 sparsity: one kept value per pair."""
    w = np.random.default_rng(9).standard_normal((8, 16)).astype(np.float32)
    layer = SparseLinear(w)
    assert np.array_equal(layer.weight, np.where(_mask_1to2(w), w, 0))
    assert ((layer.weight.reshape(8, -1, 2) != 0).sum(axis=-1) == 1).all()
    with pytest.raises(ValueError, match="not 1:2"):
        SparseLinear(reference.prune_2to4(w), prune=None)
    with pytest.raises(ValueError, match="pruned 1:2"):
        SparseLinear(w, prune="tile")


def test_any_number_of_inputs_is_pruned():
    rng = np.random.default_rng(10)
    w = rng.standard_normal((5, 30)).astype(np.float16)
    layer = SparseLinear(w)
    padded = np.pad(w, ((0, 0), (0, 2)))
    assert np.array_equal(layer.weight, reference.prune_2to4(padded)[:, :30])


def test_relu_bounds_reach_the_epilogue():
    rng = np.random.default_rng(1)
    w, x = _int_data(rng, (16, 32)), _int_data(rng, (3, 32))
    y = SparseLinear(w, activation="relu", relu_upper_bound=6.0, relu_threshold=1.0)(x).astype(np.float64)
    assert y.max() <= 6.0 and not np.any((y > 0) & (y <= 1.0))


def test_permutation_is_applied_to_weight_and_input():
    rng = np.random.default_rng(2)
    w, b, x = _int_data(rng, (16, 32)), _int_data(rng, (16,)), _int_data(rng, (4, 32))
    perm = rng.permutation(32)
    layer = SparseLinear(w, b, permutation=perm)
    plain = SparseLinear(w[:, perm], b)
    assert np.array_equal(layer(x), plain(x[:, perm]))
    # the permutation changes which weights survive: the layer prunes the permuted weight
    assert np.array_equal(layer.weight, reference.prune_2to4(w[:, perm]))


def test_prune_none_needs_2to4_weights():
    rng = np.random.default_rng(3)
    w = _int_data(rng, (8, 16), lo=1, hi=4)  # no zeros: not 2:4
    with pytest.raises(ValueError, match="not 2:4"):
        SparseLinear(w, prune=None)
    pruned = reference.prune_2to4(w)
    assert np.array_equal(SparseLinear(pruned, prune=None).weight, pruned)


@pytest.mark.parametrize(
    "kwargs, error, words",
    [
        ({"weight": np.zeros((4, 8, 2), np.float16)}, ValueError, "out_features, in_features"),
        ({"bias": np.zeros(5, np.float16)}, ValueError, r"bias: expected shape \(8,\)"),
        ({"bias": np.zeros(8, np.float32)}, TypeError, "bias: expected the weight's dtype"),
        ({"activation": "tanh"}, ValueError, "activation"),
        ({"permutation": np.array([0, 0, 1, 2] * 4)}, ValueError, "permutation of range"),
    ],
)
def test_construction_errors(kwargs, error, words):
    args = {"weight": np.ones((8, 16), np.float16), **kwargs}
    with pytest.raises(error, match=words):
        SparseLinear(args.pop("weight"), **args)


def test_call_errors():
    layer = SparseLinear(np.ones((8, 16), np.float16))
    with pytest.raises(ValueError, match=r"x: expected shape \(batch, 16\) or \(16,\), got \(2, 12\)"):
        layer(np.ones((2, 12), np.float16))


def test_from_torch_cpu_linear():
    torch = pytest.importorskip("torch")
    linear = torch.nn.Linear(32, 8).to(torch.float32)
    layer = SparseLinear.from_torch(linear)
    x = np.random.default_rng(4).standard_normal((3, 32)).astype(np.float32)
    w = linear.weight.detach().numpy()
    w = np.where(_mask_1to2(w), w, 0)
    expected = x.astype(np.float64) @ w.astype(np.float64).T + linear.bias.detach().numpy()
    assert np.allclose(layer(x), expected, rtol=1e-5, atol=1e-5)


# -- quantized modes -----------------------------------------------------------------------------


def _layer_data(seed, out_features=24, in_features=64, batch=6):
    rng = np.random.default_rng(seed)
    w = rng.standard_normal((out_features, in_features)).astype(np.float32)
    b = rng.standard_normal(out_features).astype(np.float32)
    x = rng.standard_normal((batch, in_features)).astype(np.float16)
    return w, b, x


def _round_f16(v64):
    return v64.astype(np.float16)  # NumPy rounds float64 to float16 once, to nearest even


@pytest.mark.parametrize("activation", [None, "relu"])
def test_int8_layer_is_the_quantized_arithmetic(activation):
    """x -> int8 with the input scale; int8 x int8 -> exact integer accumulation; then per output channel
    alpha = weight scale x input scale, bias, ReLU and one rounding to float16: written out here in float64."""
    w, b, x = _layer_data(0)
    layer = SparseLinear(w, b, mode="int8", activation=activation, input_scale=0.02)
    y = layer(x)
    assert y.dtype == np.float16 and y.shape == (6, 24)
    w_pruned = reference.prune_2to4(w)
    assert np.array_equal(layer.weight, w_pruned)
    scales = (np.abs(w_pruned).max(axis=1) / np.float32(127)).astype(np.float32)
    assert np.array_equal(layer.weight_scale, scales)
    wq = np.clip(np.rint(w_pruned * (np.float32(1) / scales[:, None])), -127, 127).astype(np.int64)
    assert np.array_equal(layer.weight_q, wq)
    assert reference.is_2to4(layer.weight_q, axis=-1)
    inv = np.float32(1) / np.float32(0.02)
    xq = np.clip(np.rint(x.astype(np.float32) * inv), -127, 127).astype(np.int64)
    acc = xq @ wq.T  # exact
    alpha = (scales.astype(np.float64) * float(np.float32(0.02))).astype(np.float32).astype(np.float64)
    z = alpha * acc + b.astype(np.float16).astype(np.float64)  # int8 -> float16 reads a float16 bias
    if activation == "relu":
        z = np.maximum(z, 0)
    assert np.array_equal(y, _round_f16(z))


def test_int8_output_with_an_output_scale():
    w, b, x = _layer_data(1)
    layer = SparseLinear(w, b, mode="int8", activation="relu", out_dtype=np.int8, input_scale=0.02, output_scale=0.05,
                         relu_upper_bound=3.0)
    y = layer(x)
    assert y.dtype == np.int8
    wq, scales = layer.weight_q.astype(np.int64), layer.weight_scale.astype(np.float64)
    xq = layer._gemm_input(x, np).astype(np.int64)
    alpha = (scales * float(np.float32(0.02)) / float(np.float32(0.05))).astype(np.float32).astype(np.float64)
    bias = (b.astype(np.float64) / float(np.float32(0.05))).astype(np.float32).astype(np.float64)
    z = np.minimum(np.maximum(alpha * (xq @ wq.T) + bias, 0), 3.0 / float(np.float32(0.05)))
    assert np.array_equal(y, np.clip(np.rint(z), -128, 127).astype(np.int8))
    assert y.max() <= 60  # the upper bound 3.0 in units of the output scale


def test_int8_layers_chain_without_a_round_trip():
    """An int8 output fed on to the next int8 layer equals its dequantized values fed as floats."""
    rng = np.random.default_rng(2)
    w1, b1 = rng.standard_normal((32, 64)).astype(np.float32), rng.standard_normal(32).astype(np.float32)
    w2, b2 = rng.standard_normal((16, 32)).astype(np.float32), rng.standard_normal(16).astype(np.float32)
    fc1 = SparseLinear(w1, b1, mode="int8", activation="relu", out_dtype=np.int8)
    fc2 = SparseLinear(w2, b2, mode="int8")
    batches = [rng.standard_normal((20, 64)).astype(np.float32) for _ in range(3)]
    calibrate_chain([fc1, fc2], batches)
    assert fc2.input_scale == fc1.output_scale
    h = fc1(batches[0])
    assert h.dtype == np.int8 and h.max() > 60  # the calibrated scale uses the int8 range
    direct = fc2(h)
    via_float = fc2(quantization.dequantize(h, fc1.output_scale))
    assert np.array_equal(direct, via_float)
    # and the chain approximates the float32 layers
    exact = quantization.float_forward(fc2, quantization.float_forward(fc1, batches[0]))
    assert np.abs(direct.astype(np.float32) - exact).max() < 0.05 * np.abs(exact).max()


@pytest.mark.parametrize("fmt", ["e4m3", "e5m2"])
def test_fp8_layer_per_tensor_is_the_quantized_arithmetic(fmt):
    w, b, x = _layer_data(3)
    layer = SparseLinear(w, b, mode="fp8", fp8_format=fmt, activation="relu", input_scale=0.01)
    y = layer(x)
    dt = quantization.FORMATS[fmt][0]
    assert layer.weight_q.dtype == dt and layer.weight_scale.shape == ()
    w_pruned = reference.prune_2to4(w)
    s_w = np.float32(np.abs(w_pruned).max()) / np.float32(quantization.qmax(fmt))
    wq = np.clip(w_pruned * (np.float32(1) / s_w), -quantization.qmax(fmt), quantization.qmax(fmt)).astype(dt)
    assert np.array_equal(layer.weight_q.view(np.uint8), wq.view(np.uint8))
    xq = np.clip(x.astype(np.float32) * (np.float32(1) / np.float32(0.01)), -quantization.qmax(fmt),
                 quantization.qmax(fmt)).astype(dt)
    acc = xq.astype(np.float64) @ wq.astype(np.float64).T  # exact in float64
    alpha = float(np.float32(float(s_w) * float(np.float32(0.01))))
    z = np.maximum(alpha * acc + b.astype(np.float16).astype(np.float64), 0)
    assert np.array_equal(y, _round_f16(z))


def test_fp8_layer_per_channel_scales_after_the_product():
    w, b, x = _layer_data(4)
    layer = SparseLinear(w, b, mode="fp8", weight_granularity="channel", activation="relu", input_scale=0.01,
                         out_dtype=ml_dtypes.bfloat16)
    y = layer(x)
    assert y.dtype == ml_dtypes.bfloat16 and layer.weight_scale.shape == (24,)
    xq = layer._gemm_input(x, np)
    acc = (xq.astype(np.float64) @ layer.weight_q.astype(np.float64).T) * float(np.float32(0.01))
    acc32 = acc.astype(np.float32)  # the GEMM's float32 output
    z = np.maximum(acc32 * layer.weight_scale + b, np.float32(0))  # float32 steps, as on the GPU
    assert np.array_equal(y.view(np.uint16), z.astype(ml_dtypes.bfloat16).view(np.uint16))


@pytest.mark.parametrize("mode", [None, "int8"])
def test_gelu_runs_after_the_product_in_float32(mode):
    w, b, x = _layer_data(5)
    w = w.astype(np.float16)
    plain = SparseLinear(w, b.astype(np.float16), mode=mode, input_scale=0.02)
    gelu = SparseLinear(w, b.astype(np.float16), mode=mode, input_scale=0.02, activation="gelu")
    z = plain(x).astype(np.float32)
    c, k = np.float32(math.sqrt(2 / math.pi)), np.float32(0.044715)
    # 0.5 z (1 + tanh(u)) written as z / (1 + exp(-2u)): no cancellation for negative z
    with np.errstate(over="ignore"):  # exp(-2u) = inf for z below about -10: gelu(z) = -0
        expected = z / (np.float32(1) + np.exp(np.float32(-2) * (c * (z + k * z * z * z))))
    assert np.array_equal(gelu(x), expected.astype(np.float16))
    tanh_form = np.float32(0.5) * z * (np.float32(1) + np.tanh(c * (z + k * z * z * z)))
    assert np.allclose(expected, tanh_form, rtol=1e-5, atol=1e-6)  # the same function


def test_already_quantized_inputs_are_taken_as_they_are():
    w, b, x = _layer_data(6)
    layer = SparseLinear(w, b, mode="int8", input_scale=0.02)
    xq = quantization.quantize(x, 0.02)
    assert np.array_equal(layer(xq), layer(x))
    fp8 = SparseLinear(w, b, mode="fp8", input_scale=0.02)
    x8 = quantization.quantize(x, 0.02, "e4m3")
    assert np.array_equal(fp8(x8), fp8(x)) and np.array_equal(fp8(x8.view(np.uint8)), fp8(x))


def test_calibrate_sets_the_scales_from_data():
    w, b, _ = _layer_data(7)
    rng = np.random.default_rng(7)
    batches = [rng.standard_normal((10, 64)).astype(np.float32) * s for s in (1.0, 2.0)]
    layer = SparseLinear(w, b, mode="int8", activation="relu", out_dtype=np.int8).calibrate(batches)
    amax_in = max(float(np.abs(x).max()) for x in batches)
    assert layer.input_scale == float(np.float32(amax_in) / np.float32(127))
    amax_out = max(float(np.abs(quantization.float_forward(layer, x)).max()) for x in batches)
    assert layer.output_scale == float(np.float32(amax_out) / np.float32(127))
    fp8 = SparseLinear(w, b, mode="fp8").calibrate(batches, method="percentile", percentile=100.0)
    assert fp8.input_scale == float(np.float32(amax_in) / np.float32(448)) and fp8.output_scale is None


@pytest.mark.parametrize(
    "kwargs, call, error, words",
    [
        ({"mode": "int4"}, None, ValueError, "mode"),
        ({"mode": "int8", "out_dtype": np.float32}, None, ValueError, "out_dtype: a 'int8' layer outputs"),
        ({"mode": "fp8", "out_dtype": np.int8}, None, ValueError, "out_dtype: a 'fp8' layer outputs"),
        ({"mode": "fp16", "out_dtype": np.float32}, None, ValueError, "out_dtype: a float16 layer"),
        ({"mode": "fp8", "fp8_format": "e3m4"}, None, ValueError, "fp8_format"),
        ({"mode": "int8", "weight_granularity": "row"}, None, ValueError, "weight_granularity"),
        ({"mode": "int8", "input_scale": -1.0}, None, ValueError, "input_scale"),
        ({"mode": "int8"}, "float", ValueError, "input_scale: this int8 layer has no input scale"),
        ({"mode": "int8", "input_scale": 0.1, "out_dtype": np.int8}, "float", ValueError, "output_scale"),
        ({"mode": "int8", "input_scale": 0.1}, "int32", TypeError, "x: expected float16, bfloat16 or float32"),
        ({"mode": "fp16"}, "float32", TypeError, "x: expected float16"),
        ({"prune": "random"}, None, ValueError, "prune"),
        ({"activation": "gelu", "relu_threshold": 1.0}, None, ValueError, "need activation='relu'"),
    ],
)
def test_mode_errors(kwargs, call, error, words):
    w = np.random.default_rng(8).standard_normal((8, 16)).astype(np.float32)
    with pytest.raises(error, match=words):
        layer = SparseLinear(w, **kwargs)
        x = np.ones((2, 16), {"float": np.float16, "int32": np.int32, "float32": np.float32}[call])
        layer(x)


def test_weights_must_be_float():
    with pytest.raises(TypeError, match="pass the float weight with mode='int8'"):
        SparseLinear(np.ones((4, 8), np.int8), mode="int8")


def test_calibrate_errors():
    w, b, _ = _layer_data(9)
    with pytest.raises(ValueError, match="only int8 and fp8 layers"):
        SparseLinear(w.astype(np.float16)).calibrate([np.ones((2, 64), np.float16)])
    layer = SparseLinear(w, b, mode="int8")
    with pytest.raises(ValueError, match="no calibration data"):
        layer.calibrate([])
    with pytest.raises(ValueError, match=r"batches: expected \(\.\.\., 64\) features"):
        layer.calibrate([np.ones((2, 63), np.float32)])
    with pytest.raises(ValueError, match="batch 0: 1 NaN"):
        layer.calibrate([np.array([[np.nan] + [1.0] * 63], np.float32)])
    with pytest.raises(ValueError, match="layer 0 has 24 outputs but layer 1 takes 64"):
        calibrate_chain([layer, layer], [np.ones((2, 64), np.float32)])


def test_the_weight_is_quantized_after_pruning_and_permuting():
    w, b, x = _layer_data(10)
    perm = np.random.default_rng(10).permutation(64)
    layer = SparseLinear(w, b, mode="int8", permutation=perm, input_scale=0.02)
    plain = SparseLinear(w[:, perm], b, mode="int8", input_scale=0.02)
    assert np.array_equal(layer.weight_q, plain.weight_q)
    assert np.array_equal(layer(x), plain(x[:, perm]))


# -- saving and loading --------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs",
    [
        {"mode": None, "dtype": np.float16, "activation": "relu"},
        {"mode": "bf16", "dtype": np.float32, "activation": "gelu"},
        {"mode": "int8", "dtype": np.float32, "activation": "relu", "out_dtype": np.int8, "input_scale": 0.02,
         "output_scale": 0.1, "relu_upper_bound": 6.0},
        {"mode": "int8", "dtype": np.float16, "input_scale": 0.02, "permutation": True},
        {"mode": "fp8", "dtype": np.float32, "weight_granularity": "channel", "input_scale": 0.01},
        {"mode": "fp8", "dtype": np.float32, "fp8_format": "e5m2", "input_scale": 0.01, "bias": False},
    ],
)
def test_save_and_load_round_trip(tmp_path, kwargs):
    kwargs = dict(kwargs)
    w, b, x = _layer_data(11)
    dtype = kwargs.pop("dtype")
    w, b = w.astype(dtype), b.astype(dtype)
    if kwargs.pop("permutation", False):
        kwargs["permutation"] = np.random.default_rng(11).permutation(64)
    if not kwargs.pop("bias", True):
        b = None
    x = x.astype(np.float16 if kwargs["mode"] != "bf16" else ml_dtypes.bfloat16)
    layer = SparseLinear(w, b, **kwargs)
    # a tuned configuration as a device layer would have stored it
    layer._configs[("NVIDIA H100 80GB HBM3", "90", "0.8.0", (6, 64), "|i1")] = {"alg_id": 3, "split_k": 1}
    path = tmp_path / "layer.npz"
    layer.save(path)
    loaded = SparseLinear.load(path, on_device=False)
    y, y_loaded = layer(x), loaded(x)
    assert y_loaded.dtype == y.dtype and np.array_equal(y_loaded.view(np.uint8), y.view(np.uint8))
    assert loaded.tuned_configs == layer.tuned_configs
    for name in ("mode", "activation", "relu_upper_bound", "out_dtype", "input_scale", "output_scale", "format"):
        assert getattr(loaded, name) == getattr(layer, name), name
    assert repr(loaded) == repr(layer)
    if layer.quantized:
        assert np.array_equal(loaded.weight_q.view(np.uint8), layer.weight_q.view(np.uint8))
        assert np.array_equal(loaded.weight_scale, layer.weight_scale)
    # nothing is pickled
    with np.load(path, allow_pickle=False) as data:
        assert all(data[k].dtype != object for k in data.files)


def test_stored_configurations_are_found_only_for_the_same_gpu_library_and_input():
    configs = {("NVIDIA H100 80GB HBM3", "90", "0.8.0", (384, 1024), "|i1"): {"alg_id": 2}}
    assert _find_config(configs, ("NVIDIA H100 80GB HBM3", "90", "0.8.0", [384, 1024], "|i1")) == {"alg_id": 2}
    for other in [("NVIDIA A100-SXM4-80GB", "80", "0.8.0", [384, 1024], "|i1"),
                  ("NVIDIA H100 80GB HBM3", "90", "0.10.0", [384, 1024], "|i1"),
                  ("NVIDIA H100 80GB HBM3", "90", "0.8.0", [768, 1024], "|i1"),
                  ("NVIDIA H100 80GB HBM3", "90", "0.8.0", [384, 1024], "<f2")]:
        assert _find_config(configs, other) is None


def test_loading_something_else_is_refused(tmp_path):
    path = tmp_path / "other.npz"
    np.savez(path, meta=np.array('{"format": "something", "version": 1}'))
    with pytest.raises(psl.LayerFileError, match="not a pycusparselt layer file"):
        SparseLinear.load(path, on_device=False)


def test_tuned_configurations_can_be_shared_between_layers():
    w, b, _ = _layer_data(12)
    a, other = SparseLinear(w, b), SparseLinear(w, b)
    a._configs[("GPU", "90", "0.8.0", (6, 64), "<f2")] = {"alg_id": 1}
    other.tuned_configs = a.tuned_configs
    assert other.tuned_configs == a.tuned_configs
    with pytest.raises(ValueError, match="tuned_configs: expected entries"):
        other.tuned_configs = [{"gpu": "GPU"}]


# -- inputs a new user passes -------------------------------------------------------------------------------


def test_python_lists_are_host_arrays():
    rows = [[1.0, -2.0, 0.0, 0.0, 0.5, 0.0, 0.0, 3.0]] * 4
    as_array = SparseLinear(np.asarray(rows, np.float32))
    with pytest.raises(TypeError, match="weight: expected float16, bfloat16 or float32, got float64"):
        SparseLinear(rows)  # Python floats are float64: refused with the dtype named, not an AttributeError
    listed = SparseLinear(np.asarray(rows, np.float32), permutation=list(range(8)))
    x = np.ones((2, 8), np.float32)
    assert np.array_equal(listed(x), as_array(x))
    with pytest.raises(TypeError, match="weight: expected an array"):
        SparseLinear(3.0)


def test_out_on_the_reference_is_filled_or_refused():
    w, b, x = _layer_data(31)
    layer = SparseLinear(w, b)
    x = x.astype(np.float32)
    want = layer(x)
    out = np.empty_like(want)
    assert layer(x, out=out) is out and np.array_equal(out, want)
    vec = np.empty(want.shape[1], want.dtype)
    assert layer(x[0], out=vec) is vec and np.array_equal(vec, want[0])
    for bad in (np.empty(want.shape, np.float64), np.empty((1, *want.shape), want.dtype), [0.0]):
        with pytest.raises(ValueError, match="out: expected a NumPy array of shape \\(6, 24\\) and dtype float32"):
            layer(x, out=bad)


@pytest.mark.parametrize("shape", [(3,), (2, 3), (2, 2, 64), (64, 2)])
def test_input_shape_messages_agree(shape):
    w, b, _ = _layer_data(32)
    layer = SparseLinear(w, b)
    with pytest.raises(ValueError, match="x: expected shape \\(batch, 64\\) or \\(64,\\), got"):
        layer(np.zeros(shape, w.dtype))
