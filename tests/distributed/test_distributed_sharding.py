"""The sharding arithmetic of tensor-parallel layers, on the CPU: boundaries, 2:4 groups, exact results.

Layers on a :class:`HostGroup` run each shard on the NumPy reference and combine them with NumPy collectives,
so these tests prove, without a GPU, that the shards' products put together are the full layer's product:
bit for bit for column-parallel layers (the quantized modes' per-channel scales included), and for
row-parallel ones wherever the partial sums are exact (small integers), within :func:`row_parallel_bounds`
otherwise.
"""

from __future__ import annotations

import math

import ml_dtypes
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from pycusparselt import SparseLinear, reference
from pycusparselt.gemm import dtypes
from pycusparselt import distributed as dist
from pycusparselt.distributed import sharding

F16, BF16, F32 = np.dtype(np.float16), np.dtype(ml_dtypes.bfloat16), np.dtype(np.float32)


def _small_ints(rng, shape, dtype, low=-3, high=3):
    """Integers whose products and sums stay exact in every float type used here."""
    return rng.integers(low, high + 1, size=shape).astype(dtype)


def _tie_free(rng, shape, dtype):
    """Distinct magnitudes in every row, so pruning has one answer."""
    values = rng.permutation(int(np.prod(shape))).reshape(shape).astype(np.float64)
    return ((values / values.size + 0.01) * rng.choice([-1, 1], size=shape)).astype(dtype)


# -- boundaries -----------------------------------------------------------------------------------


@given(total=st.integers(1, 5000), parts=st.integers(1, 9), multiple=st.sampled_from([1, 4, 8, 16, 32, 48]))
def test_shard_bounds_cover_contiguously_on_multiples(total, parts, multiple):
    units, rest = divmod(total, multiple)
    if units < parts - (1 if rest else 0):
        with pytest.raises(ValueError, match="non-empty shards"):
            sharding.shard_bounds(total, parts, multiple)
        return
    bounds = sharding.shard_bounds(total, parts, multiple)
    assert len(bounds) == parts
    assert bounds[0][0] == 0 and bounds[-1][1] == total
    for (_, e0), (s1, _) in zip(bounds, bounds[1:], strict=False):
        assert e0 == s1
    sizes = sharding.shard_sizes(bounds)
    assert all(size > 0 for size in sizes)
    assert all(start % multiple == 0 for start, _ in bounds)
    # balanced: whole units differ by at most one between shards
    whole = [size // multiple for size in sizes[:-1]] + [(sizes[-1] - rest) // multiple]
    assert max(whole) - min(whole) <= 1
    assert sharding.check_bounds(bounds, total, multiple, "b") == bounds


@pytest.mark.parametrize(
    "args, error, match",
    [
        ((0, 2, 4), ValueError, "total"),
        ((8, 0, 4), ValueError, "parts"),
        ((8, 2, 0), ValueError, "multiple"),
        ((8.0, 2, 4), TypeError, "total"),
        ((True, 2, 4), TypeError, "total"),
        ((8, 3, 4), ValueError, "cannot split 8 features into 3"),
    ],
)
def test_shard_bounds_refuses_bad_arguments(args, error, match):
    with pytest.raises(error, match=match):
        sharding.shard_bounds(*args)


@pytest.mark.parametrize(
    "bounds, match",
    [
        ([(0, 8), (12, 16)], "starts at 12, expected 8"),
        ([(0, 8), (8, 8), (8, 16)], "empty"),
        ([(0, 6), (6, 16)], "not a multiple of 4"),
        ([(0, 8), (8, 12)], "end at 12, expected 16"),
        ([], "none"),
    ],
)
def test_check_bounds_names_the_problem(bounds, match):
    with pytest.raises(ValueError, match=match):
        sharding.check_bounds(bounds, 16, 4, "input features")


@pytest.mark.parametrize("dtype", dtypes.SUPPORTED_INPUTS, ids=str)
def test_aligned_multiples_follow_the_plan_rules(dtype):
    rules = dtypes.rules_for(dtype)
    k = sharding.aligned_multiple(dtype, "in")
    out = sharding.aligned_multiple(dtype, "out")
    # K shards keep whole 2:4 groups and both operands' K alignment; output shards the sparse rows'
    assert k % sharding.GROUP == 0 and k % rules.sparse_multiple == 0 and k % rules.dense_multiple == 0
    assert out % rules.sparse_multiple == 0
    assert sharding.ALIGNED_MULTIPLE % k == 0 and sharding.ALIGNED_MULTIPLE % out == 0
    with pytest.raises(ValueError, match="dim"):
        sharding.aligned_multiple(dtype, "k")


def test_aligned_multiple_refuses_unsupported_types():
    with pytest.raises(TypeError, match="float64"):
        sharding.aligned_multiple(np.float64, "in")


# -- 2:4 groups and shards -------------------------------------------------------------------------


@pytest.mark.parametrize("method", ["strip", "tile"])
@pytest.mark.parametrize("parts", [2, 3, 4])
def test_pruning_commutes_with_k_shards_on_multiples_of_4(method, parts):
    rng = np.random.default_rng(parts)
    w = rng.standard_normal((32, 96)).astype(F16)
    whole = reference.prune_2to4(w, method=method)
    for k0, k1 in sharding.shard_bounds(96, parts, sharding.GROUP):
        assert np.array_equal(reference.prune_2to4(w[:, k0:k1], method=method), whole[:, k0:k1])
    if method == "tile":  # tiles are 4x4: output shards on multiples of 4 keep them whole too
        for o0, o1 in sharding.shard_bounds(32, parts, sharding.GROUP):
            assert np.array_equal(reference.prune_2to4(w[o0:o1], method=method), whole[o0:o1])


def test_a_k_boundary_inside_a_group_changes_the_pruning():
    # why K shards start on multiples of 4: a cut at 2 splits the group (1, 2, 3, 4) into (1, 2) and (3, 4),
    # and each half keeps both of its values, so the shards are no longer 2:4 together
    w = np.array([[1, 2, 3, 4, 5, 6, 7, 8]], dtype=F16)
    halves = np.concatenate([w[:, :2], reference.prune_2to4(w[:, 2:6]), w[:, 6:]], axis=1)
    assert not np.array_equal(halves, reference.prune_2to4(w))
    with pytest.raises(ValueError, match="multiple of 4"):
        dist.RowParallelSparseLinear(w, group=dist.HostGroup.local(2), bounds=[(0, 2), (2, 8)])


# -- column-parallel ---------------------------------------------------------------------------------


@pytest.mark.parametrize("world", [1, 2, 3, 4])
@pytest.mark.parametrize("dtype", [F16, BF16, F32])
def test_column_parallel_equals_the_full_layer_bit_for_bit(world, dtype):
    rng = np.random.default_rng(world)
    w, b = _tie_free(rng, (96, 64), dtype), rng.standard_normal(96).astype(dtype)
    x = rng.standard_normal((5, 64)).astype(dtype)
    full = SparseLinear(w, b, activation="relu")(x)
    layer = dist.ColumnParallelSparseLinear(w, b, group=dist.HostGroup.local(world), activation="relu")
    outputs = layer([x] * world)
    assert len(outputs) == world
    for y in outputs:  # each element is the full layer's computation, so the same bits
        assert y.dtype == full.dtype and np.array_equal(y.view(np.uint8), full.view(np.uint8))
    sharded = dist.ColumnParallelSparseLinear(w, b, group=dist.HostGroup.local(world), activation="relu",
                                              gather_output=False)
    for (o0, o1), y in zip(sharded.bounds, sharded([x] * world), strict=True):
        assert np.array_equal(y.view(np.uint8), full[:, o0:o1].view(np.uint8))
    # the shards' weights are the full layer's pruned weight, cut at the bounds
    whole = SparseLinear(w, b).weight
    for rank, (o0, o1) in enumerate(layer.bounds):
        assert np.array_equal(layer.shards[rank].weight, whole[o0:o1])


def test_column_parallel_with_uneven_shards_and_a_vector_input():
    rng = np.random.default_rng(7)
    w, x = _tie_free(rng, (80, 32), F16), rng.standard_normal(32).astype(F16)
    layer = dist.ColumnParallelSparseLinear(w, group=dist.HostGroup.local(3), multiple=16)
    assert layer.sizes == (32, 32, 16)  # 5 units of 16 over 3 ranks: the padding in the gather must not show
    y = layer([x] * 3)[0]
    assert y.shape == (80,) and np.array_equal(y, SparseLinear(w)(x))


# -- row-parallel ------------------------------------------------------------------------------------


@pytest.mark.parametrize("world", [1, 2, 3, 5])
@pytest.mark.parametrize("dtype", [F16, BF16, F32])
def test_row_parallel_equals_the_full_layer_where_the_sums_are_exact(world, dtype):
    rng = np.random.default_rng(10 + world)
    w, b = _small_ints(rng, (48, 160), dtype), _small_ints(rng, 48, dtype)
    x = _small_ints(rng, (6, 160), dtype)
    full = SparseLinear(w, b)(x)
    layer = dist.RowParallelSparseLinear(w, b, group=dist.HostGroup.local(world), input_is_parallel=False)
    for y in layer([x] * world):
        assert np.array_equal(y.view(np.uint8), full.view(np.uint8))
    # the same with each rank given only its shard of x (the column layer's output form)
    parallel = dist.RowParallelSparseLinear(w, b, group=dist.HostGroup.local(world))
    for y in parallel([x[:, k0:k1] for k0, k1 in parallel.bounds]):
        assert np.array_equal(y, full)


@pytest.mark.parametrize("world", [2, 3, 4])
@pytest.mark.parametrize("dtype", [F16, BF16])
def test_row_parallel_random_data_within_its_bounds(world, dtype):
    rng = np.random.default_rng(world)
    w, b = rng.standard_normal((40, 256)).astype(dtype), rng.standard_normal(40).astype(dtype)
    x = rng.standard_normal((7, 256)).astype(dtype)
    layer = dist.RowParallelSparseLinear(w, b, group=dist.HostGroup.local(world), input_is_parallel=False)
    y = layer([x] * world)[0]
    pruned = reference.prune_2to4(w)
    lo, hi = dist.row_parallel_bounds(x, pruned, b, bounds=layer.bounds)
    y64 = y.astype(np.float64)
    assert np.all((lo <= y64) & (y64 <= hi))
    # the limits are tight enough to see a lost shard or a bias added twice
    k0, k1 = layer.bounds[-1]
    lost = (y64 - reference.matmul(pruned[:, k0:k1], x[:, k0:k1].T).astype(np.float64).T)
    assert not np.all((lo <= lost) & (lost <= hi))
    twice = y64 + b.astype(np.float64)
    assert not np.all((lo <= twice) & (twice <= hi))


def test_row_parallel_bias_is_added_once():
    rng = np.random.default_rng(3)
    w, x = _small_ints(rng, (16, 64), F16), _small_ints(rng, (2, 64), F16)
    b = np.full(16, 100, dtype=F16)
    y = dist.RowParallelSparseLinear(w, b, group=dist.HostGroup.local(4), input_is_parallel=False,
                                     multiple=16)([x] * 4)[0]
    assert np.array_equal(y, SparseLinear(w, b)(x))
    assert np.array_equal(y - b, SparseLinear(w)(x))


# -- quantized modes ---------------------------------------------------------------------------------


@pytest.mark.parametrize("world", [2, 3])
@pytest.mark.parametrize("mode", ["int8", "fp8"])
def test_column_parallel_quantized_per_channel_equals_the_full_layer_bit_for_bit(world, mode):
    rng = np.random.default_rng(world)
    w, b = _tie_free(rng, (96, 128), F16), rng.standard_normal(96).astype(F16)
    x = rng.standard_normal((5, 128)).astype(F16)
    kw = dict(mode=mode, input_scale=0.05, weight_granularity="channel", activation="relu")
    whole = SparseLinear(w, b, **kw)
    full = whole(x)
    layer = dist.ColumnParallelSparseLinear(w, b, group=dist.HostGroup.local(world), **kw)
    # a mode may compute in 8 bits: boundaries aligned for every input type
    assert all(start % sharding.ALIGNED_MULTIPLE == 0 for start, _ in layer.bounds)
    for rank, (o0, o1) in enumerate(layer.bounds):  # per-channel scales are per output row: the full layer's
        assert np.array_equal(layer.shards[rank].weight_scale, whole.weight_scale[o0:o1])
    for y in layer([x] * world):
        assert np.array_equal(y.view(np.uint8), full.view(np.uint8))


@pytest.mark.parametrize("world", [2, 4])
def test_row_parallel_int8_sums_the_shards_own_quantized_products(world):
    rng = np.random.default_rng(world)
    w, b = rng.standard_normal((48, 256)).astype(F16), rng.standard_normal(48).astype(F16)
    x = rng.standard_normal((6, 256)).astype(F16)
    kw = dict(mode="int8", input_scale=0.03)
    layer = dist.RowParallelSparseLinear(w, b, group=dist.HostGroup.local(world), input_is_parallel=False, **kw)
    assert all(start % 32 == 0 for start, _ in layer.bounds)  # int8 plans align K on 32
    partials = [SparseLinear(w[:, k0:k1], b if r == 0 else None, **kw)(x[:, k0:k1])
                for r, (k0, k1) in enumerate(layer.bounds)]
    expected = partials[0]
    for p in partials[1:]:
        expected = expected + p  # float16, in rank order, as the host all-reduce adds
    y = layer([x] * world)[0]
    assert y.dtype == F16 and np.array_equal(y, expected)
    # each shard scales its own slice per channel (documented): the scales of the pruned slice
    pruned = reference.prune_2to4(w)
    for rank, (k0, k1) in enumerate(layer.bounds):
        slice_max = np.abs(pruned[:, k0:k1].astype(np.float32)).max(axis=1)
        assert np.allclose(layer.shards[rank].weight_scale, slice_max / 127, rtol=1e-6)
    # and the result stays an int8-accurate product (a lost shard would be far off)
    exact = x.astype(np.float64) @ pruned.astype(np.float64).T + b
    scale = np.abs(exact).max()
    assert np.abs(y - exact).max() < 0.05 * scale
    assert np.abs(y - partials[-1] - exact).max() > 0.05 * scale


# -- the MLP block -----------------------------------------------------------------------------------


@pytest.mark.parametrize("world", [1, 2, 4])
def test_mlp_equals_two_full_layers_and_takes_one_all_reduce(world, monkeypatch):
    rng = np.random.default_rng(world)
    w1, b1 = _small_ints(rng, (128, 64), F16, -2, 2), _small_ints(rng, 128, F16, -2, 2)
    w2, b2 = _small_ints(rng, (32, 128), F16, -2, 2), _small_ints(rng, 32, F16, -2, 2)
    x = _small_ints(rng, (3, 64), F16, -2, 2)
    group = dist.HostGroup.local(world)
    calls = []
    for name in ("all_reduce", "all_gather"):
        original = getattr(group, name)
        monkeypatch.setattr(group, name, lambda *a, _n=name, _f=original, **k: (calls.append(_n), _f(*a, **k))[1])
    mlp = dist.ParallelSparseMLP(w1, b1, w2, b2, group=group, activation="relu")
    assert mlp.fc1.bounds == mlp.fc2.bounds
    expected = SparseLinear(w2, b2)(SparseLinear(w1, b1, activation="relu")(x))
    assert np.count_nonzero(expected) > 0
    for y in mlp([x] * world):
        assert np.array_equal(y, expected)
    assert calls == ["all_reduce"]


def test_mlp_hidden_split_suits_both_layers():
    group = dist.HostGroup.local(4)
    w1, w2 = np.zeros((4096, 1024), F16), np.zeros((1024, 4096), F16)
    mlp = dist.ParallelSparseMLP(w1, None, w2, None, group=group)
    k = math.lcm(sharding.aligned_multiple(F16, "out"), sharding.aligned_multiple(F16, "in"))
    assert mlp.bounds == sharding.shard_bounds(4096, 4, k)
    assert all(start % k == 0 for start, _ in mlp.bounds)


# -- keyword pass-through and validation -------------------------------------------------------------


def test_layer_keywords_reach_every_shard_and_modes_align_for_every_type(monkeypatch):
    import pycusparselt.distributed.parallel as parallel

    seen = []

    class Recorder(SparseLinear):
        def __init__(self, weight, bias=None, **kwargs):
            seen.append(dict(kwargs))
            super().__init__(weight, bias, **kwargs)

    monkeypatch.setattr(parallel, "SparseLinear", Recorder)
    w = np.ones((64, 128), F16)
    layer = dist.ColumnParallelSparseLinear(w, group=dist.HostGroup.local(2), mode="int8", input_scale=0.5,
                                            autotune=False)
    assert seen == [{"mode": "int8", "input_scale": 0.5, "autotune": False}] * 2
    # a mode may compute in 8 bits: boundaries aligned for every input type (32), not float16's 16
    assert layer.bounds == ((0, 32), (32, 64))
    float_layer = dist.ColumnParallelSparseLinear(np.ones((48, 128), F16), group=dist.HostGroup.local(3))
    assert float_layer.sizes == (16, 16, 16)


def test_small_dimensions_fall_back_to_the_group_multiple():
    layer = dist.RowParallelSparseLinear(np.zeros((8, 24), F16), group=dist.HostGroup.local(3))
    assert layer.bounds == ((0, 8), (8, 16), (16, 24))


@pytest.mark.parametrize(
    "make, error, match",
    [
        (lambda g: dist.ColumnParallelSparseLinear(np.zeros(8, F16), group=g), ValueError, "weight"),
        (lambda g: dist.ColumnParallelSparseLinear(np.zeros((8, 8), F16), np.zeros(4, F16), group=g), ValueError,
         "bias"),
        (lambda g: dist.ColumnParallelSparseLinear(np.zeros((8, 8), F16), group="g"), TypeError, "group"),
        (lambda g: dist.RowParallelSparseLinear(np.zeros((8, 8), F16), group=g, activation="relu"), ValueError,
         "activation"),
        (lambda g: dist.RowParallelSparseLinear(np.zeros((8, 8), F16), group=g, permutation=np.arange(8)),
         ValueError, "permute_pair"),
        (lambda g: dist.RowParallelSparseLinear(np.zeros((8, 16), F16), group=g, multiple=6), ValueError,
         "multiple of 4"),
        (lambda g: dist.RowParallelSparseLinear(np.zeros((8, 16), F16), group=g, bounds=[(0, 16)]), ValueError,
         "expected 2 shards"),
        (lambda g: dist.RowParallelSparseLinear(np.zeros((8, 16), F16), group=g, bounds=[(0, 8), (8, 16)],
                                                multiple=8), ValueError, "not both"),
        (lambda g: dist.ColumnParallelSparseLinear(np.zeros((8, 16), F16), group=g, prune="tile",
                                                   bounds=[(0, 2), (2, 8)]), ValueError, "multiple of 4"),
        (lambda g: dist.ParallelSparseMLP(np.zeros((16, 8), F16), None, np.zeros((8, 12), F16), None, group=g),
         ValueError, "w2"),
    ],
)
def test_construction_errors_name_the_argument(make, error, match):
    with pytest.raises(error, match=match):
        make(dist.HostGroup.local(2))


def test_call_errors_name_the_argument():
    group = dist.HostGroup.local(2)
    w = np.zeros((16, 32), F16)
    column = dist.ColumnParallelSparseLinear(w, group=group)
    x = np.zeros((2, 32), F16)
    with pytest.raises(TypeError, match="list of 2"):
        column(x)
    with pytest.raises(ValueError, match="one array per local rank"):
        column([x])
    row = dist.RowParallelSparseLinear(w, group=group)
    with pytest.raises(ValueError, match="shard of the input features"):
        row([x, x])
    with pytest.raises(ValueError, match="stream"):
        row([x[:, :16], x[:, 16:]], stream=1)
    group.close()
    with pytest.raises(Exception, match="closed"):
        column([x, x])


def test_row_parallel_refuses_outputs_it_cannot_add():
    rng = np.random.default_rng(0)
    layer = dist.RowParallelSparseLinear(
        rng.standard_normal((8, 64)).astype(F16), group=dist.HostGroup.local(2), mode="int8",
        out_dtype=np.int8, input_scale=0.05, output_scale=0.1,
    )
    with pytest.raises(TypeError, match="int8"):
        layer([rng.standard_normal((1, 32)).astype(F16)] * 2)


# -- host collectives ----------------------------------------------------------------------------------


def test_host_collectives_sum_in_rank_order_and_gather():
    group = dist.HostGroup.local(3)
    arrays = [np.array([1.0, 2048.0], F16), np.array([1.0, 1.0], F16), np.array([1.0, 1.0], F16)]
    group.all_reduce(arrays)
    # float16 rounds at each step, in rank order: 2048 + 1 = 2048, + 1 = 2048
    for a in arrays:
        assert np.array_equal(a, np.array([3.0, 2048.0], F16))
    gathered = group.all_gather([np.full(2, r, np.int32) for r in range(3)])
    for g in gathered:
        assert np.array_equal(g, np.repeat(np.arange(3, dtype=np.int32)[:, None], 2, axis=1))
    with pytest.raises(ValueError, match="one shape and dtype"):
        group.all_reduce([np.zeros(2), np.zeros(3), np.zeros(2)])
    with pytest.raises(TypeError, match="NumPy"):
        group.all_reduce([[0.0]] * 3)
