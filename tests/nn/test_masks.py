"""Mask tools for the three-step recipe (pycusparselt.nn.masks): the reference's masks on every array
family, masks through a permutation, and masks that stay enforced across training updates."""

from __future__ import annotations

import math

import types

import ml_dtypes
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from pycusparselt.nn import masks as M
from pycusparselt.nn import permutation as P
from pycusparselt import reference as ref


def _matrices(dtype, elements, max_rows=3, max_groups=4, min_rows=1):
    return st.tuples(st.integers(min_rows, max_rows), st.integers(1, max_groups)).flatmap(
        lambda mg: hnp.arrays(dtype, (4 * mg[0], 4 * mg[1]), elements=elements))


float32_matrices = _matrices(np.float32, st.floats(-1e3, 1e3, width=32, allow_subnormal=False))
# small integers in float64: many ties, so the tie rule matters
tie_matrices = _matrices(np.float64, st.integers(-3, 3).map(float))


class FakeDLPack:
    """An array of an unknown library: nothing but the DLPack protocol (no __array__)."""

    def __init__(self, a: np.ndarray) -> None:
        self._a = a

    def __dlpack__(self, **kwargs):
        return self._a.__dlpack__(**kwargs)

    def __dlpack_device__(self):
        return self._a.__dlpack_device__()


class FakeArrayAPI(FakeDLPack):
    """A library with an array-API namespace, whose from_dlpack makes its own arrays again."""

    namespace = types.SimpleNamespace(from_dlpack=lambda x: FakeArrayAPI(np.from_dlpack(x)))

    def __array_namespace__(self, api_version=None):
        return self.namespace


# --------------------------------------------------------------------------------------------------
# compute_mask
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [np.float16, ml_dtypes.bfloat16, np.float32, np.int8,
                                   ml_dtypes.float8_e4m3fn, ml_dtypes.float8_e5m2])
@pytest.mark.parametrize("method", ["strip", "tile"])
@pytest.mark.parametrize("axis", [-1, -2, 0])
def test_supported_dtypes_are_the_reference(dtype, method, axis):
    w = (np.random.default_rng(0).standard_normal((4, 8, 12)) * 30).astype(dtype)
    if method == "tile" and axis == 0:  # tiles lie in the last two axes
        with pytest.raises(ValueError, match="last two axes"):
            M.compute_mask(w, method=method, axis=axis)
        with pytest.raises(ValueError, match="last two axes"):
            M.compute_mask(w.astype(np.float64), method=method, axis=axis)
        return
    mask = M.compute_mask(w, method=method, axis=axis)
    assert mask.dtype == np.bool_ and mask.shape == w.shape
    assert np.array_equal(mask, ref.mask_2to4(w, method=method, axis=axis))


@given(w=float32_matrices, method=st.sampled_from(["strip", "tile"]), axis=st.sampled_from([-1, -2]))
def test_float64_and_integers_rank_like_the_reference(w, method, axis):
    """float64 (and integer) weights take the exact path; on values float32 holds exactly it must
    give the reference's mask, ties included."""
    expected = ref.mask_2to4(w, method=method, axis=axis)
    assert np.array_equal(M.compute_mask(w.astype(np.float64), method=method, axis=axis), expected)
    ints = np.round(w).astype(np.int32)
    assert np.array_equal(M.compute_mask(ints, method=method, axis=axis),
                          ref.mask_2to4(ints.astype(np.float32), method=method, axis=axis))


@given(w=tie_matrices)
def test_ties_go_to_the_lower_index(w):
    assert np.array_equal(M.compute_mask(w), ref.mask_2to4(w.astype(np.float16)))


def test_float64_is_ranked_exactly():
    """Values that float32 cannot tell apart are still ranked by their float64 magnitudes."""
    w = np.array([[1.0, 1.0 + 2**-40, -(1.0 + 2**-39), 0.5]])
    assert M.compute_mask(w).tolist() == [[False, True, True, False]]
    assert ref.mask_2to4(w.astype(np.float32)).tolist() == [[True, True, False, False]]
    # NaN ranks above infinity, infinity above everything finite; -0.0 ties with +0.0
    w = np.array([[np.inf, 1e308, np.nan, -0.0], [0.0, -0.0, 0.0, 1e-300]])
    assert M.compute_mask(w).tolist() == [[True, False, True, False], [True, False, False, True]]
    big = np.array([[np.iinfo(np.int64).min, 3, np.iinfo(np.int64).max, 5]])
    assert M.compute_mask(big).tolist() == [[True, False, True, False]]
    assert M.compute_mask(np.array([[True, False, True, True]])).tolist() == [[True, False, True, False]]


@settings(max_examples=60)
@given(w=float32_matrices, method=st.sampled_from(["strip", "tile"]), axis=st.sampled_from([-1, -2]),
       seed=st.integers(0, 2**31))
def test_mask_through_a_permutation(w, method, axis, seed):
    """compute_mask(w, permutation=p) is the mask of the permuted weight, permuted back."""
    perm = np.random.default_rng(seed).permutation(w.shape[axis])
    permuted = np.take(w, perm, axis=axis)
    mask = M.compute_mask(w, method=method, permutation=perm, axis=axis)
    direct = M.compute_mask(permuted, method=method, axis=axis)
    assert np.array_equal(np.take(mask, perm, axis=axis), direct)
    assert np.array_equal(mask, np.take(direct, P.invert_permutation(perm), axis=axis))
    # 2:4 in the permuted order; the same magnitude kept as pruning the permuted weight
    pruned = M.apply_mask(w, mask)
    assert ref.is_2to4(np.take(pruned, perm, axis=axis), axis=axis)
    # fsum: the exact sum, whatever the order of the elements
    assert math.fsum(np.abs(pruned).astype(np.float64).ravel()) == math.fsum(
        np.abs(ref.prune_2to4(permuted, method=method, axis=axis)).astype(np.float64).ravel())


def test_permutation_from_the_search():
    w = np.random.default_rng(1).standard_t(3, size=(16, 64))
    perm, report = P.find_permutation(w, time_budget=None, escape_attempts=2)
    mask = M.compute_mask(w, permutation=perm)
    assert np.abs(M.apply_mask(w, mask)).sum() == pytest.approx(report.kept_after, rel=1e-12)
    assert np.abs(M.apply_mask(w, M.compute_mask(w))).sum() == pytest.approx(report.kept_before, rel=1e-12)


def test_compute_mask_errors():
    with pytest.raises(ValueError, match="multiple of 4"):
        M.compute_mask(np.ones((4, 6)))
    with pytest.raises(ValueError, match="method"):
        M.compute_mask(np.ones((4, 8)), method="block")
    with pytest.raises(ValueError, match="method"):
        M.compute_mask(np.ones((4, 8), dtype=np.float64), method="block")
    with pytest.raises(TypeError, match="real"):
        M.compute_mask(np.ones((4, 8), dtype=complex))
    with pytest.raises(ValueError, match="permutation"):
        M.compute_mask(np.ones((4, 8)), permutation=[0, 1, 2, 3, 4, 5, 6, 6])
    with pytest.raises(ValueError, match="length 8"):
        M.compute_mask(np.ones((4, 8)), permutation=np.arange(4))
    with pytest.raises(ValueError, match="at least one dimension"):
        M.compute_mask(np.float64(1.0))
    with pytest.raises(ValueError, match="out of range"):
        M.compute_mask(np.ones((4, 8)), axis=2)


# --------------------------------------------------------------------------------------------------
# apply_mask, enforce_mask, masked_update
# --------------------------------------------------------------------------------------------------


@given(w=float32_matrices)
def test_apply_mask(w):
    mask = M.compute_mask(w)
    before = w.copy()
    pruned = M.apply_mask(w, mask)
    assert np.array_equal(w, before)  # not in place by default
    assert pruned.dtype == w.dtype and ref.is_2to4(pruned)
    assert np.array_equal(pruned, ref.prune_2to4(w))
    assert M.apply_mask(w, mask, inplace=True) is w
    assert np.array_equal(w, pruned)


def test_apply_mask_zeroes_nan_and_broadcasts():
    w = np.array([[np.nan, 1.0, 2.0, np.inf]])
    mask = np.array([False, True, True, False])  # broadcasts over the rows
    assert M.apply_mask(w, mask).tolist() == [[0.0, 1.0, 2.0, 0.0]]
    assert M.apply_mask(w, mask.astype(np.int8)).tolist() == [[0.0, 1.0, 2.0, 0.0]]
    with pytest.raises(ValueError, match="does not fit"):
        M.apply_mask(w, np.ones(3, dtype=bool))
    ro = np.ones((1, 4))
    ro.flags.writeable = False
    with pytest.raises(ValueError, match="read-only"):
        M.enforce_mask(ro, mask)


@settings(max_examples=40)
@given(w=float32_matrices, n_updates=st.integers(1, 6), seed=st.integers(0, 2**31),
       dtype=st.sampled_from([np.float32, np.float64]))
def test_masks_stay_enforced_across_updates(w, n_updates, seed, dtype):
    """Step 3: random optimizer updates never revive a pruned weight; kept weights move freely."""
    rng = np.random.default_rng(seed)
    w = w.astype(dtype)
    mask = M.compute_mask(w)
    M.apply_mask(w, mask, inplace=True)
    expected = w.astype(np.float64)
    for _ in range(n_updates):
        update = rng.standard_normal(w.shape)
        assert M.masked_update(w, update.astype(dtype), mask) is w
        expected = np.where(mask, expected + update.astype(dtype), 0.0)
        assert not w[~mask].any()
        assert ref.is_2to4(w.astype(np.float32))
        np.testing.assert_allclose(w, expected, rtol=1e-5, atol=1e-3)
        # an update that ignores the mask (weight decay, momentum), then enforce_mask
        w += rng.standard_normal(w.shape).astype(dtype)
        assert M.enforce_mask(w, mask) is w
        assert not w[~mask].any()
        expected = w.astype(np.float64)


def test_adam_loop_with_masked_gradients():
    """A few Adam steps on a least-squares problem: masked gradients keep the moments of pruned
    weights at zero, so their updates are exactly zero too."""
    rng = np.random.default_rng(3)
    w = rng.standard_normal((8, 16))
    x, y = rng.standard_normal((16, 32)), rng.standard_normal((8, 32))
    mask = M.compute_mask(w)
    M.apply_mask(w, mask, inplace=True)
    m, v = np.zeros_like(w), np.zeros_like(w)
    loss0 = ((w @ x - y) ** 2).mean()
    for t in range(1, 21):
        grad = M.apply_mask(2 * (w @ x - y) @ x.T / y.size, mask)
        m = 0.9 * m + 0.1 * grad
        v = 0.999 * v + 0.001 * grad**2
        step = -0.05 * (m / (1 - 0.9**t)) / (np.sqrt(v / (1 - 0.999**t)) + 1e-8)
        assert not step[~mask].any()
        M.masked_update(w, step, mask)
    assert not w[~mask].any() and ((w @ x - y) ** 2).mean() < loss0


# --------------------------------------------------------------------------------------------------
# Other array families
# --------------------------------------------------------------------------------------------------


def test_dlpack_object_without_numpy_or_cupy():
    base = (np.random.default_rng(4).standard_normal((4, 8)) * 10).astype(np.float32)
    fake = FakeDLPack(base)
    mask = M.compute_mask(fake)
    assert isinstance(mask, np.ndarray)  # unknown library: NumPy results
    assert np.array_equal(mask, ref.mask_2to4(base))
    perm = np.random.default_rng(5).permutation(8)
    assert np.array_equal(M.compute_mask(fake, permutation=perm), M.compute_mask(base, permutation=perm))
    assert np.array_equal(M.apply_mask(fake, mask), ref.prune_2to4(base))
    # in place: written through the shared memory
    before = base.copy()
    assert M.apply_mask(fake, mask, inplace=True) is fake
    assert np.array_equal(base, ref.prune_2to4(before))
    M.masked_update(fake, FakeDLPack(np.ones((4, 8), np.float32)), FakeDLPack(mask))
    assert np.array_equal(base, np.where(mask, ref.prune_2to4(before) + 1, 0))
    # the permutation search reads DLPack objects too
    assert P.find_permutation(fake, time_budget=None)[1].kept_before == P.kept_magnitude(base)


def test_dlpack_object_of_an_array_api_library_comes_back_in_its_family():
    base = np.arange(32, dtype=np.float32).reshape(4, 8) - 10
    fake = FakeArrayAPI(base)
    mask = M.compute_mask(fake)
    assert isinstance(mask, FakeArrayAPI)
    assert np.array_equal(np.from_dlpack(mask), ref.mask_2to4(base))
    pruned = M.apply_mask(fake, mask)
    assert isinstance(pruned, FakeArrayAPI)
    assert np.array_equal(np.from_dlpack(pruned), ref.prune_2to4(base))


def test_torch_cpu_tensors():
    torch = pytest.importorskip("torch")
    w = torch.randn(8, 16, generator=torch.Generator().manual_seed(0))
    mask = M.compute_mask(w)
    assert isinstance(mask, torch.Tensor) and mask.dtype == torch.bool
    assert np.array_equal(mask.numpy(), ref.mask_2to4(w.numpy()))
    param = torch.nn.Parameter(w.clone())
    M.apply_mask(param.detach(), mask, inplace=True)  # shares the parameter's storage
    assert torch.equal(param.detach(), torch.where(mask, w, 0.0))
    M.masked_update(param.detach(), torch.ones(8, 16), mask)
    assert not param.detach()[~mask].any()
    assert torch.equal(param.detach()[mask], w[mask] + 1)
    pruned = M.apply_mask(w, mask)
    assert isinstance(pruned, torch.Tensor) and torch.equal(pruned, torch.where(mask, w, 0.0))


def test_cupy_arrays():
    cupy = pytest.importorskip("cupy")
    from pycusparselt._native.devices import cuda_devices

    reason = cuda_devices()[1]  # no driver, no device
    if reason is not None:
        pytest.skip(f"CuPy is installed but has no usable GPU ({reason})")
    w = (np.random.default_rng(6).standard_normal((8, 16))).astype(np.float16)
    wd = cupy.asarray(w)
    for method in ("strip", "tile"):
        mask = M.compute_mask(wd, method=method)
        assert isinstance(mask, cupy.ndarray) and mask.dtype == np.bool_
        assert np.array_equal(cupy.asnumpy(mask), ref.mask_2to4(w, method=method))
    mask = M.compute_mask(wd)
    assert np.array_equal(cupy.asnumpy(M.apply_mask(wd, mask)), ref.prune_2to4(w))
    M.masked_update(wd, cupy.ones((8, 16), dtype=cupy.float16), cupy.asnumpy(mask))
    assert not cupy.asnumpy(wd)[~cupy.asnumpy(mask)].any()
    M.enforce_mask(wd, mask)
    assert ref.is_2to4(cupy.asnumpy(wd))
