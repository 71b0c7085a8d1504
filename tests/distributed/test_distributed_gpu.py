"""Tensor-parallel layers on GPUs over NCCL: one rank on one GPU, and every GPU of the machine where it has several.

Results are compared with the NumPy reference on the pruned weights (``reference.assert_close`` for products
computed whole, :func:`row_parallel_bounds` for sums of partials), stage by stage: the block's second layer
is checked on the hidden activations the GPU produced. Tests that need more GPUs than the machine has skip,
saying how many they need. On a machine with several GPUs::

    python -P -m pytest -m gpu tests/distributed
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
import uuid
from pathlib import Path

import ml_dtypes
import numpy as np
import pytest
from gpus import needs_gpus

from pycusparselt import SparseLinear, reference
from pycusparselt import distributed as dist

pytestmark = pytest.mark.gpu
cp = pytest.importorskip("cupy")

F16, BF16 = np.dtype(np.float16), np.dtype(ml_dtypes.bfloat16)
EXAMPLES = Path(__file__).resolve().parents[2] / "examples"


def _draw(rng, shape, dtype):
    return rng.standard_normal(shape).astype(dtype)


def _host(a):
    return cp.asnumpy(a)


def _check_linear(y, x_h, w_pruned, b_h, activation=None):
    """``y`` (device, (batch, out)) against the reference of ``activation(x @ W.T + b)``."""
    desired = reference.matmul(w_pruned, x_h.T, bias=b_h, activation=activation)
    reference.assert_close(_host(y).T, desired, a=w_pruned, b=x_h.T, bias=b_h, activation=activation)


# -- NCCL and the one-rank group -----------------------------------------------------------------------


def test_nccl_loads_and_reports_its_version(nccl):
    version = int(nccl.get_version())
    print(f"NCCL {version}")
    assert version >= 20000  # NCCL 2.x codes are major * 10000 + minor * 100 + patch


def test_one_rank_group_from_the_environment(one_rank):
    assert one_rank.ranks == (0,) and one_rank.world_size == 1 and one_rank.devices == (0,)
    assert one_rank.nccl_version >= 20000
    a = cp.arange(12, dtype=cp.float32).reshape(3, 4)
    one_rank.all_reduce(a)  # a sum over one rank leaves the values
    assert cp.array_equal(a, cp.arange(12, dtype=cp.float32).reshape(3, 4))
    g = one_rank.all_gather(cp.asarray(np.arange(6, dtype=np.float16).astype(BF16)))
    assert g.shape == (1, 6) and np.array_equal(_host(g)[0].astype(np.float32), np.arange(6, dtype=np.float32))
    s = cp.cuda.Stream(non_blocking=True)
    b = cp.ones(1000, dtype=F16)
    one_rank.all_reduce(b, stream=s)
    s.synchronize()
    assert float(b.sum()) == 1000.0
    with pytest.raises(TypeError, match="CuPy arrays"):
        one_rank.all_reduce(np.ones(3, np.float32))
    with pytest.raises(ValueError, match="C-contiguous"):
        one_rank.all_reduce(cp.ones((4, 4), cp.float32).T[:, :2])
    with pytest.raises(TypeError, match="cannot add"):
        one_rank.all_reduce(cp.ones(4, cp.complex64))


@pytest.mark.parametrize("dtype", [F16, BF16])
@pytest.mark.parametrize("gather", [True, False])
def test_column_parallel_one_rank(one_rank, dtype, gather):
    rng = np.random.default_rng(1)
    w, b, x = _draw(rng, (192, 256), dtype), _draw(rng, 192, dtype), _draw(rng, (64, 256), dtype)
    layer = dist.ColumnParallelSparseLinear(cp.asarray(w), cp.asarray(b), group=one_rank, gather_output=gather,
                                            activation="relu")
    y = layer(cp.asarray(x))
    assert isinstance(y, cp.ndarray) and y.shape == (64, 192) and y.device.id == 0
    pruned = reference.prune_2to4(w)
    _check_linear(y, x, pruned, b, "relu")
    single = SparseLinear(cp.asarray(w), cp.asarray(b), activation="relu")(cp.asarray(x))
    _check_linear(single, x, pruned, b, "relu")


@pytest.mark.parametrize("dtype", [F16, BF16])
def test_row_parallel_one_rank(one_rank, dtype):
    rng = np.random.default_rng(2)
    w, b, x = _draw(rng, (128, 512), dtype), _draw(rng, 128, dtype), _draw(rng, (96, 512), dtype)
    layer = dist.RowParallelSparseLinear(cp.asarray(w), cp.asarray(b), group=one_rank, input_is_parallel=False)
    y = layer(cp.asarray(x))
    _check_linear(y, x, reference.prune_2to4(w), b)


def test_mlp_one_rank_in_two_stages(one_rank):
    rng = np.random.default_rng(3)
    w1, b1 = _draw(rng, (1024, 256), F16) / 16, _draw(rng, 1024, F16)
    w2, b2 = _draw(rng, (256, 1024), F16) / 32, _draw(rng, 256, F16)
    x = _draw(rng, (128, 256), F16)
    mlp = dist.ParallelSparseMLP(*(cp.asarray(a) for a in (w1, b1, w2, b2)), group=one_rank, activation="relu")
    y = mlp(cp.asarray(x))
    h = mlp.fc1(cp.asarray(x))  # the hidden activations, exactly as the block computed them
    p1, p2 = reference.prune_2to4(w1), reference.prune_2to4(w2)
    _check_linear(h, x, p1, b1, "relu")
    lo, hi = dist.row_parallel_bounds(_host(h), p2, b2, bounds=mlp.bounds)
    y64 = _host(y).astype(np.float64)
    assert np.all((lo <= y64) & (y64 <= hi))


def test_int8_mode_one_rank_equals_the_single_layer(one_rank):
    rng = np.random.default_rng(4)
    w, b, x = _draw(rng, (256, 512), F16), _draw(rng, 256, F16), _draw(rng, (64, 512), F16)
    kw = dict(mode="int8", input_scale=0.03, activation="relu")
    layer = dist.ColumnParallelSparseLinear(cp.asarray(w), cp.asarray(b), group=one_rank, **kw)
    single = SparseLinear(cp.asarray(w), cp.asarray(b), **kw)
    cpu = SparseLinear(w, b, **kw)
    y, y_single, y_cpu = (a.astype(np.float64) for a in (_host(layer(cp.asarray(x))), _host(single(cp.asarray(x))),
                                                         cpu(x)))
    assert np.count_nonzero(y_cpu) > y_cpu.size // 4

    def one_rounding(a, b):
        # int8 products accumulate exactly in int32; the float32 epilogue (scales, bias, ReLU) and the rounding
        # to float16 may differ by one ulp of the output, or by float32's rounding next to ReLU's zero
        ulp = np.spacing(np.maximum(np.abs(a), np.abs(b)).astype(F16)).astype(np.float64)
        return np.all(np.abs(a - b) <= np.maximum(ulp, 2.0**-14))

    assert one_rounding(y, y_single) and one_rounding(y, y_cpu)


def test_local_group_of_one_device(nccl):
    rng = np.random.default_rng(5)
    w, x = _draw(rng, (64, 128), F16), _draw(rng, (16, 128), F16)
    with dist.NcclGroup.local([0]) as group:
        assert group.ranks == (0,) and group.devices == (0,)
        y = dist.ColumnParallelSparseLinear(cp.asarray(w), group=group)(cp.asarray(x))
        _check_linear(y, x, reference.prune_2to4(w), None)
    with pytest.raises(ValueError, match="distinct device"):
        dist.NcclGroup.local([0, 0])


def test_the_example_on_one_gpu_without_a_launcher():
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    result = subprocess.run([sys.executable, "-P", str(EXAMPLES / "tensor_parallel_mlp.py"), "--backend", "nccl",
                             "--tokens", "256"], capture_output=True, text=True, timeout=300, env=env)
    assert result.returncode == 0, result.stderr
    assert "1 rank(s), backend nccl, engine single" in result.stdout
    assert "agrees with the single-device block" in result.stdout


# -- several GPUs: one process driving them all (ncclCommInitAll), and one process each --------------


def _worlds():
    return [2, 3, 4, 8]


@pytest.mark.parametrize("world", _worlds())
@pytest.mark.parametrize("dtype", [F16, BF16])
def test_column_parallel_across_gpus(nccl, world, dtype):
    needs_gpus(world)
    rng = np.random.default_rng(world)
    out = 96 * world + 32  # uneven shards: the gather pads them to the widest
    w, b, x = _draw(rng, (out, 256), dtype), _draw(rng, out, dtype), _draw(rng, (48, 256), dtype)
    with dist.NcclGroup.local(list(range(world))) as group:
        layer = dist.ColumnParallelSparseLinear(cp.asarray(w), cp.asarray(b), group=group, activation="relu",
                                                multiple=32)
        assert len(set(layer.sizes)) > 1
        outputs = layer(group.replicate(cp.asarray(x)))
        pruned = reference.prune_2to4(w)
        for device, y in enumerate(outputs):
            assert y.device.id == device
            _check_linear(y, x, pruned, b, "relu")
        with pytest.raises(ValueError, match="device"):  # every rank's input on its own GPU
            layer([cp.asarray(x)] * world)


@pytest.mark.parametrize("world", _worlds())
@pytest.mark.parametrize("dtype", [F16, BF16])
def test_row_parallel_across_gpus(nccl, world, dtype):
    needs_gpus(world)
    rng = np.random.default_rng(10 + world)
    w, b, x = _draw(rng, (128, 160 * world), dtype), _draw(rng, 128, dtype), _draw(rng, (64, 160 * world), dtype)
    with dist.NcclGroup.local(list(range(world))) as group:
        layer = dist.RowParallelSparseLinear(cp.asarray(w), cp.asarray(b), group=group, input_is_parallel=False)
        outputs = layer(group.replicate(cp.asarray(x)))
        lo, hi = dist.row_parallel_bounds(x, reference.prune_2to4(w), b, bounds=layer.bounds)
        first = _host(outputs[0])
        for y in outputs:
            y64 = _host(y).astype(np.float64)
            assert np.all((lo <= y64) & (y64 <= hi))
            assert np.array_equal(_host(y), first)  # every rank holds the same sum


@pytest.mark.parametrize("world", _worlds())
def test_mlp_across_gpus_exact_on_small_integers(nccl, world):
    needs_gpus(world)
    rng = np.random.default_rng(20 + world)
    w1 = rng.integers(-2, 3, size=(256 * world, 128)).astype(F16)
    w2 = rng.integers(-2, 3, size=(64, 256 * world)).astype(F16)
    b1, b2 = rng.integers(-2, 3, size=256 * world).astype(F16), rng.integers(-2, 3, size=64).astype(F16)
    x = rng.integers(-2, 3, size=(32, 128)).astype(F16)
    expected = SparseLinear(w2, b2)(SparseLinear(w1, b1, activation="relu")(x))  # the reference, on the CPU
    assert np.count_nonzero(expected) > expected.size // 2
    with dist.NcclGroup.local(list(range(world))) as group:
        mlp = dist.ParallelSparseMLP(*(cp.asarray(a) for a in (w1, b1, w2, b2)), group=group)
        for y in mlp(group.replicate(cp.asarray(x))):  # every partial sum is exact: the same bits
            assert np.array_equal(_host(y), expected)


# -- one process per GPU, started by the launchers users have ------------------------------------------


def _launcher(kind: str, nproc: int) -> list[str]:
    """The command that starts ``nproc`` processes of a script under ``kind``, or a skip saying what is missing."""
    if kind == "torchrun":
        pytest.importorskip("torch", reason="torchrun needs PyTorch")
        return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc)]
    pytest.importorskip("mpi4py", reason="the mpi engine needs mpi4py")
    mpirun = shutil.which("mpirun")
    if mpirun is None:
        pytest.skip("no MPI runtime (mpirun) on this machine")
    return [mpirun, "-np", str(nproc), "--oversubscribe", sys.executable, "-m", "mpi4py"]


def _run(command: list[str], timeout: float = 300) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    env.update(OMPI_ALLOW_RUN_AS_ROOT="1", OMPI_ALLOW_RUN_AS_ROOT_CONFIRM="1", PYTHONSAFEPATH="1")
    return subprocess.run(command, capture_output=True, text=True, timeout=timeout, env=env)


@pytest.mark.parametrize("kind, engine", [("torchrun", "torch"), ("mpirun", "mpi")])
@pytest.mark.parametrize("world", [2, 4])
def test_the_example_on_several_gpus(kind, engine, world):
    needs_gpus(world)
    result = _run([*_launcher(kind, world), str(EXAMPLES / "tensor_parallel_mlp.py"), "--backend", "nccl",
                   "--tokens", "512"])
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"{world} rank(s), backend nccl, engine {engine}" in result.stdout
    assert "agrees with the single-device block" in result.stdout


@pytest.mark.parametrize("kind", ["torchrun", "mpirun"])
def test_the_example_on_the_host_backend_in_several_processes(kind):
    result = _run([*_launcher(kind, 3), str(EXAMPLES / "tensor_parallel_mlp.py"), "--backend", "host",
                   "--hidden", "128", "--ffn", "512", "--tokens", "16"])
    assert result.returncode == 0, result.stderr[-3000:]
    assert "3 rank(s), backend host" in result.stdout and "agrees with the single-device block" in result.stdout


_JOB = """
import sys
import cupy as cp
from pycusparselt import distributed as dist
group = dist.init_process_group('nccl', engine=sys.argv[1])
r = group.rank
a = cp.full(1024, r + 1, dtype=cp.float32)
group.all_reduce(a)
g = group.all_gather(cp.full(3, r, dtype=cp.int32))
cp.cuda.get_current_stream().synchronize()
group.barrier()
sys.stdout.write(f'rank {r} on GPU {cp.cuda.Device().id} via {group.engine}: {float(a[0])} {g[:, 0].tolist()}\\n')
group.close()
"""


@pytest.mark.parametrize("kind, engine", [("torchrun", "torch"), ("torchrun", "cupyx"), ("mpirun", "mpi")])
def test_process_groups_across_gpus(tmp_path, kind, engine):
    needs_gpus(2)
    if engine == "cupyx":
        pytest.importorskip("cupyx.distributed", reason="CuPy's distributed module is missing")
    script = tmp_path / "job.py"
    script.write_text(_JOB)
    result = _run([*_launcher(kind, 2), str(script), engine])
    assert result.returncode == 0, result.stderr[-3000:]
    lines = sorted(line for line in result.stdout.splitlines() if line.startswith("rank"))
    assert lines == [f"rank 0 on GPU 0 via {engine}: 3.0 [0, 1]", f"rank 1 on GPU 1 via {engine}: 3.0 [0, 1]"]


def test_a_rank_that_dies_stops_the_job(tmp_path):
    """Rank 1 fails after joining while rank 0 waits in a collective: torchrun ends the job, with rank 1's
    error, in well under 30 s, and no process of the job is left."""
    needs_gpus(2)
    marker = f"job_{uuid.uuid4().hex}"
    script = tmp_path / f"{marker}.py"
    script.write_text(
        "import cupy as cp\n"
        "from pycusparselt import distributed as dist\n"
        "group = dist.init_process_group('nccl')\n"
        "if group.rank == 1:\n"
        "    raise RuntimeError('rank 1 fails on purpose')\n"
        "group.all_reduce(cp.ones(16, cp.float32))\n"
        "cp.cuda.get_current_stream().synchronize()\n"
        "group.barrier()\n"
    )
    began = time.monotonic()
    result = _run([*_launcher("torchrun", 2), str(script)], timeout=120)
    elapsed = time.monotonic() - began
    assert result.returncode != 0
    assert "rank 1 fails on purpose" in result.stderr
    assert elapsed < 30, f"the job took {elapsed:.1f} s to stop"
    left = subprocess.run(["pgrep", "-f", marker], capture_output=True, text=True)
    assert left.stdout.strip() == "", f"processes left behind: {left.stdout}"
