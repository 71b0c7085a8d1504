"""SparseLinear on the CPU (the reference path): exact on integer data, permutations, validation."""

from __future__ import annotations

import numpy as np
import pytest

from pycusparselt import SparseLinear, reference


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
    mask = reference.mask_2to4(w, axis=-1)
    expected = x.astype(np.float64) @ np.where(mask, w, 0).astype(np.float64).T + b.astype(np.float64)
    if activation == "relu":
        expected = np.maximum(expected, 0)
    assert y.dtype == dtype and y.shape == (5, 24)
    assert np.array_equal(y.astype(np.float64), expected)  # integers below 2048: exact in float16
    assert reference.is_2to4(layer.weight, axis=-1)
    assert np.array_equal(layer(x[0]), y[0])  # a single vector


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
    with pytest.raises(ValueError, match=r"x: expected \(\.\.\., 16\) features"):
        layer(np.ones((2, 12), np.float16))


def test_from_torch_cpu_linear():
    torch = pytest.importorskip("torch")
    linear = torch.nn.Linear(32, 8).to(torch.float32)
    layer = SparseLinear.from_torch(linear)
    x = np.random.default_rng(4).standard_normal((3, 32)).astype(np.float32)
    w = reference.prune_2to4(linear.weight.detach().numpy())
    expected = x.astype(np.float64) @ w.astype(np.float64).T + linear.bias.detach().numpy()
    assert np.allclose(layer(x), expected, rtol=1e-5, atol=1e-5)
