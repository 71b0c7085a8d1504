"""How the ranks of a job meet (the engines: torch.distributed, mpi4py, cupyx.distributed, a job of one), on the
CPU. Jobs of several processes under torchrun and mpirun run in tests/distributed/test_distributed_gpu.py, where those
launchers are installed."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from pycusparselt import distributed as dist
from pycusparselt.distributed import engines

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"
NOTHING = {"torch": False, "mpi4py": False, "cupyx": False}
EVERYTHING = {"torch": True, "mpi4py": True, "cupyx": True}


# -- choosing the engine ----------------------------------------------------------------------------


@pytest.mark.parametrize("env, have, initialized, expected", [
    ({}, EVERYTHING, False, "single"),
    ({}, EVERYTHING, True, "torch"),  # the program's own torch.distributed group comes first
    ({"TORCHELASTIC_RUN_ID": "x", "RANK": "0", "WORLD_SIZE": "2"}, EVERYTHING, False, "torch"),
    ({"OMPI_COMM_WORLD_SIZE": "4", "OMPI_COMM_WORLD_RANK": "1"}, EVERYTHING, False, "mpi"),
    ({"PMI_SIZE": "2", "PMI_RANK": "0"}, {**NOTHING, "mpi4py": True}, False, "mpi"),
    ({"SLURM_STEP_NUM_TASKS": "8", "SLURM_PROCID": "3"}, {**NOTHING, "mpi4py": True}, False, "mpi"),
    ({"SLURM_NTASKS": "8", "SLURM_PROCID": "0"}, NOTHING, False, "single"),  # the batch script itself
    ({"RANK": "1", "WORLD_SIZE": "2", "MASTER_PORT": "1"}, EVERYTHING, False, "torch"),
    ({"RANK": "1", "WORLD_SIZE": "2", "MASTER_PORT": "1"}, {**NOTHING, "cupyx": True}, False, "cupyx"),
    ({"RANK": "0", "WORLD_SIZE": "1"}, NOTHING, False, "single"),
    ({"SLURM_STEP_NUM_TASKS": "1", "SLURM_PROCID": "0"}, NOTHING, False, "single"),  # a one-task step
])
def test_the_engine_follows_the_environment(env, have, initialized, expected):
    assert engines.choose_engine(env, torch_initialized=initialized, have=have) == expected


def test_an_engine_that_is_missing_is_named():
    with pytest.raises(RuntimeError, match="neither PyTorch .* nor CuPy"):
        engines.choose_engine({"RANK": "0", "WORLD_SIZE": "2"}, torch_initialized=False, have=NOTHING)
    with pytest.raises(RuntimeError, match="mpi4py is not installed"):
        engines.choose_engine({"OMPI_COMM_WORLD_SIZE": "2"}, torch_initialized=False, have=NOTHING)
    with pytest.raises(ValueError, match="WORLD_SIZE: expected an integer"):
        engines.choose_engine({"WORLD_SIZE": "two"}, torch_initialized=False, have=EVERYTHING)
    with pytest.raises(ValueError, match="engine: expected 'auto' or one of"):
        engines.make_engine("gloo")


@pytest.mark.parametrize("env, expected", [
    ({}, None),
    ({"LOCAL_RANK": "3"}, 3),
    ({"OMPI_COMM_WORLD_LOCAL_RANK": "2"}, 2),
    ({"MPI_LOCALRANKID": "1"}, 1),
    ({"SLURM_LOCALID": "5"}, 5),
    ({"LOCAL_RANK": "0", "SLURM_LOCALID": "5"}, 0),  # LOCAL_RANK (torchrun's) wins
])
def test_the_rank_within_the_node(env, expected):
    assert engines.local_rank_from_env(env) == expected


def test_a_negative_local_rank_is_refused():
    with pytest.raises(ValueError, match="LOCAL_RANK: expected a non-negative integer"):
        engines.local_rank_from_env({"LOCAL_RANK": "-1"})


def _clean(monkeypatch):
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "TORCHELASTIC_RUN_ID",
                 *engines._MPI_SIZE_VARS, *engines._LOCAL_RANK_VARS):
        monkeypatch.delenv(name, raising=False)


def test_env_config_reads_and_validates(monkeypatch):
    _clean(monkeypatch)
    assert dist.env_config() == {"engine": "single", "rank": 0, "world_size": 1, "local_rank": 0,
                                 "master_addr": "127.0.0.1", "master_port": None}
    monkeypatch.setenv("RANK", "4")
    monkeypatch.setenv("WORLD_SIZE", "4")
    with pytest.raises(ValueError, match="RANK=4 and WORLD_SIZE=4"):
        dist.env_config()
    monkeypatch.setenv("RANK", "x")
    with pytest.raises(ValueError, match="RANK: expected an integer"):
        dist.env_config()
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "1")
    monkeypatch.setenv("MASTER_PORT", "70000")
    with pytest.raises(ValueError, match="MASTER_PORT: expected a port number"):
        dist.env_config()


def test_a_job_of_one_needs_no_engine(monkeypatch):
    _clean(monkeypatch)
    with dist.init_process_group("host") as group:
        assert group.ranks == (0,) and group.world_size == 1 and group.rank == 0 and group.engine == "single"
        a = np.arange(4, dtype=np.float32)
        group.all_reduce(a)
        assert np.array_equal(a, np.arange(4, dtype=np.float32))
        assert np.array_equal(group.all_gather(a), a[None])
        group.barrier()
        assert "engine single" in repr(group)
    assert dist.HostGroup.local(2).engine == "local"
    with pytest.raises(ValueError, match="backend"):
        dist.init_process_group("gloo")
    with pytest.raises(ValueError, match="cupyx engine runs on GPUs"):
        dist.init_process_group("host", engine="cupyx")


class _Recorder(engines.Engine):
    """An engine of ``world`` ranks whose other ranks send what ``others`` gives."""

    name = "test"

    def __init__(self, rank, world, others):
        super().__init__(rank, world, rank)
        self.others = others
        self.closed = 0

    def all_gather(self, obj):
        return [obj if r == self.rank else self.others(r, obj) for r in range(self.world_size)]

    def barrier(self):
        pass

    def close(self):
        self.closed += 1


def test_the_host_group_sums_what_the_engine_gathers():
    a = np.array([1, 2, 3], np.float32)
    engine = _Recorder(1, 3, lambda r, mine: (mine[0], mine[1], (a * (r + 10)).tobytes()))
    group = dist.HostGroup(3, (1,), (None,), engine)
    mine = a.copy()
    group.all_reduce(mine)
    assert np.array_equal(mine, a * 10 + a + a * 12)  # ranks 0, 1 (ours) and 2, in rank order
    gathered = group.all_gather(a.copy())
    assert gathered.shape == (3, 3) and np.array_equal(gathered[2], a * 12)
    group.close()
    group.close()
    assert engine.closed == 1


def test_the_host_group_refuses_a_rank_of_another_shape():
    engine = _Recorder(0, 2, lambda r, mine: ((4,), mine[1], bytes(16)))
    group = dist.HostGroup(2, (0,), (None,), engine)
    with pytest.raises(ValueError, match="rank 1 sent \\(4,\\) float32, rank 0 has \\(3,\\) float32"):
        group.all_reduce(np.zeros(3, np.float32))


def test_the_module_starts_nothing_and_says_which_launcher_to_use():
    result = subprocess.run([sys.executable, "-P", "-m", "pycusparselt.distributed", "--nproc", "2", "x.py"],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 2
    assert "torchrun --nproc_per_node N" in result.stderr and "mpirun -np N" in result.stderr


def test_only_the_torch_engine_opens_a_socket_and_binds_it_to_master_addr():
    """One listening socket in the package: the store of a torch group made without a launcher, bound to the
    address given (tested in test_a_job_without_a_launcher_hosts_its_store_on_master_addr_only)."""
    import pycusparselt

    root = Path(pycusparselt.__file__).parent
    users = [str(p.relative_to(root)) for p in root.rglob("*.py")
             if any(word in p.read_text() for word in ("import socket", "socketserver", ".listen("))]
    assert users == [str(Path("distributed") / "engines.py")]
    text = (root / "distributed" / "engines.py").read_text()
    assert text.count("socket.create_server(") == 1 and "socket.create_server((addr, port)" in text
    assert 'addr = env.get("MASTER_ADDR") or "127.0.0.1"' in text


def test_the_example_in_one_process_on_the_host_backend(monkeypatch):
    env = {k: v for k, v in __import__("os").environ.items()
           if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "TORCHELASTIC_RUN_ID")}
    result = subprocess.run(
        [sys.executable, "-P", str(EXAMPLES / "tensor_parallel_mlp.py"), "--backend", "host", "--hidden", "128",
         "--ffn", "512", "--tokens", "16"], capture_output=True, text=True, timeout=300, env=env)
    assert result.returncode == 0, result.stderr
    assert "1 rank(s), backend host, engine single" in result.stdout
    assert "agrees with the single-device block" in result.stdout


# -- NCCL's unique id, in either of CuPy's forms ---------------------------------------------------------


class _FakeNccl:
    """Records what the communicator was given; ``form`` is the id type this CuPy takes."""

    def __init__(self, form):
        self.form = form
        self.made = []
        fake = self

        class NcclCommunicator:
            def __init__(self, ndev, comm_id, rank):
                if not isinstance(comm_id, fake.form):
                    raise TypeError(f"commId: expected {fake.form.__name__}")
                fake.made.append((ndev, comm_id, rank))

        self.NcclCommunicator = NcclCommunicator


@pytest.mark.parametrize("form", [bytes, tuple])
def test_the_unique_id_travels_as_bytes_and_reaches_either_cupy(form):
    raw = bytes(range(100, 228))  # values above 127: the signed and unsigned readings differ
    signed = tuple(b - 256 if b > 127 else b for b in raw)  # what CuPy < 14 returned on x86
    assert dist.groups._uid_bytes(raw) == raw and dist.groups._uid_bytes(signed) == raw
    fake = _FakeNccl(form)
    dist.groups._communicator(fake, 4, raw, 2)
    ndev, comm_id, rank = fake.made[0]
    assert (ndev, rank) == (4, 2) and bytes(b & 0xFF for b in comm_id) == raw
    with pytest.raises(ValueError, match="128 bytes"):
        dist.groups._uid_bytes(b"short")


def test_the_nccl_backend_without_cupy_says_what_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "cupy", None)  # as on a machine without CuPy
    with pytest.raises(ImportError, match="CuPy"):
        dist.load_nccl()


# -- jobs of several processes on the CPU, where PyTorch's launcher is installed -----------------------------


def _job_env(**extra: str) -> dict:
    """The test's environment without a rank of its own, no GPU, the installed package only."""
    import os

    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    env.update(PYTHONSAFEPATH="1", CUDA_VISIBLE_DEVICES="", **extra)
    return env


def _torchrun(nproc: int, *argv: str, timeout: float = 240) -> subprocess.CompletedProcess:
    pytest.importorskip("torch", reason="torchrun and the torch engine need PyTorch")
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node",
                           str(nproc), *argv], capture_output=True, text=True, timeout=timeout, env=_job_env())


def _mpirun(nproc: int, *argv: str, timeout: float = 240) -> subprocess.CompletedProcess:
    import shutil

    pytest.importorskip("mpi4py", reason="the mpi engine needs mpi4py")
    mpirun = shutil.which("mpirun")
    if mpirun is None:
        pytest.skip("no MPI runtime (mpirun) on this machine")
    env = _job_env(OMPI_ALLOW_RUN_AS_ROOT="1", OMPI_ALLOW_RUN_AS_ROOT_CONFIRM="1")
    return subprocess.run([mpirun, "-np", str(nproc), "--oversubscribe", sys.executable, "-m", "mpi4py", *argv],
                          capture_output=True, text=True, timeout=timeout, env=env)


#: Rank 1 raises while the other ranks wait at a barrier.
_DYING_JOB = (
    "from pycusparselt import distributed as dist\n"
    "group = dist.init_process_group('host')\n"
    "if group.rank == 1:\n"
    "    raise RuntimeError('rank 1 fails on purpose')\n"
    "group.barrier()\n"
)


@pytest.mark.parametrize("launch, engine", [(_torchrun, "torch"), (_mpirun, "mpi")])
def test_the_example_in_several_processes_on_the_host_backend(launch, engine):
    result = launch(3, str(EXAMPLES / "tensor_parallel_mlp.py"), "--backend", "host", "--hidden", "128",
                    "--ffn", "512", "--tokens", "16")
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"3 rank(s), backend host, engine {engine}" in result.stdout
    assert "agrees with the single-device block" in result.stdout


def test_a_rank_that_dies_stops_a_host_job(tmp_path):
    """torchrun ends the job with rank 1's error, quickly, and leaves no process of it behind."""
    import time
    import uuid

    marker = f"job_{uuid.uuid4().hex}"
    script = tmp_path / f"{marker}.py"
    script.write_text(_DYING_JOB)
    began = time.monotonic()
    result = _torchrun(2, str(script), timeout=120)
    elapsed = time.monotonic() - began
    assert result.returncode != 0 and "rank 1 fails on purpose" in result.stderr
    assert elapsed < 30, f"the job took {elapsed:.1f} s to stop"
    left = subprocess.run(["pgrep", "-f", marker], capture_output=True, text=True)
    assert left.stdout.strip() == "", f"processes left behind: {left.stdout}"


def test_a_rank_that_dies_aborts_an_mpi_job(tmp_path):
    import time

    script = tmp_path / "job.py"
    script.write_text(_DYING_JOB)
    began = time.monotonic()
    result = _mpirun(2, str(script), timeout=120)
    assert result.returncode != 0 and "rank 1 fails on purpose" in result.stderr
    assert time.monotonic() - began < 30


@pytest.mark.parametrize(
    ("visible", "local", "kept"),
    [(None, "1", "1"), ("3,5", "1", "5"), ("GPU-aaa, GPU-bbb", "0", "GPU-aaa"), ("7", None, "7")],
)
def test_pin_local_gpu_keeps_the_ranks_own_gpu(monkeypatch, visible, local, kept):
    """The rank keeps the LOCAL_RANK-th visible GPU as its only one (device 0)."""
    for name in ("CUDA_VISIBLE_DEVICES", *engines._LOCAL_RANK_VARS):
        monkeypatch.delenv(name, raising=False)
    if visible is not None:
        monkeypatch.setenv("CUDA_VISIBLE_DEVICES", visible)
    if local is not None:
        monkeypatch.setenv("LOCAL_RANK", local)
    assert dist.pin_local_gpu() == kept
    assert os.environ["CUDA_VISIBLE_DEVICES"] == kept


def test_pin_local_gpu_refuses_a_rank_without_a_gpu(monkeypatch):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0")
    monkeypatch.setenv("LOCAL_RANK", "1")
    with pytest.raises(ValueError, match=r"local rank 1 has no GPU: CUDA_VISIBLE_DEVICES='0' names 1"):
        dist.pin_local_gpu()
    assert os.environ["CUDA_VISIBLE_DEVICES"] == "0"  # left as it was


#: Each rank joins a host group from hand-set RANK / WORLD_SIZE / MASTER_*; rank 0 prints its listening sockets.
_LISTENING_JOB = (
    "import os\n"
    "from pycusparselt import distributed as dist\n"
    "def listening():\n"
    "    links = [f'/proc/self/fd/{fd}' for fd in os.listdir('/proc/self/fd')]\n"
    "    targets = [os.readlink(link) for link in links if os.path.islink(link)]\n"
    "    mine = {t[8:-1] for t in targets if t.startswith('socket:[')}\n"
    "    found = []\n"
    "    for table in ('/proc/net/tcp', '/proc/net/tcp6'):\n"
    "        for line in open(table).read().splitlines()[1:]:\n"
    "            cells = line.split()\n"
    "            if cells[3] == '0A' and cells[9] in mine:\n"
    "                found.append(cells[1])\n"
    "    return found\n"
    "with dist.init_process_group('host') as group:\n"
    "    group.barrier()\n"
    "    if group.rank == 0:\n"
    "        print('listening', ' '.join(listening()), flush=True)\n"
    "    group.barrier()\n"
)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads listening sockets from /proc/net")
def test_a_job_without_a_launcher_hosts_its_store_on_master_addr_only(tmp_path):
    """MASTER_ADDR=127.0.0.1 set by hand: rank 0's store listens on 127.0.0.1:MASTER_PORT, on no other address."""
    import socket

    pytest.importorskip("torch", reason="the torch engine needs PyTorch")
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    script = tmp_path / "job.py"
    script.write_text(_LISTENING_JOB)
    procs = [subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                              env=_job_env(RANK=str(r), WORLD_SIZE="2", MASTER_ADDR="127.0.0.1",
                                           MASTER_PORT=str(port)))
             for r in range(2)]
    outputs = [p.communicate(timeout=120) for p in procs]
    assert all(p.returncode == 0 for p in procs), [err[-2000:] for _, err in outputs]
    line = next(x for x in outputs[0][0].splitlines() if x.startswith("listening"))
    endpoints = line.split()[1:]
    on_port = [e for e in endpoints if int(e.rsplit(":", 1)[1], 16) == port]
    assert on_port == ["0100007F:%04X" % port], endpoints  # 127.0.0.1 alone, not 0.0.0.0 or [::]
