"""The rendezvous store, the launcher and process groups of several processes, on the CPU (host backend)."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from pycusparselt import distributed as dist
from pycusparselt.distributed import launch
from pycusparselt.distributed.store import StoreTimeout, TCPStore

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def _launch(tmp_path, script: str, *args: str, nproc: int, timeout: float = 120) -> subprocess.CompletedProcess:
    path = tmp_path / "job.py"
    path.write_text(textwrap.dedent(script))
    # -P: the installed package, not the checkout; the launcher passes it on to its processes
    return subprocess.run([sys.executable, "-P", "-m", "pycusparselt.distributed", "--nproc", str(nproc), str(path),
                           *args], capture_output=True, text=True, timeout=timeout, cwd=tmp_path)


# -- the store ---------------------------------------------------------------------------------------


def test_store_set_get_add_delete():
    with TCPStore("127.0.0.1", 0, is_server=True, timeout=10) as server:
        with TCPStore("127.0.0.1", server.port, is_server=False, timeout=10) as client:
            client.set("k", b"\x00value\xff")
            assert server.get("k") == b"\x00value\xff"
            assert client.add("n", 2) == 2 and server.add("n", 3) == 5 and client.add("n", 0) == 5
            server.delete("k")
            with pytest.raises(StoreTimeout, match="'k'"):
                client.get("k", timeout=0.05)
            big = os.urandom(3 << 20)  # several MB, in pieces on the socket
            client.set("big", big)
            assert server.get("big") == big


def test_store_get_waits_for_another_client():
    with TCPStore("127.0.0.1", 0, is_server=True, timeout=10) as server:
        def later():
            time.sleep(0.2)
            with TCPStore("127.0.0.1", server.port, is_server=False, timeout=10) as other:
                other.set("late", b"here")

        thread = threading.Thread(target=later)
        thread.start()
        start = time.monotonic()
        assert server.get("late", timeout=10) == b"here"
        assert time.monotonic() - start >= 0.15
        thread.join()


def test_store_client_gives_up_with_a_clear_error():
    port = launch.free_port()
    with pytest.raises(StoreTimeout, match="MASTER_ADDR and MASTER_PORT"):
        TCPStore("127.0.0.1", port, is_server=False, timeout=0.3)


def test_store_refuses_non_bytes_and_bad_ports():
    with TCPStore("127.0.0.1", 0, is_server=True, timeout=10) as store:
        with pytest.raises(TypeError, match="bytes"):
            store.set("k", "text")
    with pytest.raises(ValueError, match="port"):
        TCPStore("127.0.0.1", 70000, is_server=False)


# -- the environment -----------------------------------------------------------------------------------


def test_worker_environments_follow_the_common_launchers():
    envs = launch.worker_environments(4, nnodes=2, node_rank=1, master_addr="10.0.0.1", master_port=29500,
                                      base={"NCCL_NVLS_ENABLE": "1", "KEEP": "me"})
    assert [e["RANK"] for e in envs] == ["4", "5", "6", "7"]
    assert [e["LOCAL_RANK"] for e in envs] == ["0", "1", "2", "3"]
    for env in envs:
        assert env["WORLD_SIZE"] == "8" and env["LOCAL_WORLD_SIZE"] == "4"
        assert env["MASTER_ADDR"] == "10.0.0.1" and env["MASTER_PORT"] == "29500"
        assert env["NCCL_NVLS_ENABLE"] == "0"  # forced off, whatever the caller had
        assert env["KEEP"] == "me"


def test_env_config_reads_and_validates(monkeypatch):
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", dist.groups.PORT_OVERRIDE):
        monkeypatch.delenv(name, raising=False)
    assert dist.env_config() == {"rank": 0, "world_size": 1, "local_rank": 0, "master_addr": "127.0.0.1",
                                 "master_port": 0}
    monkeypatch.setenv("RANK", "2")
    monkeypatch.setenv("WORLD_SIZE", "4")
    with pytest.raises(ValueError, match="MASTER_PORT is not set"):
        dist.env_config()
    monkeypatch.setenv("MASTER_PORT", "1234")
    monkeypatch.setenv(dist.groups.PORT_OVERRIDE, "4321")
    config = dist.env_config()
    assert config["rank"] == 2 and config["local_rank"] == 2 and config["master_port"] == 4321
    monkeypatch.setenv("RANK", "4")
    with pytest.raises(ValueError, match="RANK=4 and WORLD_SIZE=4"):
        dist.env_config()
    monkeypatch.setenv("RANK", "x")
    with pytest.raises(ValueError, match="RANK: expected an integer"):
        dist.env_config()


def test_a_job_of_one_needs_no_store(monkeypatch):
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(name, raising=False)
    with dist.init_process_group("host") as group:
        assert group.ranks == (0,) and group.world_size == 1 and group.rank == 0
        a = np.arange(4, dtype=np.float32)
        group.all_reduce(a)
        assert np.array_equal(a, np.arange(4, dtype=np.float32))
        assert np.array_equal(group.all_gather(a), a[None])
        group.barrier()
    with pytest.raises(ValueError, match="backend"):
        dist.init_process_group("gloo")


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


# -- the launcher -------------------------------------------------------------------------------------


def test_launcher_runs_a_host_group_of_several_processes(tmp_path):
    result = _launch(tmp_path, """
        import os
        import sys
        import numpy as np
        from pycusparselt import distributed as dist

        group = dist.init_process_group("host")
        r, n = group.rank, group.world_size
        assert os.environ["NCCL_NVLS_ENABLE"] == "0" and os.environ["LOCAL_RANK"] == str(r)
        a = np.array([r + 1, 2 ** 11, 1], dtype=np.float16)
        group.all_reduce(a)
        g = group.all_gather(np.full(3, r, dtype=np.int32))
        for _ in range(3):
            group.barrier()
        sys.stdout.write(f"rank {r}/{n}: sum {a.tolist()} gathered {g[:, 0].tolist()}\\n")  # one write per rank
        group.close()
    """, nproc=3)
    assert result.returncode == 0, result.stderr
    lines = sorted(line for line in result.stdout.splitlines() if line.startswith("rank"))
    # 1 + 2 + 3 = 6; 2048 + 2048 + 2048 = 6144 in float16; every rank the same sum and the gather in rank order
    assert lines == [f"rank {r}/3: sum [6.0, 6144.0, 3.0] gathered [0, 1, 2]" for r in range(3)]


def test_launcher_stops_the_others_when_one_fails(tmp_path):
    start = time.monotonic()
    result = _launch(tmp_path, """
        import os, sys, time
        if os.environ["RANK"] == "1":
            sys.exit(3)
        time.sleep(60)
    """, nproc=3, timeout=60)
    assert result.returncode == 3
    assert "local rank 1 exited with status 3" in result.stderr
    assert time.monotonic() - start < 30  # the sleepers were stopped, not waited for


def test_launcher_passes_arguments_and_runs_modules(tmp_path):
    result = _launch(tmp_path, """
        import sys
        sys.stdout.write(f"args {sys.argv[1:]}\\n")  # one write: the ranks share the pipe
    """, "--flag", "value", nproc=2)
    assert result.returncode == 0, result.stderr
    assert result.stdout.count("args ['--flag', 'value']") == 2
    module = subprocess.run([sys.executable, "-P", "-m", "pycusparselt.distributed", "-m", "json.tool", "--help"],
                            capture_output=True, text=True, timeout=60)
    assert module.returncode == 0 and "usage" in module.stdout.lower()


@pytest.mark.parametrize("argv, message", [
    (["--nproc", "0", "x.py"], "--nproc"),
    (["--nnodes", "2", "x.py"], "--master-port"),
    (["--nnodes", "2", "--node-rank", "2", "--master-port", "1", "x.py"], "node-rank"),
])
def test_launcher_refuses_bad_arguments(argv, message, capsys):
    with pytest.raises(SystemExit):
        launch.main(argv)
    assert message in capsys.readouterr().err


# -- the example, across processes, on the reference ------------------------------------------------


@pytest.mark.parametrize("nproc", [1, 2, 3])
def test_tensor_parallel_example_on_the_host_backend(nproc):
    result = subprocess.run(
        [sys.executable, "-P", "-m", "pycusparselt.distributed", "--nproc", str(nproc),
         str(EXAMPLES / "tensor_parallel_mlp.py"), "--backend", "host", "--hidden", "128", "--ffn", "512",
         "--tokens", "16"],
        capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, result.stderr
    assert f"{nproc} rank(s), backend host" in result.stdout
    assert "agrees with the single-device block" in result.stdout
