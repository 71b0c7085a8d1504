"""Channel permutation search (pycusparselt.nn.permutation): validity, monotonicity, determinism, the
seed's example, and the network-function invariance of the producer/consumer helpers."""

from __future__ import annotations

import itertools

import ml_dtypes
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from pycusparselt.nn import permutation as P
from pycusparselt import reference as ref

# The seed's slide shows the example matrix *after* the permutation that swaps input channels 2 and
# 4 ("100 90 20 10 80 40 30 70"); the matrix as laid out before it has those columns swapped back.
SEED_PERMUTED = np.array(
    [
        [100, 90, 20, 10, 80, 40, 30, 70],
        [50, 80, 50, 30, 140, 5, 60, 40],
        [15, 16, 17, 10, 100, 50, 40, 20],
        [80, 130, 6, 49, 12, 120, 60, 50],
    ],
    dtype=np.float32,
)
SEED_SWAP = np.array([0, 1, 4, 3, 2, 5, 6, 7])
SEED = SEED_PERMUTED[:, SEED_SWAP]


def _row_losses(w: np.ndarray) -> np.ndarray:
    """Magnitude lost by 2:4 strip pruning, per row (through the reference)."""
    w = np.asarray(w, dtype=np.float32)
    return np.abs(w).sum(axis=1) - np.abs(ref.prune_2to4(w)).sum(axis=1)


def _is_permutation(perm: np.ndarray, n: int) -> bool:
    return perm.shape == (n,) and np.array_equal(np.sort(perm), np.arange(n))


def _brute_force_best_8(w: np.ndarray) -> float:
    """The best kept magnitude over all groupings of 8 channels (35 splits cover every one)."""
    best = -np.inf
    for first in itertools.combinations(range(8), 4):
        if 0 not in first:
            continue
        perm = list(first) + [c for c in range(8) if c not in first]
        best = max(best, P.kept_magnitude(w, perm))
    return best


matrices = st.tuples(st.integers(1, 6), st.integers(1, 8)).flatmap(
    lambda mk: hnp.arrays(np.float32, (mk[0], 4 * mk[1]),
                          elements=st.floats(-100, 100, width=32, allow_subnormal=False))
)
small_int_matrices = st.tuples(st.integers(1, 5), st.integers(2, 6)).flatmap(
    lambda mk: hnp.arrays(np.int64, (mk[0], 4 * mk[1]), elements=st.integers(-20, 20))
)

# --------------------------------------------------------------------------------------------------
# The seed's example
# --------------------------------------------------------------------------------------------------


def test_seed_example_row_loses_140_then_at_most_100():
    assert _row_losses(SEED)[0] == 140
    assert _row_losses(SEED[:, SEED_SWAP])[0] == 100  # the slide's own permutation
    perm, report = P.find_permutation(SEED, time_budget=None, seed=0)
    assert _is_permutation(perm, 8)
    assert _row_losses(SEED[:, perm])[0] <= 100
    # with 8 channels the 35 splits are every grouping: the search finds the optimum
    assert report.kept_after == _brute_force_best_8(SEED)
    assert report.kept_after >= P.kept_magnitude(SEED, SEED_SWAP)
    assert report.kept_before == P.kept_magnitude(SEED)


def test_seed_example_single_row():
    row = SEED[:1]
    perm, report = P.find_permutation(row, time_budget=None)
    assert np.abs(row).sum() - report.kept_before == 140
    assert np.abs(row).sum() - report.kept_after == 100  # the least possible: 10 + 20 + 30 + 40
    assert _row_losses(row[:, perm])[0] == 100


# --------------------------------------------------------------------------------------------------
# Properties of the search
# --------------------------------------------------------------------------------------------------


@settings(max_examples=40)
@given(w=matrices, seed=st.integers(0, 3))
def test_search_is_valid_and_never_worse(w, seed):
    perm, report = P.find_permutation(w, time_budget=None, seed=seed, escape_attempts=3)
    k = w.shape[1]
    assert _is_permutation(perm, k) and perm.dtype == np.int64
    assert report.kept_after >= report.kept_before
    assert report.improvement >= 0
    assert report.kept_before == P.kept_magnitude(w)
    assert report.kept_after == P.kept_magnitude(w, perm)
    assert report.kept_after <= report.total
    # the kept magnitude is what the reference's pruning keeps
    kept_ref = np.abs(ref.prune_2to4(w[:, perm]).astype(np.float64)).sum()
    assert report.kept_after == pytest.approx(kept_ref, rel=1e-12, abs=1e-9)
    assert report.escapes_tried <= 3
    if k == 8:
        assert report.kept_after == pytest.approx(_brute_force_best_8(w), rel=1e-12, abs=1e-9)


@settings(max_examples=15)
@given(w=small_int_matrices, seed=st.integers(0, 2**31))
def test_search_is_deterministic_for_a_seed(w, seed):
    a = P.find_permutation(w, time_budget=None, seed=seed, escape_attempts=4)
    b = P.find_permutation(w, time_budget=None, seed=seed, escape_attempts=4)
    assert np.array_equal(a[0], b[0])
    assert (a[1].kept_after, a[1].iterations, a[1].escapes_tried, a[1].escapes_accepted) == (
        b[1].kept_after, b[1].iterations, b[1].escapes_tried, b[1].escapes_accepted)


def test_deterministic_and_improving_on_a_larger_matrix():
    w = np.random.default_rng(5).standard_t(3, size=(64, 128))
    runs = [P.find_permutation(w, time_budget=None, seed=7, escape_attempts=5) for _ in range(2)]
    assert np.array_equal(runs[0][0], runs[1][0])
    report = runs[0][1]
    assert report.stopped_by == "converged" and "table" in report.method
    assert report.relative_improvement > 0.01  # random heavy-tailed data: about 2-3 %


def test_random_pairings_mode(monkeypatch):
    monkeypatch.setitem(P._TABLE_MAX, "cpu", 0)  # as for a matrix too large for the table
    w = np.random.default_rng(1).standard_normal((32, 256))
    perm, report = P.find_permutation(w, time_budget=None, seed=3, escape_attempts=2)
    again, _ = P.find_permutation(w, time_budget=None, seed=3, escape_attempts=2)
    assert "random stripe pairings" in report.method and "table" not in report.method
    assert _is_permutation(perm, 256) and np.array_equal(perm, again)
    assert report.kept_after > report.kept_before


def test_limits_stop_the_search():
    w = np.random.default_rng(2).standard_normal((256, 512)).astype(np.float32)
    perm, report = P.find_permutation(w, time_budget=0.2)
    assert report.stopped_by == "time_budget" and report.seconds < 1.5
    assert _is_permutation(perm, 512) and report.kept_after >= report.kept_before
    perm, report = P.find_permutation(w, time_budget=None, max_iterations=3)
    assert report.stopped_by == "max_iterations" and report.iterations == 3
    assert report.kept_after > report.kept_before
    perm, report = P.find_permutation(w, time_budget=None, max_iterations=0)
    assert np.array_equal(perm, np.arange(512)) and report.iterations == 0
    assert report.kept_after == report.kept_before


def test_no_escapes_is_plain_descent():
    w = np.random.default_rng(3).laplace(size=(16, 64))
    perm, report = P.find_permutation(w, time_budget=None, escape_attempts=0)
    assert report.escapes_tried == 0 and report.stopped_by == "converged"
    with_escapes = P.find_permutation(w, time_budget=None, escape_attempts=10)[1]
    assert with_escapes.kept_after >= report.kept_after


def test_trivial_inputs():
    w = np.arange(12.0).reshape(3, 4)
    perm, report = P.find_permutation(w)
    assert np.array_equal(perm, np.arange(4)) and report.stopped_by == "trivial"
    assert report.kept_after == report.kept_before == 3 + 2 + 7 + 6 + 11 + 10
    zero = np.zeros((4, 16))
    perm, report = P.find_permutation(zero, time_budget=None)
    assert _is_permutation(perm, 16) and report.kept_after == 0 == report.total
    assert report.kept_fraction_after == 1.0
    perm, report = P.find_permutation(np.zeros((0, 16)))
    assert report.stopped_by == "trivial"


def test_report_fields_and_text():
    perm, report = P.find_permutation(SEED, time_budget=None)
    d = report.as_dict()
    assert d["improvement"] == report.kept_after - report.kept_before > 0
    assert d["kept_fraction_after"] == pytest.approx(report.kept_after / report.total)
    assert report.relative_improvement == pytest.approx(report.improvement / report.kept_before)
    text = str(report)
    assert "kept magnitude 1226 -> 1270" in text and "stopped by converged" in text


@pytest.mark.parametrize("dtype", [np.float16, ml_dtypes.bfloat16, np.int8, np.float32,
                                   ml_dtypes.float8_e4m3fn])
def test_kept_magnitude_matches_the_reference(dtype):
    rng = np.random.default_rng(4)
    w = (rng.standard_normal((16, 32)) * 20).astype(dtype)
    perm = rng.permutation(32)
    for p in (None, perm):
        wp = w if p is None else w[:, p]
        expected = np.abs(ref.prune_2to4(wp).astype(np.float64)).sum()
        assert P.kept_magnitude(w, p) == pytest.approx(expected, rel=1e-13)
    assert np.isnan(P.kept_magnitude(np.array([[1.0, np.nan, 0.0, 2.0]])))


def test_dtypes_and_one_dimensional_rows():
    row = np.array([100, 90, 80, 10, 20, 40, 30, 70], dtype=np.int8)
    perm, report = P.find_permutation(row, time_budget=None)
    assert report.total - report.kept_after == 100
    perm16, report16 = P.find_permutation(row.astype(np.float16), time_budget=None)
    assert report16.kept_after == report.kept_after


def test_invalid_inputs():
    with pytest.raises(ValueError, match="multiple of 4"):
        P.find_permutation(np.ones((2, 6)))
    with pytest.raises(ValueError, match="matrix"):
        P.find_permutation(np.ones((2, 2, 8)))
    with pytest.raises(ValueError, match="finite"):
        P.find_permutation(np.array([[1.0, np.inf, 0, 0, 1, 2, 3, 4]]))
    with pytest.raises(TypeError, match="complex"):
        P.find_permutation(np.ones((2, 8), dtype=complex))
    with pytest.raises(ValueError, match="time_budget"):
        P.find_permutation(np.ones((2, 8)), time_budget=-1)
    with pytest.raises(ValueError, match="escape_swaps"):
        P.find_permutation(np.ones((2, 8)), escape_swaps=(3, 2))
    with pytest.raises(ValueError, match="not a permutation"):
        P.apply_permutation(np.ones((2, 4)), [0, 1, 1, 2])
    with pytest.raises(ValueError, match="out of range"):
        P.invert_permutation([0, 1, 4])
    with pytest.raises(ValueError, match="length 4"):
        P.kept_magnitude(np.ones((2, 4)), [0, 1, 2])
    with pytest.raises(TypeError, match="integers"):
        P.apply_permutation(np.ones((2, 4)), np.array([0.0, 1.0, 2.0, 3.0]))
    with pytest.raises(ValueError, match="input channels"):
        P.permute_pair(np.ones((8, 3)), None, np.ones((2, 12)), np.arange(8))


# --------------------------------------------------------------------------------------------------
# Permutation helpers
# --------------------------------------------------------------------------------------------------


@given(n=st.integers(1, 40), seed=st.integers(0, 2**31))
def test_invert_and_apply(n, seed):
    rng = np.random.default_rng(seed)
    perm = rng.permutation(n)
    inv = P.invert_permutation(perm)
    assert np.array_equal(inv[perm], np.arange(n)) and np.array_equal(perm[inv], np.arange(n))
    w = rng.standard_normal((3, n))
    assert np.array_equal(P.apply_permutation(P.apply_permutation(w, perm), inv), w)
    assert np.array_equal(P.apply_permutation(w, perm), w[:, perm])
    assert np.array_equal(P.permute_consumer(w, perm), w[:, perm])


def _gelu(x):
    return 0.5 * x * (1 + np.tanh(np.sqrt(2 / np.pi) * (x + 0.044715 * x**3)))


ACTIVATIONS = {"relu": lambda x: np.maximum(x, 0), "tanh": np.tanh, "gelu": _gelu,
               "identity": lambda x: x, "square": np.square}


@settings(max_examples=40)
@given(
    dims=st.tuples(st.integers(1, 6), st.integers(1, 8), st.integers(1, 5), st.integers(1, 7)),
    act=st.sampled_from(sorted(ACTIVATIONS)),
    with_bias=st.booleans(),
    searched=st.booleans(),
    seed=st.integers(0, 2**31),
)
def test_pair_helpers_keep_the_network_function(dims, act, with_bias, searched, seed):
    """consumer(act(producer(x))) is the same before and after permute_pair, for elementwise act.

    Integer-valued data make every sum exact, so the outputs must be bitwise equal."""
    n_in, groups, n_out, batch = dims
    hidden = 4 * groups
    rng = np.random.default_rng(seed)
    w1 = rng.integers(-9, 10, (hidden, n_in)).astype(np.float64)
    b1 = rng.integers(-9, 10, hidden).astype(np.float64) if with_bias else None
    w2 = rng.integers(-9, 10, (n_out, hidden)).astype(np.float64)
    b2 = rng.integers(-9, 10, n_out).astype(np.float64)
    x = rng.integers(-9, 10, (n_in, batch)).astype(np.float64)
    if searched:
        perm, _ = P.find_permutation(w2, time_budget=None, seed=seed, escape_attempts=1)
    else:
        perm = rng.permutation(hidden)
    f = ACTIVATIONS[act]

    def net(a, b, c):
        h = a @ x + (0 if b is None else b[:, None])
        return c @ f(h) + b2[:, None]

    p1, pb1, p2 = P.permute_pair(w1, b1, w2, perm)
    assert (pb1 is None) == (b1 is None)
    assert np.array_equal(p1, w1[perm]) and np.array_equal(p2, w2[:, perm])
    before, after = net(w1, b1, w2), net(p1, pb1, p2)
    if act in ("relu", "identity", "square"):
        assert np.array_equal(after, before)  # exact integer arithmetic
    else:
        np.testing.assert_allclose(after, before, rtol=1e-12, atol=1e-12)
    # the producer alone: its outputs are the original ones, renumbered
    h, hp = w1 @ x, p1 @ x
    assert np.array_equal(hp, h[perm])


def test_pair_helpers_on_a_searched_float_network():
    """A float MLP: permuting its hidden layer with the searched permutation changes the output
    only by rounding, and keeps more magnitude when the consumer is pruned."""
    rng = np.random.default_rng(11)
    w1, b1 = rng.standard_normal((64, 20)), rng.standard_normal(64)
    w2 = rng.standard_t(3, size=(16, 64))
    x = rng.standard_normal((20, 50))
    perm, report = P.find_permutation(w2, time_budget=None, seed=0)
    p1, pb1, p2 = P.permute_pair(w1, b1, w2, perm)
    y = w2 @ np.maximum(w1 @ x + b1[:, None], 0)
    yp = p2 @ np.maximum(p1 @ x + pb1[:, None], 0)
    np.testing.assert_allclose(yp, y, rtol=1e-12, atol=1e-12)
    assert P.kept_magnitude(p2) == report.kept_after > P.kept_magnitude(w2)
    w, b = P.permute_producer(w1, None, perm)
    assert b is None and np.array_equal(w, w1[perm])


# --------------------------------------------------------------------------------------------------
# Other array libraries
# --------------------------------------------------------------------------------------------------


def _cupy_or_skip():
    cupy = pytest.importorskip("cupy")
    from pycusparselt._native.devices import cuda_devices

    reason = cuda_devices()[1]  # no driver, no device
    if reason is not None:
        pytest.skip(f"CuPy is installed but has no usable GPU ({reason})")
    return cupy


def test_cupy_arrays():
    cupy = _cupy_or_skip()
    w = np.random.default_rng(6).standard_t(3, size=(64, 128)).astype(np.float32)
    wd = cupy.asarray(w)
    assert P.kept_magnitude(wd) == pytest.approx(P.kept_magnitude(w), rel=1e-12)
    perm, report = P.find_permutation(wd, time_budget=None, seed=0, escape_attempts=3)
    assert isinstance(perm, np.ndarray) and _is_permutation(perm, 128)
    assert "CuPy (GPU)" in report.method and report.kept_after > report.kept_before
    assert report.kept_after == pytest.approx(P.kept_magnitude(w, perm), rel=1e-12)
    permuted = P.apply_permutation(wd, perm)
    assert isinstance(permuted, cupy.ndarray)
    assert np.array_equal(cupy.asnumpy(permuted), w[:, perm])
    p1, pb1, p2 = P.permute_pair(cupy.ones((128, 3)), cupy.arange(128.0), wd, perm)
    assert np.array_equal(cupy.asnumpy(pb1), np.arange(128.0)[perm])


def test_torch_tensors():
    torch = pytest.importorskip("torch")
    w = torch.randn(16, 32, generator=torch.Generator().manual_seed(0))
    perm, report = P.find_permutation(w, time_budget=None, escape_attempts=2)
    assert _is_permutation(perm, 32)
    assert report.kept_after == pytest.approx(P.kept_magnitude(w.numpy(), perm))
    permuted = P.apply_permutation(w, perm)
    assert isinstance(permuted, torch.Tensor) and torch.equal(permuted, w[:, torch.as_tensor(perm)])
