"""The block's forms on two GPUs over NCCL: reduce-scatter, the sequence-parallel MLP (in one process driving
both GPUs, and one process per GPU with the collectives on a second stream, eagerly and captured in a CUDA
graph) and data parallelism, against the one-device block with the same weights on small integers (every
product and partial sum exact, so every correct split has the same bits). Tests skip, saying so, on machines
with fewer than two GPUs; the one-rank tests run on one GPU. On two GPUs of one host::

    python -P -m pytest -m gpu tests/distributed/test_distributed_forms_gpu.py
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import ml_dtypes
import numpy as np
import pytest
from gpus import needs_gpus

from pycusparselt import SparseLinear
from pycusparselt import distributed as dist

pytestmark = pytest.mark.gpu
cp = pytest.importorskip("cupy")

F16, BF16, F32 = np.dtype(np.float16), np.dtype(ml_dtypes.bfloat16), np.dtype(np.float32)


def _ints(rng, shape):
    return rng.integers(-2, 3, size=shape).astype(F16)


def _block(rng):
    return _ints(rng, (512, 128)), _ints(rng, 512), _ints(rng, (64, 512)), _ints(rng, 64)


@pytest.mark.parametrize("chunks", [1, 3])
def test_sequence_form_one_rank_on_two_streams_eager_and_captured(one_rank, chunks):
    rng = np.random.default_rng(chunks)
    w1, b1, w2, b2 = _block(rng)
    x = _ints(rng, (40, 128))
    expected = SparseLinear(w2, b2)(SparseLinear(w1, b1, activation="relu")(x))
    mlp = dist.ParallelSparseMLP(*(cp.asarray(a) for a in (w1, b1, w2, b2)), group=one_rank, form="sequence",
                                 chunks=chunks)
    stream = cp.cuda.Stream(non_blocking=True)
    share = cp.asarray(x)
    y = mlp(share, tokens=40, stream=stream)
    stream.synchronize()
    assert np.array_equal(cp.asnumpy(y), expected)
    stream.begin_capture()
    y = mlp(share, tokens=40, stream=stream)
    graph = stream.end_capture()
    graph.launch(stream)
    stream.synchronize()
    assert np.array_equal(cp.asnumpy(y), expected)


@pytest.mark.parametrize("dtype", [F16, BF16, F32])
def test_reduce_scatter_across_two_gpus(nccl, dtype):
    needs_gpus(2)
    rng = np.random.default_rng(1)
    hosts = [rng.integers(-50, 51, size=(2, 3, 40)).astype(dtype) for _ in range(2)]
    with dist.NcclGroup.local([0, 1]) as group:
        arrays = []
        for device, h in enumerate(hosts):
            with cp.cuda.Device(device):
                arrays.append(cp.asarray(h))
        pieces = group.reduce_scatter(arrays)
        for device, piece in enumerate(pieces):
            with cp.cuda.Device(device):
                assert piece.device.id == device and piece.shape == (3, 40)
                expected = (hosts[0][device].astype(np.float64) + hosts[1][device].astype(np.float64)).astype(dtype)
                assert np.array_equal(cp.asnumpy(piece), expected)
        with pytest.raises(ValueError, match=r"reduce_scatter: expected an array of shape \(world_size=2"):
            group.reduce_scatter([a[0] for a in arrays])


@pytest.mark.parametrize("tokens, chunks", [(16, 1), (17, 3), (64, 4)])
def test_sequence_form_with_two_gpus_in_one_process(nccl, tokens, chunks):
    needs_gpus(2)
    rng = np.random.default_rng(tokens)
    w1, b1, w2, b2 = _block(rng)
    x = _ints(rng, (tokens, 128))
    expected = SparseLinear(w2, b2)(SparseLinear(w1, b1, activation="relu")(x))  # on the CPU
    assert np.count_nonzero(expected) > expected.size // 2
    with dist.NcclGroup.local([0, 1]) as group:
        mlp = dist.ParallelSparseMLP(*(cp.asarray(a) for a in (w1, b1, w2, b2)), group=group, form="sequence",
                                     chunks=chunks)
        bounds = dist.sequence_bounds(tokens, 2)
        shares = []
        for device, (a, b) in enumerate(bounds):
            with cp.cuda.Device(device):
                shares.append(cp.asarray(x[a:b]))
        ys = mlp(shares, tokens=tokens)
        for device, ((a, b), y) in enumerate(zip(bounds, ys, strict=True)):
            assert y.device.id == device
            assert np.array_equal(cp.asnumpy(y), expected[a:b])


_JOB = textwrap.dedent("""
    import sys

    import cupy as cp
    import numpy as np
    from pycusparselt import SparseLinear
    from pycusparselt import distributed as dist

    dist.pin_local_gpu()
    group = dist.init_process_group("nccl", device=0)
    r = group.rank
    capture = sys.argv[1] == "capture"
    rng = np.random.default_rng(0)  # the same weights and inputs on every rank
    ints = lambda shape: rng.integers(-2, 3, size=shape).astype(np.float16)
    w1, b1, w2, b2 = ints((512, 128)), ints(512), ints((64, 512)), ints(64)
    fc1, fc2 = SparseLinear(w1, b1, activation="relu"), SparseLinear(w2, b2)  # the CPU's one-device block
    # rank q sends arange(10).reshape(2, 5) + 10 (q + 1): rank r's block of the sum is 30 + 2 * arange(5r, 5r + 5)
    blocks = cp.arange(10, dtype=cp.float32).reshape(2, 5) + 10 * (r + 1)
    piece = group.reduce_scatter(blocks)
    cp.cuda.get_current_stream().synchronize()
    want = 30 + 2 * (np.arange(5, dtype=np.float32) + 5 * r)
    lines = [f"reduce_scatter {'ok' if np.array_equal(cp.asnumpy(piece), want) else 'WRONG'}"]
    for tokens, chunks in ((17, 1), (17, 3), (1024, 4)):
        x = ints((tokens, 128))
        one = fc2(fc1(x))
        a, b = dist.sequence_bounds(tokens, 2)[r]
        mlp = dist.ParallelSparseMLP(*(cp.asarray(v) for v in (w1, b1, w2, b2)), group=group, form="sequence",
                                     chunks=chunks)
        share = cp.asarray(x[a:b])
        stream = cp.cuda.Stream(non_blocking=True)
        y = mlp(share, tokens=tokens, stream=stream)  # eager, and the warm-up of the capture
        stream.synchronize()
        good = np.array_equal(cp.asnumpy(y), one[a:b])
        if capture:
            stream.begin_capture()
            y = mlp(share, tokens=tokens, stream=stream)
            graph = stream.end_capture()
            for _ in range(2):
                graph.launch(stream)
            stream.synchronize()
            good = good and np.array_equal(cp.asnumpy(y), one[a:b])
        lines.append(f"tokens {tokens} chunks {chunks} {'ok' if good else 'WRONG'}")
    dp = dist.DataParallel(SparseLinear(cp.asarray(w1), cp.asarray(b1), activation="relu"), group=group)
    x = ints((33, 128))
    y = dp(cp.asarray(x))
    cp.cuda.get_current_stream().synchronize()
    lines.append(f"data {'ok' if np.array_equal(cp.asnumpy(y), fc1(x)) else 'WRONG'}")
    group.barrier()
    for line in lines:
        sys.stdout.write(f"rank {r} {line}\\n")  # one write per line: the ranks share the pipe
        sys.stdout.flush()
    group.close()
""")


def _torchrun(tmp_path, *argv: str) -> subprocess.CompletedProcess:
    pytest.importorskip("torch", reason="torchrun needs PyTorch")
    script = tmp_path / "forms_gpu_job.py"
    script.write_text(_JOB)
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    env.update(PYTHONSAFEPATH="1", NCCL_NVLS_ENABLE="0", TORCH_SYMM_MEM_DISABLE_MULTICAST="1",
               NVSHMEM_DISABLE_NVLS="1")
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                           str(script), *argv], capture_output=True, text=True, timeout=300, env=env)


def _expected_lines() -> list[str]:
    cases = ["reduce_scatter", "tokens 17 chunks 1", "tokens 17 chunks 3", "tokens 1024 chunks 4", "data"]
    return sorted(f"rank {r} {case} ok" for r in (0, 1) for case in cases)


@pytest.mark.parametrize("how", ["eager", "capture"])
def test_sequence_form_one_gpu_per_process_on_two_streams(tmp_path, how):
    """One process per GPU: the overlapped path (collectives on a second stream), eagerly, and the whole
    chunked block (both streams and every collective) captured once in a CUDA graph and replayed."""
    needs_gpus(2)
    result = _torchrun(tmp_path, how)
    assert result.returncode == 0, result.stderr[-3000:]
    lines = sorted(line for line in result.stdout.splitlines() if line.startswith("rank"))
    assert lines == _expected_lines(), result.stdout + result.stderr[-2000:]
