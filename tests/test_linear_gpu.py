"""SparseLinear on the GPU: equal to the reference, one tuned plan per input shape, PyTorch weights."""

from __future__ import annotations

import ml_dtypes
import numpy as np
import pytest

from pycusparselt import SparseLinear, reference

pytestmark = pytest.mark.gpu
cp = pytest.importorskip("cupy")


def _tie_free(rng, shape, dtype):
    """Distinct magnitudes in every group of 4, so the GPU's pruning and the reference's must agree."""
    values = rng.permutation(np.prod(shape)).reshape(shape).astype(np.float64)
    return ((values / values.size + 0.01) * rng.choice([-1, 1], size=shape)).astype(dtype)


@pytest.mark.parametrize("dtype", [np.float16, ml_dtypes.bfloat16])
@pytest.mark.parametrize("batch", [1, 7, 64])
@pytest.mark.parametrize("activation", [None, "relu"])
def test_device_layer_matches_the_reference(dtype, batch, activation):
    rng = np.random.default_rng(batch)
    w = _tie_free(rng, (96, 128), dtype)
    b = rng.standard_normal(96).astype(dtype)
    x = rng.standard_normal((batch, 128)).astype(dtype)
    layer = SparseLinear(cp.asarray(w), cp.asarray(b), activation=activation)
    y = layer(cp.asarray(x))
    assert isinstance(y, cp.ndarray) and y.shape == (batch, 96) and y.flags.c_contiguous
    w_pruned = cp.asnumpy(layer.weight)
    assert np.array_equal(w_pruned, reference.prune_2to4(w))  # the library pruned what the reference would
    # y^T = W x^T with the bias per row of D: the reference's form
    desired = reference.matmul(w_pruned, x.T, bias=b, activation=activation)
    reference.assert_close(cp.asnumpy(y).T, desired, a=w_pruned, b=x.T, bias=b, activation=activation)
    # the CPU layer on the same weights agrees within the same bounds
    y_cpu = SparseLinear(w, b, activation=activation)(x)
    reference.assert_close(cp.asnumpy(y).T, y_cpu.T, a=w_pruned, b=x.T, bias=b, activation=activation)


def test_one_plan_per_input_shape_and_reuse():
    rng = np.random.default_rng(5)
    w = cp.asarray(rng.standard_normal((64, 64)).astype(np.float16))
    layer = SparseLinear(w)
    x1, x2 = cp.asarray(rng.standard_normal((8, 64)).astype(np.float16)), cp.asarray(
        rng.standard_normal((16, 64)).astype(np.float16))
    y1 = layer(x1)
    assert len(layer._plans) == 1 and len(layer._tuned) == 1
    assert cp.array_equal(layer(x1), y1)  # the same plan again: same result
    layer(x2)
    assert len(layer._plans) == 2
    layer.close()
    assert cp.array_equal(layer(x1), y1)  # rebuilt after close


def test_permutation_on_the_device():
    rng = np.random.default_rng(6)
    w, x = _tie_free(rng, (32, 64), np.float16), rng.standard_normal((4, 64)).astype(np.float16)
    perm = rng.permutation(64)
    y = SparseLinear(cp.asarray(w), permutation=perm)(cp.asarray(x))
    y_ref = SparseLinear(w, permutation=perm)(x)
    w_p = reference.prune_2to4(w[:, perm])
    reference.assert_close(cp.asnumpy(y).T, y_ref.T, a=w_p, b=x[:, perm].T)


def test_numpy_input_to_a_device_layer_is_refused():
    layer = SparseLinear(cp.ones((16, 32), dtype=cp.float16))
    with pytest.raises(TypeError, match="pass x of the same kind"):
        layer(np.ones((2, 32), np.float16))


def test_from_a_pytorch_linear_on_the_gpu():
    torch = pytest.importorskip("torch")
    if not torch.cuda.is_available():
        pytest.skip("PyTorch has no CUDA device")
    linear = torch.nn.Linear(128, 64).cuda().half()
    with torch.no_grad():  # the 3-step recipe's end state: a pruned weight
        mask = torch.from_numpy(reference.mask_2to4(linear.weight.cpu().numpy())).cuda()
        linear.weight.mul_(mask)
    layer = SparseLinear.from_torch(linear, prune=None)
    x = torch.randn(16, 128, device="cuda", dtype=torch.float16)
    y = layer(x)
    expected = linear(x)
    assert torch.allclose(torch.from_dlpack(y), expected, rtol=2e-3, atol=2e-3)
