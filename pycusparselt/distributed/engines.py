"""Rendezvous engines: how the ranks of a job find each other and exchange small host-side messages.

pycusparselt runs its collectives on NCCL (the data plane); the control plane (the NCCL unique id, barriers,
the host backend's arrays) goes through an engine the job already has, chosen from the environment:

- ``"torch"``: ``torch.distributed``: a process group the program already initialised (any backend), or one
  made here with the ``gloo`` backend from torchrun's environment (``RANK``, ``WORLD_SIZE``, ``MASTER_ADDR``,
  ``MASTER_PORT``) or the same variables set by hand, destroyed again when the group closes;
- ``"mpi"``: mpi4py's ``COMM_WORLD``, under ``mpirun``/``mpiexec``/``srun``;
- ``"cupyx"``: ``cupyx.distributed`` (CuPy's own NCCL backend and store, on ``MASTER_ADDR`` and
  ``CUPYX_DISTRIBUTED_PORT``, default 13333) for CuPy-only jobs: the NCCL
  communicator is CuPy's, and host-side messages go through NCCL;
- ``"single"``: a job of one process, which needs none.

What listens where: under a launcher (torchrun, mpirun) and with the cupyx engine, the launcher's or CuPy's
store, where they put it. A ``torch`` group made here without a launcher (``RANK``, ``WORLD_SIZE``,
``MASTER_ADDR``, ``MASTER_PORT`` set by hand) has rank 0 host its store on a socket bound to ``MASTER_ADDR``
and ``MASTER_PORT`` only (PyTorch's own ``env://`` store would listen on every interface); gloo's
connections between ranks listen on the interface ``GLOO_SOCKET_IFNAME`` names (by default the one the host
name resolves to): set ``GLOO_SOCKET_IFNAME=lo`` to keep a one-machine job on loopback.
"""

from __future__ import annotations

import os
import pickle
import socket
from typing import Any, Mapping

import numpy as np

from .._native import gpu
from .._native import settings

__all__ = ["Engine", "ENGINES", "choose_engine", "make_engine", "local_rank_from_env", "pin_local_gpu"]

#: The engines, in the order ``engine="auto"`` considers them.
ENGINES = ("torch", "mpi", "cupyx", "single")

# set by the MPI launchers (Open MPI, MPICH/Hydra, Intel MPI, MVAPICH, PMIx) and by Slurm's srun (a step's
# task count: SLURM_NTASKS is also set for the batch script itself, which is one process)
_MPI_SIZE_VARS = ("OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "PMIX_SIZE", "MV2_COMM_WORLD_SIZE", "SLURM_STEP_NUM_TASKS")
_MPI_RANK_VARS = ("OMPI_COMM_WORLD_RANK", "PMI_RANK", "PMIX_RANK", "MV2_COMM_WORLD_RANK", "SLURM_PROCID")
_LOCAL_RANK_VARS = ("LOCAL_RANK", "OMPI_COMM_WORLD_LOCAL_RANK", "MPI_LOCALRANKID", "MV2_COMM_WORLD_LOCAL_RANK",
                    "PMI_LOCAL_RANK", "SLURM_LOCALID")


def _importable(name: str) -> bool:
    import importlib.util

    try:
        return importlib.util.find_spec(name) is not None
    except (ImportError, ValueError):
        return False


def _torch_initialized() -> bool:
    import sys

    dist = sys.modules.get("torch.distributed")
    return bool(dist is not None and dist.is_available() and dist.is_initialized())


def choose_engine(env: Mapping[str, str] | None = None, *, torch_initialized: bool | None = None,
                  have: Mapping[str, bool] | None = None) -> str:
    """The engine ``engine="auto"`` picks for this environment.

    In order: an initialised ``torch.distributed`` group; torchrun's environment (``TORCHELASTIC_RUN_ID``) with
    PyTorch installed; an MPI launcher's or srun's environment with mpi4py installed; ``WORLD_SIZE`` > 1 with
    PyTorch (else CuPy's ``cupyx.distributed``); otherwise a job of one ("single"). ``torch_initialized`` and
    ``have`` (module name -> importable) stand in for the real checks in tests.
    """
    env = os.environ if env is None else env
    initialized = _torch_initialized() if torch_initialized is None else torch_initialized
    installed = {name: have.get(name, False) if have is not None else _importable(name)
                 for name in ("torch", "mpi4py", "cupyx")}
    if initialized:
        return "torch"
    if env.get("TORCHELASTIC_RUN_ID") and installed["torch"]:
        return "torch"
    mpi_size = next((settings.integer(v, env=env) for v in _MPI_SIZE_VARS if env.get(v)), None)
    if mpi_size is not None and installed["mpi4py"] and not env.get("WORLD_SIZE"):
        return "mpi"
    world = settings.integer("WORLD_SIZE", env=env)
    if world is not None and world > 1:
        if installed["torch"]:
            return "torch"
        if installed["cupyx"]:
            return "cupyx"
        raise RuntimeError(
            f"WORLD_SIZE={world} but neither PyTorch (torch.distributed) nor CuPy (cupyx.distributed) is "
            f"installed to join the ranks; install one, or start the job with mpirun and mpi4py"
        )
    if mpi_size is not None and mpi_size > 1 and not installed["mpi4py"]:
        raise RuntimeError(
            f"an MPI launcher started {mpi_size} ranks but mpi4py is not installed: pip install mpi4py"
        )
    return "single"


def local_rank_from_env(env: Mapping[str, str] | None = None) -> int | None:
    """The rank within this node as the launcher gives it (``LOCAL_RANK``, Open MPI's, MPICH's, srun's ...),
    or None when none says."""
    env = os.environ if env is None else env
    for name in _LOCAL_RANK_VARS:
        value = settings.integer(name, env=env)
        if value is not None:
            if value < 0:
                raise ValueError(f"{name}: expected a non-negative integer, got {value}")
            return value
    return None


def pin_local_gpu() -> str:
    """Make this rank's GPU the process's only visible one, its device 0, so that the rank tunes.

    Keeps the ``LOCAL_RANK``-th (:func:`local_rank_from_env`; 0 where no launcher says) of the GPUs visible so
    far in ``CUDA_VISIBLE_DEVICES`` (indices or UUIDs; all of the machine's where it is unset). Off device 0
    only the default configuration runs (:data:`pycusparselt.tuning.TUNING_OFF_DEVICE_0`), so this is how
    every rank of a job gets tuned products. Call it before anything starts CUDA in the process (the first
    CuPy or PyTorch GPU operation): CUDA reads the variable once. Then join the job on that device::

        dist.pin_local_gpu()
        group = dist.init_process_group("nccl", device=0)

    Returns
    -------
    str
        The GPU kept (as ``CUDA_VISIBLE_DEVICES`` now names it).

    Raises
    ------
    ValueError
        The local rank has no GPU among those visible.
    """
    local = local_rank_from_env() or 0
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    gpus = [g.strip() for g in visible.split(",") if g.strip()] if visible is not None else None
    if gpus is not None and local >= len(gpus):
        raise ValueError(
            f"pin_local_gpu: local rank {local} has no GPU: CUDA_VISIBLE_DEVICES={visible!r} names {len(gpus)}"
        )
    chosen = gpus[local] if gpus is not None else str(local)
    os.environ["CUDA_VISIBLE_DEVICES"] = chosen
    return chosen


class Engine:
    """The control plane of a job: rank, size, rank within the node, and host-side exchanges.

    Attributes
    ----------
    name : str
        One of :data:`ENGINES`.
    rank, world_size, local_rank : int
    """

    name = ""

    def __init__(self, rank: int, world_size: int, local_rank: int) -> None:
        if world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} and world size {world_size}: expected 0 <= rank < world size")
        self.rank, self.world_size, self.local_rank = int(rank), int(world_size), int(local_rank)

    def broadcast(self, obj: Any, root: int = 0) -> Any:
        """``obj`` of rank ``root``, on every rank (picklable objects)."""
        raise NotImplementedError

    def all_gather(self, obj: Any) -> list:
        """Every rank's ``obj``, in rank order."""
        raise NotImplementedError

    def barrier(self) -> None:
        """Wait until every rank gets here."""
        raise NotImplementedError

    def close(self) -> None:
        """Release what this engine set up (not what the program had set up before). Harmless when repeated."""

    def __repr__(self) -> str:
        return f"<{type(self).__name__} rank {self.rank} of {self.world_size}>"


class SingleEngine(Engine):
    """A job of one process."""

    name = "single"

    def __init__(self, local_rank: int = 0) -> None:
        super().__init__(0, 1, local_rank)

    def broadcast(self, obj: Any, root: int = 0) -> Any:
        return obj

    def all_gather(self, obj: Any) -> list:
        return [obj]

    def barrier(self) -> None:
        return None


class TorchEngine(Engine):
    """``torch.distributed``: the program's process group, or a ``gloo`` group made from torchrun's
    environment (and destroyed by :meth:`close`)."""

    name = "torch"

    def __init__(self, timeout: float) -> None:
        import datetime

        import torch.distributed as dist

        self._dist = dist
        self._owned = False
        if not dist.is_initialized():
            # gloo: host-side messages only; NCCL itself is driven by pycusparselt
            delta = datetime.timedelta(seconds=timeout)
            if os.environ.get("TORCHELASTIC_RUN_ID"):  # torchrun's agent hosts the store
                dist.init_process_group("gloo", timeout=delta)
            else:
                rank, world, store = _bound_store(dist, delta)
                dist.init_process_group("gloo", store=store, rank=rank, world_size=world, timeout=delta)
            self._owned = True
        local = local_rank_from_env()
        super().__init__(dist.get_rank(), dist.get_world_size(), dist.get_rank() if local is None else local)

    def broadcast(self, obj: Any, root: int = 0) -> Any:
        box = [obj if self.rank == root else None]
        self._dist.broadcast_object_list(box, src=root)
        return box[0]

    def all_gather(self, obj: Any) -> list:
        out: list = [None] * self.world_size
        self._dist.all_gather_object(out, obj)
        return out

    def barrier(self) -> None:
        self._dist.barrier()

    def close(self) -> None:
        if self._owned and self._dist.is_initialized():
            self._dist.destroy_process_group()
        self._owned = False


def _bound_store(dist: Any, timeout: Any) -> tuple[int, int, Any]:
    """``(rank, world size, store)`` from ``RANK``, ``WORLD_SIZE``, ``MASTER_ADDR`` and ``MASTER_PORT``; rank 0
    hosts the store on a socket bound to that address alone (PyTorch's ``env://`` store binds every interface)."""
    env = os.environ
    rank, world = settings.integer("RANK", env=env), settings.integer("WORLD_SIZE", env=env)
    port = settings.integer("MASTER_PORT", env=env)
    if rank is None or world is None or port is None:
        missing = [v for v, x in (("RANK", rank), ("WORLD_SIZE", world), ("MASTER_PORT", port)) if x is None]
        raise ValueError(f"engine 'torch' without a launcher: set {', '.join(missing)} (and MASTER_ADDR) for each "
                         f"process, or start the job with torchrun")
    if not 0 < port < 65536:
        raise ValueError(f"MASTER_PORT: expected a port number, got {port}")
    addr = env.get("MASTER_ADDR") or "127.0.0.1"
    listen_fd = None
    if rank == 0:
        family = socket.AF_INET6 if ":" in addr else socket.AF_INET
        try:
            server = socket.create_server((addr, port), family=family, backlog=max(world, 16))
        except OSError as exc:
            raise OSError(exc.errno, f"rank 0 cannot host the job's store on MASTER_ADDR={addr} "
                                     f"MASTER_PORT={port}: {exc.strerror}") from None
        listen_fd = server.detach()  # the store owns the socket from here
    store = dist.TCPStore(addr, port, world, rank == 0, timeout=timeout, master_listen_fd=listen_fd)
    return rank, world, store


class MpiEngine(Engine):
    """mpi4py's ``COMM_WORLD`` (mpirun, mpiexec, srun)."""

    name = "mpi"

    def __init__(self) -> None:
        from mpi4py import MPI

        self._comm = MPI.COMM_WORLD
        local = local_rank_from_env()
        if local is None:  # the rank among the processes that share this node's memory
            node = self._comm.Split_type(MPI.COMM_TYPE_SHARED)
            local = node.Get_rank()
            node.Free()
        super().__init__(self._comm.Get_rank(), self._comm.Get_size(), local)

    def broadcast(self, obj: Any, root: int = 0) -> Any:
        return self._comm.bcast(obj, root=root)

    def all_gather(self, obj: Any) -> list:
        return self._comm.allgather(obj)

    def barrier(self) -> None:
        self._comm.Barrier()


class CupyxEngine(Engine):
    """CuPy's ``cupyx.distributed``: its NCCL communicator (made with CuPy's own store, at ``MASTER_ADDR`` and
    ``CUPYX_DISTRIBUTED_PORT``, default 13333), through which host-side messages travel as bytes on the GPU."""

    name = "cupyx"

    def __init__(self, rank: int, world_size: int, local_rank: int, device: int, host: str, port: int) -> None:
        cupy = gpu.cupy()
        import cupyx.distributed

        super().__init__(rank, world_size, local_rank)
        self._device = device
        with cupy.cuda.Device(device):
            self.comm = cupyx.distributed.init_process_group(world_size, rank, host=host, port=port)

    def _bytes_on_gpu(self, data: bytes, size: int) -> Any:
        cupy = gpu.cupy()

        buf = np.zeros(size, np.uint8)
        buf[: len(data)] = np.frombuffer(data, np.uint8)
        return cupy.asarray(buf)

    def broadcast(self, obj: Any, root: int = 0) -> Any:
        cupy = gpu.cupy()

        with cupy.cuda.Device(self._device):
            data = pickle.dumps(obj) if self.rank == root else b""
            size = cupy.asarray(np.array([len(data)], np.int64))
            self.comm.broadcast(size, root)
            buf = self._bytes_on_gpu(data, int(size.get()[0]))
            self.comm.broadcast(buf, root)
            return obj if self.rank == root else pickle.loads(buf.get().tobytes())

    def all_gather(self, obj: Any) -> list:
        cupy = gpu.cupy()

        with cupy.cuda.Device(self._device):
            data = pickle.dumps(obj)
            sizes = cupy.zeros(self.world_size, np.int64)
            self.comm.all_gather(cupy.asarray(np.array([len(data)], np.int64)), sizes, 1)
            sizes_host = sizes.get()
            width = int(sizes_host.max())
            out = cupy.zeros((self.world_size, width), np.uint8)
            self.comm.all_gather(self._bytes_on_gpu(data, width), out, width)
            rows = out.get()
            return [obj if r == self.rank else pickle.loads(rows[r, : sizes_host[r]].tobytes())
                    for r in range(self.world_size)]

    def barrier(self) -> None:
        self.comm.barrier()


def make_engine(name: str = "auto", *, device: int | None = None, timeout: float = 300.0) -> Engine:
    """The engine ``name`` (one of :data:`ENGINES`, or "auto": :func:`choose_engine`), joined.

    ``device`` is the GPU CuPy's engine runs on (default: the rank within the node).
    """
    if name == "auto":
        name = choose_engine()
    if name not in ENGINES:
        raise ValueError(f"engine: expected 'auto' or one of {', '.join(ENGINES)}, got {name!r}")
    if name == "torch":
        try:
            return TorchEngine(timeout)
        except ImportError:
            raise ImportError("engine 'torch' needs PyTorch: pip install torch") from None
    if name == "mpi":
        try:
            return MpiEngine()
        except ImportError:
            raise ImportError("engine 'mpi' needs mpi4py and an MPI library: pip install mpi4py") from None
    env = os.environ
    if name == "cupyx":
        rank, world = settings.integer("RANK", env=env), settings.integer("WORLD_SIZE", env=env)
        if rank is None or world is None:
            raise ValueError("engine 'cupyx': set RANK and WORLD_SIZE (and MASTER_ADDR, CUPYX_DISTRIBUTED_PORT) for "
                             "each process")
        local = local_rank_from_env()
        local = rank if local is None else local
        # CuPy's store has its own port: MASTER_PORT is often taken by the launcher's store (torchrun's)
        port = settings.integer("CUPYX_DISTRIBUTED_PORT", env=env)
        return CupyxEngine(rank, world, local, local if device is None else device,
                           env.get("MASTER_ADDR") or "127.0.0.1", 13333 if port is None else port)
    local = local_rank_from_env()
    return SingleEngine(0 if local is None else local)
