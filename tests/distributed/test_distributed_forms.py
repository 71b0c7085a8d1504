"""The block's other forms on the CPU: reduce-scatter, the sequence-parallel MLP (all-gather in, reduce-scatter
out, in chunks) and data parallelism, against one device's block with the same weights, in one process
(:meth:`HostGroup.local`) and in two processes joined by gloo (torchrun)."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from pycusparselt import SparseLinear, reference
from pycusparselt import distributed as dist
from pycusparselt.distributed import engines

F16, F32 = np.dtype(np.float16), np.dtype(np.float32)


def _ints(rng, shape, dtype=F16):
    """Small integers: every product and partial sum is exact, so any correct split has the same bits."""
    return rng.integers(-2, 3, size=shape).astype(dtype)


def _weights(rng, d_in=64, hidden=256, d_out=48, draw=_ints):
    return draw(rng, (hidden, d_in)), draw(rng, hidden), draw(rng, (d_out, hidden)), draw(rng, d_out)


def _one_device(w1, b1, w2, b2, x):
    return SparseLinear(w2, b2)(SparseLinear(w1, b1, activation="relu")(x))


# -- reduce-scatter --------------------------------------------------------------------------------


@pytest.mark.parametrize("world", [1, 2, 3])
@pytest.mark.parametrize("dtype", [F16, F32, np.dtype(np.int32)])
def test_reduce_scatter_is_the_all_reduce_split_by_rank(world, dtype):
    rng = np.random.default_rng(world)
    arrays = [(rng.standard_normal((world, 5, 7)) * 100).astype(dtype) for _ in range(world)]
    before = [a.copy() for a in arrays]
    group = dist.HostGroup.local(world)
    pieces = group.reduce_scatter(arrays if world > 1 else arrays[0])
    pieces = pieces if world > 1 else [pieces]
    summed = [a.copy() for a in arrays]
    group.all_reduce(summed if world > 1 else summed[0])
    for rank, piece in enumerate(pieces):
        assert piece.shape == (5, 7) and piece.dtype == dtype
        assert np.array_equal(piece, summed[0][rank])  # the same bits: rank order, rounded at every step
    ints = [rng.integers(-300, 301, size=(world, 5, 7)).astype(dtype) for _ in range(world)]  # exact sums
    exact = group.reduce_scatter(ints if world > 1 else ints[0])
    for rank, piece in enumerate(exact if world > 1 else [exact]):
        assert np.array_equal(piece, sum(a[rank].astype(np.int64) for a in ints).astype(dtype))
    assert all(np.array_equal(a, b) for a, b in zip(arrays, before, strict=True))  # the inputs are left as they were


def test_reduce_scatter_refuses_arrays_without_a_block_per_rank():
    group = dist.HostGroup.local(2)
    with pytest.raises(ValueError, match=r"reduce_scatter: expected an array of shape \(world_size=2, ...\).*\(3, 4\)"):
        group.reduce_scatter([np.zeros((3, 4), np.float32)] * 2)
    with pytest.raises(ValueError, match="every rank's array must have one shape"):
        group.reduce_scatter([np.zeros((2, 4), np.float32), np.zeros((2, 5), np.float32)])
    with pytest.raises(TypeError, match="NumPy arrays"):
        group.reduce_scatter([[1, 2], [3, 4]])


class _Peers(engines.Engine):
    """Rank ``rank`` of ``world``, the others sending ``(r + 1) * 10`` times our array."""

    name = "test"

    def __init__(self, rank, world):
        super().__init__(rank, world, rank)

    def all_gather(self, obj):
        shape, dtype, data = obj
        mine = np.frombuffer(data, dtype=np.dtype(dtype)).reshape(shape)
        return [obj if r == self.rank else (shape, dtype, (mine * (r + 1) * 10).tobytes())
                for r in range(self.world_size)]


def test_reduce_scatter_through_an_engine_keeps_this_ranks_block():
    a = np.arange(12, dtype=np.float32).reshape(3, 4)
    group = dist.HostGroup(3, (1,), (None,), _Peers(1, 3))
    piece = group.reduce_scatter(a.copy())
    assert np.array_equal(piece, a[1] * 10 + a[1] + a[1] * 30)  # ranks 0, 1 (ours), 2: our block, row 1


# -- the sequence-parallel block -------------------------------------------------------------------


def test_sequence_bounds_split_the_tokens_and_refuse_too_few():
    assert dist.sequence_bounds(7, 3) == ((0, 3), (3, 5), (5, 7))
    assert dist.sequence_bounds(8, 2) == ((0, 4), (4, 8))
    with pytest.raises(ValueError, match=r"tokens: expected at least one row per rank \(4\), got 3"):
        dist.sequence_bounds(3, 4)
    with pytest.raises(TypeError, match="tokens"):
        dist.sequence_bounds(4.0, 2)


@pytest.mark.parametrize("world", [1, 2, 3])
@pytest.mark.parametrize("tokens, chunks", [(12, 1), (12, 2), (13, 3), (7, 4), (29, 5), (5, 8)])
def test_sequence_form_equals_one_device_on_exact_sums(world, tokens, chunks):
    """Uneven shares (13 over 2 or 3 ranks, 29 over 2 and 3) and chunks that do not divide them: the rows come
    back in order, each with the one-device block's bits."""
    if tokens < world:
        pytest.skip("fewer tokens than ranks is refused (tested below)")
    rng = np.random.default_rng(100 * world + tokens)
    w1, b1, w2, b2 = _weights(rng)
    x = _ints(rng, (tokens, 64))
    expected = _one_device(w1, b1, w2, b2, x)
    assert np.count_nonzero(expected) > expected.size // 2
    group = dist.HostGroup.local(world)
    mlp = dist.ParallelSparseMLP(w1, b1, w2, b2, group=group, form="sequence", chunks=chunks)
    bounds = dist.sequence_bounds(tokens, world)
    shares = [x[a:b] for a, b in bounds]
    ys = mlp(shares if world > 1 else shares[0], tokens=tokens)
    ys = ys if world > 1 else [ys]
    for (a, b), y in zip(bounds, ys, strict=True):
        assert y.shape == (b - a, 48)
        assert np.array_equal(y, expected[a:b])


@pytest.mark.parametrize("chunks", [1, 3])
def test_sequence_form_has_the_all_reduce_forms_bits_on_random_data(chunks):
    """Random values: the partial sums round, so the result is checked against the all-reduce form (the same
    partials, added in the same rank order) bit for bit, and against the one-device layers' bounds."""
    rng = np.random.default_rng(7)
    w1, b1, w2, b2 = _weights(rng, draw=lambda r, s: (r.standard_normal(s) / 4).astype(F16))
    x = rng.standard_normal((22, 64)).astype(F16)
    group = dist.HostGroup.local(3)
    allreduce = dist.ParallelSparseMLP(w1, b1, w2, b2, group=group)
    sequence = dist.ParallelSparseMLP(w1, b1, w2, b2, group=group, form="sequence", chunks=chunks)
    whole = allreduce([x] * 3)[0]
    bounds = dist.sequence_bounds(22, 3)
    ys = sequence([x[a:b] for a, b in bounds], tokens=22)
    assert np.array_equal(np.concatenate(ys), whole)
    hidden = SparseLinear(w1, b1, activation="relu")(x)
    lo, hi = dist.row_parallel_bounds(hidden, reference.prune_2to4(w2), b2, bounds=sequence.bounds)
    y64 = np.concatenate(ys).astype(np.float64)
    assert np.all((lo <= y64) & (y64 <= hi))


def test_sequence_form_without_tokens_needs_equal_shares():
    rng = np.random.default_rng(3)
    w1, b1, w2, b2 = _weights(rng)
    x = _ints(rng, (10, 64))
    group = dist.HostGroup.local(2)
    mlp = dist.ParallelSparseMLP(w1, b1, w2, b2, group=group, form="sequence", chunks=2)
    ys = mlp([x[:5], x[5:]])
    assert np.array_equal(np.concatenate(ys), _one_device(w1, b1, w2, b2, x))
    with pytest.raises(ValueError, match=r"without tokens= every rank passes one non-zero number of rows, "
                                         r"got \[4, 6\]"):
        mlp([x[:4], x[4:]])
    with pytest.raises(ValueError, match=r"rank 0's share of 10 tokens is 5 rows \(sequence_bounds\(10, 2\)\), "
                                         r"got 4"):
        mlp([x[:4], x[4:]], tokens=10)
    with pytest.raises(ValueError, match=r"x: expected \(rows, 64\) token rows"):
        mlp([x[:5, :32], x[5:, :32]])


def test_form_and_chunks_are_checked():
    rng = np.random.default_rng(4)
    w1, b1, w2, b2 = _weights(rng)
    group = dist.HostGroup.local(2)
    with pytest.raises(ValueError, match="form: expected one of 'allreduce', 'sequence', got 'ring'"):
        dist.ParallelSparseMLP(w1, b1, w2, b2, group=group, form="ring")
    for bad in (0, -1, 1.5, True):
        with pytest.raises(ValueError, match="chunks: expected a positive int"):
            dist.ParallelSparseMLP(w1, b1, w2, b2, group=group, form="sequence", chunks=bad)
    mlp = dist.ParallelSparseMLP(w1, b1, w2, b2, group=group)
    assert mlp.form == "allreduce" and mlp.chunks == 1 and "form='allreduce'" in repr(mlp)
    with pytest.raises(ValueError, match="tokens: only the sequence form"):
        mlp([np.zeros((4, 64), F16)] * 2, tokens=8)


def test_sequence_form_runs_one_all_gather_and_one_reduce_scatter_per_chunk(monkeypatch):
    rng = np.random.default_rng(5)
    w1, b1, w2, b2 = _weights(rng)
    group = dist.HostGroup.local(2)
    calls = []
    for name in ("all_gather", "reduce_scatter", "all_reduce"):
        original = getattr(group, name)
        monkeypatch.setattr(group, name, lambda a, *, stream=None, n=name, f=original: (calls.append(n), f(a))[1])
    mlp = dist.ParallelSparseMLP(w1, b1, w2, b2, group=group, form="sequence", chunks=3)
    x = _ints(rng, (14, 64))
    mlp([x[:7], x[7:]])
    assert calls == ["all_gather", "reduce_scatter"] * 3


# -- data parallelism -------------------------------------------------------------------------------


@pytest.mark.parametrize("world, batch", [(1, 5), (2, 9), (3, 10), (3, 3)])
def test_data_parallel_runs_the_whole_model_on_each_share(world, batch):
    rng = np.random.default_rng(batch)
    w1, b1, w2, b2 = _weights(rng, draw=lambda r, s: (r.standard_normal(s) / 4).astype(F16))
    fc1, fc2 = SparseLinear(w1, b1, activation="relu"), SparseLinear(w2, b2)
    x = rng.standard_normal((batch, 64)).astype(F16)
    expected = fc2(fc1(x))
    group = dist.HostGroup.local(world)
    seen = []
    dp = dist.DataParallel(lambda a: (seen.append(a.shape[0]), fc2(fc1(a)))[1], group=group)
    whole = dp([x] * world if world > 1 else x)
    for y in whole if world > 1 else [whole]:
        assert np.array_equal(y, expected)  # row-wise on the reference: each row as in the whole batch
    assert seen == [b - a for a, b in dist.sequence_bounds(batch, world)]
    shares = dp([x] * world if world > 1 else x, gather=False)
    for (a, b), y in zip(dist.sequence_bounds(batch, world), shares if world > 1 else [shares], strict=True):
        assert np.array_equal(y, expected[a:b])


def test_sequence_form_outputs_the_type_fc2_outputs():
    """A block whose fc2 outputs another type than its input (FP8 fc2, float32 out, float16 in): the sequence
    form's output has fc2's type and the all-reduce form's values, not the input's type."""
    rng = np.random.default_rng(11)
    w1, b1, w2, b2 = _weights(rng, draw=lambda r, s: (r.standard_normal(s) / 4).astype(F16))
    b2 = b2.astype(F32)
    x = rng.standard_normal((10, 64)).astype(F16)
    group = dist.HostGroup.local(2)
    fc2 = {"mode": "fp8", "input_scale": 0.05, "out_dtype": np.float32}
    allreduce = dist.ParallelSparseMLP(w1, b1, w2, b2, group=group, fc2_kwargs=fc2)
    sequence = dist.ParallelSparseMLP(w1, b1, w2, b2, group=group, fc2_kwargs=fc2, form="sequence", chunks=2)
    whole = allreduce([x, x])[0]
    assert whole.dtype == F32
    ys = sequence([x[a:b] for a, b in dist.sequence_bounds(10, 2)], tokens=10)
    assert all(y.dtype == F32 for y in ys)
    assert np.array_equal(np.concatenate(ys), whole)


def test_data_parallel_needs_one_model_per_device_rank():
    class TwoDevices(dist.HostGroup):
        def device_of(self, rank):
            return rank

    group = TwoDevices.local(2)
    with pytest.raises(TypeError, match="model: this process holds 2 ranks, one per device: expected one model "
                                        "per local rank"):
        dist.DataParallel(abs, group=group)
    assert len(dist.DataParallel([abs, abs], group=group).models) == 2


def test_data_parallel_errors_name_the_argument():
    group = dist.HostGroup.local(2)
    with pytest.raises(ValueError, match=r"model: expected one model per local rank \(2\), got 3"):
        dist.DataParallel([abs] * 3, group=group)
    with pytest.raises(TypeError, match="model: expected a callable, got int"):
        dist.DataParallel(3, group=group)
    with pytest.raises(TypeError, match="group: expected a pycusparselt.distributed.Group"):
        dist.DataParallel(abs, group="gloo")
    with pytest.raises(ValueError, match="x: expected the same whole batch"):
        dist.DataParallel(abs, group=group)([np.zeros(4), np.zeros(5)])
    with pytest.raises(ValueError, match=r"shares: rank 1's share of 9 rows is 4 rows, got \(5,\)"):
        dist.gather_rows([np.zeros(5), np.zeros(5)], group=group, batch=9)
    with pytest.raises(ValueError, match=r"tokens: expected at least one row per rank \(2\), got 1"):
        dist.batch_share(np.zeros(1), group=group, rank=0)
    with pytest.raises(ValueError, match=r"rank: expected 0 <= rank < 2, got 2"):
        dist.batch_share(np.zeros(4), group=group, rank=2)


# -- two processes joined by gloo (torchrun) ------------------------------------------------------------

_JOB = textwrap.dedent("""
    import sys

    import numpy as np
    from pycusparselt import SparseLinear
    from pycusparselt import distributed as dist

    group = dist.init_process_group("host")
    r, world = group.rank, group.world_size
    rng = np.random.default_rng(0)  # the same weights and inputs on every rank
    F16 = np.float16
    w1, b1 = rng.integers(-2, 3, (256, 64)).astype(F16), rng.integers(-2, 3, 256).astype(F16)
    w2, b2 = rng.integers(-2, 3, (48, 256)).astype(F16), rng.integers(-2, 3, 48).astype(F16)
    blocks = (np.arange(world * 6, dtype=np.float32).reshape(world, 6) + 1) * (r + 1)
    piece = group.reduce_scatter(blocks)
    expected = sum((np.arange(world * 6, dtype=np.float32).reshape(world, 6)[r] + 1) * (q + 1) for q in range(world))
    status = "ok" if np.array_equal(piece, expected) else f"WRONG {piece} {expected}"
    sys.stdout.write(f"rank {r} reduce_scatter {status}\\n")  # one write per line: the ranks share the pipe
    sys.stdout.flush()
    fc1, fc2 = SparseLinear(w1, b1, activation="relu"), SparseLinear(w2, b2)
    for tokens, chunks in ((16, 1), (17, 3), (9, 4)):
        x = rng.integers(-2, 3, (tokens, 64)).astype(F16)
        one = fc2(fc1(x))
        a, b = dist.sequence_bounds(tokens, world)[r]
        mlp = dist.ParallelSparseMLP(w1, b1, w2, b2, group=group, form="sequence", chunks=chunks)
        y = mlp(x[a:b], tokens=tokens)
        dp = dist.DataParallel(lambda v: fc2(fc1(v)), group=group)(x)
        good = np.array_equal(y, one[a:b]) and np.array_equal(dp, one) and np.count_nonzero(one) > one.size // 2
        sys.stdout.write(f"rank {r} tokens {tokens} chunks {chunks} {'ok' if good else 'WRONG'}\\n")
        sys.stdout.flush()
    group.close()
""")


def test_the_forms_in_two_processes_joined_by_gloo(tmp_path):
    pytest.importorskip("torch", reason="torchrun and the torch engine need PyTorch")
    script = tmp_path / "forms_job.py"
    script.write_text(_JOB)
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    env.update(PYTHONSAFEPATH="1", CUDA_VISIBLE_DEVICES="", GLOO_SOCKET_IFNAME="lo")
    result = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                             str(script)], capture_output=True, text=True, timeout=240, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    lines = sorted(line for line in result.stdout.splitlines() if line.startswith("rank"))
    expected = sorted(f"rank {r} {case} ok" for r in (0, 1)
                      for case in ("reduce_scatter", "tokens 16 chunks 1", "tokens 17 chunks 3", "tokens 9 chunks 4"))
    assert lines == expected, result.stdout + result.stderr[-2000:]
