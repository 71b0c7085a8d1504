"""Process groups: the ranks of a tensor-parallel job and their collectives (all-reduce, all-gather,
reduce-scatter).

Two backends behind one interface, :class:`Group`:

- ``"nccl"`` (:class:`NcclGroup`): NCCL through CuPy's ``cupy.cuda.nccl``, one communicator per GPU. Either
  one process per GPU (:func:`init_process_group`, under ``torchrun``, ``mpirun``/``srun`` or any launcher
  that sets ``RANK`` and ``WORLD_SIZE``), or one process driving several GPUs (:meth:`NcclGroup.local`,
  ``ncclCommInitAll``).
- ``"host"`` (:class:`HostGroup`): NumPy arrays on the CPU, for layers that run on the NumPy reference:
  the same sharded arithmetic without a GPU, in one process (:meth:`HostGroup.local`) or one process per
  rank through the job's engine (``torch.distributed`` or MPI). It exists to check the arithmetic, not for
  speed.

The ranks find each other through an *engine* (:mod:`pycusparselt.distributed.engines`): PyTorch's
``torch.distributed``, mpi4py, or CuPy's ``cupyx.distributed``; the engine carries the NCCL unique id and the
barriers, NCCL carries the data.

A group holds one or more *local ranks*: layers and collectives take one array per local rank (a plain
array when the process holds a single rank, as with one process per GPU, else a list in rank order).
"""

from __future__ import annotations

import ctypes
import glob
import os
import struct
import sys
from typing import Any, Sequence

import numpy as np

from .. import types
from .._native import gpu
from .._native import settings
from .._native.streams import on_stream, stream_ptr
from .engines import Engine, choose_engine, local_rank_from_env, make_engine

__all__ = ["Group", "NcclGroup", "HostGroup", "init_process_group", "load_nccl", "env_config", "as_list"]

_NVLS = "NCCL_NVLS_ENABLE"
_UID = struct.Struct("128b")

# ncclDataType_t (nccl.h): the same values in every NCCL 2 release; bfloat16 since 2.10
_NCCL_TYPES = {
    types.I8: 0,
    types.U8: 1,
    types.I32: 2,
    types.U32: 3,
    types.I64: 4,
    types.U64: 5,
    types.F16: 6,
    types.F32: 7,
    types.F64: 8,
    types.BF16: 9,
}
_NCCL_SUM = 0
_NCCL_BF16_VERSION = 21000


def _nccl_library_candidates() -> list[str]:
    """libnccl.so.2 from NVIDIA's pip wheels (nvidia-nccl-cu12 / -cu13), where CuPy does not look."""
    found = []
    for entry in sys.path:
        for pattern in ("nvidia/nccl/lib/libnccl.so*", "nvidia/cu*/lib/libnccl.so*"):
            found.extend(sorted(glob.glob(os.path.join(entry, pattern))))
    return found


def load_nccl() -> Any:
    """CuPy's NCCL module (``cupy.cuda.nccl``), with NCCL loaded.

    CuPy's wheels find NCCL only on the system's library path or in CuPy's own library directory; NCCL from
    the ``nvidia-nccl-cu13`` / ``-cu12`` pip wheels (what PyTorch installs) is preloaded here first when
    needed. Raises ImportError, saying what to install, when no NCCL can be loaded.
    """
    gpu.cupy()  # ImportError, saying what to install, without CuPy
    import importlib

    import warnings

    with warnings.catch_warnings():  # CuPy warns when its own search fails; the pip wheels are tried next
        warnings.simplefilter("ignore")
        try:
            from cupy.cuda import nccl  # CuPy's own loading rules first

            if nccl.available:
                return nccl
        except ImportError:
            pass
    try:
        return importlib.import_module("cupy_backends.cuda.libs.nccl")
    except ImportError as first:
        error = first
    for path in _nccl_library_candidates():
        try:
            ctypes.CDLL(path, mode=ctypes.RTLD_GLOBAL)  # the extension's libnccl.so.2 now resolves to it
            return importlib.import_module("cupy_backends.cuda.libs.nccl")
        except (OSError, ImportError) as exc:
            error = exc
    raise ImportError(
        f"CuPy's NCCL binding could not load NCCL ({error}); install it with `pip install nvidia-nccl-cu13` "
        f"(CUDA 13) or `pip install nvidia-nccl-cu12` (CUDA 12)"
    )


def env_config() -> dict[str, Any]:
    """The job as its launcher describes it in the environment, and the engine ``init_process_group`` would use.

    Keys: ``engine`` (see :func:`~pycusparselt.distributed.engines.choose_engine`), ``rank`` and
    ``world_size`` (``RANK`` and ``WORLD_SIZE``, default 0 and 1; under MPI the engine reads them from MPI),
    ``local_rank`` (``LOCAL_RANK`` or the MPI launcher's / srun's equivalent, default ``rank``),
    ``master_addr`` and ``master_port`` (``MASTER_ADDR``, default 127.0.0.1, and ``MASTER_PORT``). Raises
    ValueError naming a variable that is malformed.
    """

    integer = settings.integer
    rank, world = integer("RANK", 0), integer("WORLD_SIZE", 1)
    if world < 1 or not 0 <= rank < world:
        raise ValueError(f"RANK={rank} and WORLD_SIZE={world}: expected 0 <= RANK < WORLD_SIZE")
    local_rank = local_rank_from_env()
    port = integer("MASTER_PORT", None)
    if port is not None and not 0 <= port < 65536:
        raise ValueError(f"MASTER_PORT: expected a port number, got {port}")
    return {
        "engine": choose_engine(),
        "rank": rank,
        "world_size": world,
        "local_rank": rank if local_rank is None else local_rank,
        "master_addr": os.environ.get("MASTER_ADDR") or "127.0.0.1",
        "master_port": port,
    }


def as_list(arrays: Any, count: int, what: str) -> list:
    """``arrays`` as one array per local rank: a list of ``count`` (checked), or a plain array when
    ``count`` is 1."""
    if isinstance(arrays, (list, tuple)):
        if len(arrays) != count:
            raise ValueError(f"{what}: expected one array per local rank ({count}), got {len(arrays)}")
        return list(arrays)
    if count != 1:
        raise TypeError(f"{what}: this group holds {count} ranks in this process; pass a list of {count} arrays")
    return [arrays]


class Group:
    """The ranks of a job and their collectives; made by :func:`init_process_group`,
    :meth:`NcclGroup.local` or :meth:`HostGroup.local`.

    Attributes
    ----------
    backend : str
        "nccl" or "host".
    world_size : int
        Ranks in the job.
    ranks : tuple of int
        The ranks this process holds, in order.
    devices : tuple
        The CUDA device of each held rank (None for the host backend).
    """

    backend = ""

    def __init__(self, world_size: int, ranks: Sequence[int], devices: Sequence[int | None],
                 engine: Engine | None) -> None:
        self.world_size = int(world_size)
        self.ranks = tuple(int(r) for r in ranks)
        self.devices = tuple(devices)
        self._engine = engine
        self._closed = False

    @property
    def engine(self) -> str:
        """How the ranks met: "torch", "mpi", "cupyx", "single" (see :mod:`~pycusparselt.distributed.engines`),
        or "local" for a group of one process made by ``local()``."""
        return "local" if self._engine is None else self._engine.name

    @property
    def rank(self) -> int:
        """This process's rank (when it holds exactly one)."""
        if len(self.ranks) != 1:
            raise ValueError(f"this process holds ranks {self.ranks}; use group.ranks")
        return self.ranks[0]

    @property
    def closed(self) -> bool:
        return self._closed

    def device_of(self, rank: int) -> int | None:
        """The CUDA device of a rank held by this process."""
        try:
            return self.devices[self.ranks.index(rank)]
        except ValueError:
            raise ValueError(f"rank {rank} is not held by this process (it holds {self.ranks})") from None

    def check_open(self) -> None:
        """Raise :class:`~pycusparselt.errors.ClosedError` once the group is closed."""
        if self._closed:
            from ..errors import ClosedError

            raise ClosedError("the process group was closed")

    def all_reduce(self, arrays: Any, *, stream: Any = None) -> None:
        """Sum the arrays of all ranks, in place (every rank gets the sum).

        ``arrays``: one C-contiguous array per local rank (a plain array for a single local rank), of the
        same shape and dtype on every rank.
        """
        raise NotImplementedError

    def all_gather(self, arrays: Any, *, stream: Any = None) -> Any:
        """Gather every rank's array: returns, per local rank, an array of shape ``(world_size, *shape)``
        whose ``[r]`` is rank ``r``'s (a plain array for a single local rank, else a list)."""
        raise NotImplementedError

    def reduce_scatter(self, arrays: Any, *, stream: Any = None) -> Any:
        """Sum the arrays of all ranks and give each rank its block of the sum.

        ``arrays``: one C-contiguous array of shape ``(world_size, *shape)`` per local rank (a plain array for a
        single local rank), of the same shape and dtype on every rank. Returns, per local rank ``r``, an array
        of shape ``shape``: the sum over every rank's ``array[r]`` (a plain array for a single local rank, else
        a list). The all-reduce's result split by rows, at the cost of one block per rank.
        """
        raise NotImplementedError

    def barrier(self) -> None:
        """Wait until every rank reaches this point (host-side)."""
        self.check_open()
        if self._engine is not None:
            self._engine.barrier()

    def replicate(self, array: Any) -> Any:
        """``array`` on every local rank's device (for inputs that every rank needs whole): a plain array for
        a single local rank, else a list."""
        raise NotImplementedError

    def close(self) -> None:
        """Release the communicators, and the engine's process group where this group made it. Harmless when
        repeated."""
        if self._closed:
            return
        self._closed = True
        engine, self._engine = self._engine, None
        if engine is not None:
            engine.close()

    def __enter__(self) -> Group:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        state = "closed" if self._closed else f"ranks {self.ranks} of {self.world_size}, engine {self.engine}"
        return f"<{type(self).__name__} {self.backend}: {state}>"


class HostGroup(Group):
    """NumPy collectives on the CPU: sums in rank order, so every rank gets the same bits.

    Use :meth:`local` for all ranks in one process, or :func:`init_process_group` with ``backend="host"``
    for one process per rank (arrays travel through the job's engine: ``torch.distributed`` or MPI).
    """

    backend = "host"

    @classmethod
    def local(cls, world_size: int) -> HostGroup:
        """A group whose ``world_size`` ranks all live in this process."""
        if isinstance(world_size, bool) or not isinstance(world_size, int) or world_size < 1:
            raise ValueError(f"world_size: expected a positive int, got {world_size!r}")
        return cls(world_size, range(world_size), (None,) * world_size, None)

    def _arrays(self, arrays: Any, what: str) -> list[np.ndarray]:
        self.check_open()
        items = as_list(arrays, len(self.ranks), what)
        for array in items:
            if not isinstance(array, np.ndarray):
                raise TypeError(f"{what}: the host backend takes NumPy arrays, got {type(array).__name__}")
        return _same_layout(items, what)

    def _exchange(self, items: list[np.ndarray], what: str) -> list[np.ndarray]:
        """Every rank's array, in rank order."""
        if self._engine is None or self.world_size == 1:
            return items
        mine = np.ascontiguousarray(items[0])
        everyone = self._engine.all_gather((mine.shape, mine.dtype.str, mine.tobytes()))
        arrays = []
        for rank, (shape, dtype, data) in enumerate(everyone):
            if tuple(shape) != mine.shape or np.dtype(dtype) != mine.dtype or len(data) != mine.nbytes:
                raise ValueError(
                    f"{what}: rank {rank} sent {tuple(shape)} {np.dtype(dtype)}, rank {self.rank} has {mine.shape} "
                    f"{mine.dtype}; every rank must pass one shape and dtype"
                )
            arrays.append(np.frombuffer(data, dtype=mine.dtype).reshape(mine.shape))
        return arrays

    def all_reduce(self, arrays: Any, *, stream: Any = None) -> None:
        items = self._arrays(arrays, "all_reduce")
        everyone = self._exchange(items, "all_reduce")
        total = everyone[0].copy()
        with np.errstate(over="ignore"):  # integer sums wrap, as NCCL's do
            for array in everyone[1:]:
                total = total + array  # rounded to the dtype at every step, like NCCL
        for array in items:
            array[...] = total

    def all_gather(self, arrays: Any, *, stream: Any = None) -> Any:
        items = self._arrays(arrays, "all_gather")
        gathered = np.stack(self._exchange(items, "all_gather"))
        result = [gathered.copy() for _ in items]
        return result[0] if not isinstance(arrays, (list, tuple)) else result

    def reduce_scatter(self, arrays: Any, *, stream: Any = None) -> Any:
        items = self._arrays(arrays, "reduce_scatter")
        _check_blocks(items[0], self.world_size, "reduce_scatter")
        everyone = self._exchange(items, "reduce_scatter")
        result = []
        for rank in self.ranks:
            total = everyone[0][rank].copy()
            with np.errstate(over="ignore"):  # as all_reduce: rank order, rounded at every step
                for array in everyone[1:]:
                    total = total + array[rank]
            result.append(total)
        return result if isinstance(arrays, (list, tuple)) else result[0]

    def replicate(self, array: Any) -> Any:
        self.check_open()
        array = np.asarray(array)
        return array if len(self.ranks) == 1 else [array] * len(self.ranks)


def _check_blocks(array: Any, world_size: int, what: str) -> None:
    """ValueError unless ``array`` has one leading block per rank."""
    if array.ndim < 1 or array.shape[0] != world_size:
        raise ValueError(
            f"{what}: expected an array of shape (world_size={world_size}, ...), one block per rank, got shape "
            f"{tuple(array.shape)}"
        )


def _same_layout(items: list, what: str) -> list:
    """``items`` if every rank's array has the first one's shape and dtype, else ValueError."""
    first = items[0]
    for array in items[1:]:
        if array.shape != first.shape or array.dtype != first.dtype:
            raise ValueError(
                f"{what}: every rank's array must have one shape and dtype, got {first.shape} {first.dtype} "
                f"and {array.shape} {array.dtype}"
            )
    return items


class NcclGroup(Group):
    """NCCL communicators through ``cupy.cuda.nccl``, one per GPU held by this process.

    Made by :func:`init_process_group` (one process per GPU) or :meth:`local` (one process, several GPUs).
    Collectives run on the given stream, or on each device's current CuPy stream, asynchronously: the result
    is ready for later work on that stream.
    """

    backend = "nccl"

    def __init__(self, comms: list, world_size: int, ranks: Sequence[int], devices: Sequence[int],
                 engine: Engine | None, nccl: Any) -> None:
        super().__init__(world_size, ranks, devices, engine)
        self._comms = comms
        self._nccl = nccl

    @classmethod
    def local(cls, devices: Sequence[int]) -> NcclGroup:
        """One process driving ``devices`` (rank ``i`` on ``devices[i]``) with ``ncclCommInitAll``."""
        cupy = gpu.cupy()

        devices = [int(d) for d in devices]
        count = cupy.cuda.runtime.getDeviceCount()
        if not devices or len(set(devices)) != len(devices) or not all(0 <= d < count for d in devices):
            raise ValueError(f"devices: expected distinct device indices in 0 .. {count - 1}, got {devices}")
        os.environ.setdefault(_NVLS, "0")
        nccl = load_nccl()
        comms = nccl.NcclCommunicator.initAll(devices)
        return cls(comms, len(devices), range(len(devices)), devices, None, nccl)

    @property
    def nccl_version(self) -> int:
        """NCCL's runtime version code (e.g. 22703 for 2.27.3)."""
        return int(self._nccl.get_version())

    def _arrays(self, arrays: Any, what: str) -> list:
        cupy = gpu.cupy()

        self.check_open()
        items = as_list(arrays, len(self.ranks), what)
        for device, array in zip(self.devices, items, strict=True):
            if not isinstance(array, cupy.ndarray):
                raise TypeError(f"{what}: the nccl backend takes CuPy arrays, got {type(array).__name__}")
            if array.device.id != device:
                raise ValueError(f"{what}: array is on device {array.device.id}, its rank's communicator on {device}")
            if not array.flags.c_contiguous:
                raise ValueError(f"{what}: arrays must be C-contiguous")
        return _same_layout(items, what)

    def _streams(self, stream: Any) -> list[int]:
        if stream is not None and len(self.ranks) > 1:
            raise ValueError("stream: a group of several local ranks runs on each device's current stream")
        return [stream_ptr(stream, device) for device in self.devices]

    def _grouped(self, calls: list) -> None:
        cupy = gpu.cupy()

        several = len(calls) > 1
        if several:  # one thread, several communicators: NCCL needs the calls in one group
            self._nccl.groupStart()
        try:
            for device, call in zip(self.devices, calls, strict=True):
                with cupy.cuda.Device(device):
                    call()
        finally:
            if several:
                self._nccl.groupEnd()

    def _sum_code(self, dtype: Any, what: str) -> int:
        """NCCL's code for ``dtype``, or TypeError where NCCL cannot add it."""
        if dtype not in _NCCL_TYPES:
            names = ", ".join(str(d) for d in _NCCL_TYPES)
            raise TypeError(f"{what}: NCCL cannot add {dtype} arrays (supported: {names})")
        if dtype == types.BF16 and self.nccl_version < _NCCL_BF16_VERSION:
            raise TypeError(f"{what}: bfloat16 needs NCCL 2.10 or newer, this is {self.nccl_version}")
        return _NCCL_TYPES[dtype]

    def all_reduce(self, arrays: Any, *, stream: Any = None) -> None:
        items = self._arrays(arrays, "all_reduce")
        code, streams = self._sum_code(items[0].dtype, "all_reduce"), self._streams(stream)
        self._grouped([
            (lambda c=comm, a=array, s=s: c.allReduce(a.data.ptr, a.data.ptr, a.size, code, _NCCL_SUM, s))
            for comm, array, s in zip(self._comms, items, streams, strict=True)
        ])

    def all_gather(self, arrays: Any, *, stream: Any = None) -> Any:
        cupy = gpu.cupy()

        items = self._arrays(arrays, "all_gather")
        streams = self._streams(stream)
        results = []
        for device, array, s in zip(self.devices, items, streams, strict=True):
            with cupy.cuda.Device(device), on_stream(s):  # CuPy's pool reuses it only after this stream
                results.append(cupy.empty((self.world_size, *array.shape), dtype=array.dtype))
        # gathered as bytes: any dtype (float8 storage included) travels unchanged
        self._grouped([
            (lambda c=comm, a=array, r=result, s=s: c.allGather(a.data.ptr, r.data.ptr, a.nbytes, 1, s))
            for comm, array, result, s in zip(self._comms, items, results, streams, strict=True)
        ])
        return results if isinstance(arrays, (list, tuple)) else results[0]

    def reduce_scatter(self, arrays: Any, *, stream: Any = None) -> Any:
        cupy = gpu.cupy()

        items = self._arrays(arrays, "reduce_scatter")
        _check_blocks(items[0], self.world_size, "reduce_scatter")
        code, streams = self._sum_code(items[0].dtype, "reduce_scatter"), self._streams(stream)
        block = items[0].shape[1:]
        count = items[0].size // self.world_size
        results = []
        for device, s in zip(self.devices, streams, strict=True):
            with cupy.cuda.Device(device), on_stream(s):  # CuPy's pool reuses it only after this stream
                results.append(cupy.empty(block, dtype=items[0].dtype))
        # ncclReduceScatter: rank r receives the sum of every rank's r-th block of `count` elements
        self._grouped([
            (lambda c=comm, a=array, r=result, s=s: c.reduceScatter(a.data.ptr, r.data.ptr, count, code, _NCCL_SUM, s))
            for comm, array, result, s in zip(self._comms, items, results, streams, strict=True)
        ])
        return results if isinstance(arrays, (list, tuple)) else results[0]

    def replicate(self, array: Any) -> Any:
        cupy = gpu.cupy()

        self.check_open()
        copies = []
        host = None
        for device in self.devices:
            if isinstance(array, cupy.ndarray) and array.device.id == device:
                copies.append(array)
                continue
            if host is None:
                host = cupy.asnumpy(array) if isinstance(array, cupy.ndarray) else np.asarray(array)
            with cupy.cuda.Device(device):
                copies.append(cupy.asarray(host))
        return copies[0] if len(copies) == 1 else copies

    def close(self) -> None:
        if self._closed:
            return
        for comm in self._comms:
            comm.destroy()
        self._comms = []
        super().close()


def _uid_bytes(uid: Any) -> bytes:
    """NCCL's unique id as its 128 bytes: CuPy 14 returns bytes, older CuPy a tuple of signed chars."""
    if isinstance(uid, (bytes, bytearray)):
        data = bytes(uid)
    else:  # the chars' signedness depends on the platform: keep their bits
        data = bytes(int(v) & 0xFF for v in uid)
    if len(data) != _UID.size:
        raise ValueError(f"NCCL unique id: expected {_UID.size} bytes, got {len(data)}")
    return data


def _communicator(nccl: Any, world: int, uid: bytes, rank: int) -> Any:
    """``ncclCommInitRank`` through CuPy, whichever form of the id this CuPy takes."""
    try:
        return nccl.NcclCommunicator(world, uid, rank)
    except TypeError:  # CuPy before 14: a tuple of 128 signed chars (refused before NCCL is called)
        return nccl.NcclCommunicator(world, _UID.unpack(uid), rank)


def init_process_group(backend: str = "nccl", *, engine: str = "auto", device: int | None = None,
                       timeout: float = 300.0) -> Group:
    """Join the job this process belongs to: one rank in this process.

    Parameters
    ----------
    backend : {"nccl", "host"}
        "nccl": a communicator on this rank's GPU, set up from the NCCL unique id that rank 0 sends through the
        engine. "host": NumPy collectives through the engine (layers then run on the NumPy reference).
    engine : {"auto", "torch", "mpi", "cupyx", "single"}
        How the ranks meet (:mod:`~pycusparselt.distributed.engines`); "auto" reads the environment: an
        initialised ``torch.distributed`` group or torchrun -> "torch", mpirun/srun with mpi4py -> "mpi",
        ``WORLD_SIZE`` > 1 without PyTorch -> "cupyx", else "single". :attr:`Group.engine` says which ran.
    device : int, optional
        The CUDA device (nccl backend): default the rank within the node. It is made CuPy's current device.
    timeout : float
        Seconds the torch engine waits for the other ranks.

    Notes
    -----
    ``NCCL_NVLS_ENABLE`` is set to 0 unless already set: NVLink multicast stays off. The host backend needs
    the torch (gloo) or mpi engine for more than one process; the cupyx engine needs the nccl backend.
    """
    if backend not in ("nccl", "host"):
        raise ValueError(f"backend: expected 'nccl' or 'host', got {backend!r}")
    os.environ.setdefault(_NVLS, "0")
    chosen = choose_engine() if engine == "auto" else engine
    if backend == "host" and chosen == "cupyx":
        raise ValueError("backend 'host': the cupyx engine runs on GPUs; use the torch or mpi engine")
    nccl = None
    if backend == "nccl":
        from .._native.devices import gpu_unavailable_reason

        reason = gpu_unavailable_reason()
        if reason is not None:
            from ..errors import GpuUnavailableError

            raise GpuUnavailableError(
                f"backend 'nccl': no usable GPU ({reason}); on this machine use init_process_group('host'), "
                f"which runs the layers on the NumPy reference"
            )
        nccl = load_nccl()
    if chosen == "cupyx" and device is None:  # CuPy's engine is joined on the GPU
        local = local_rank_from_env()
        device = int(os.environ.get("RANK") or 0) if local is None else local
    joined = make_engine(chosen, device=device, timeout=timeout)
    if backend == "nccl":
        cupy = gpu.cupy()

        device = joined.local_rank if device is None else int(device)
        count = cupy.cuda.runtime.getDeviceCount()
        if not 0 <= device < count:
            joined.close()
            raise ValueError(
                f"device {device} (the rank within the node) does not exist: {count} GPU(s) are visible; start at "
                f"most {count} processes per node"
            )
        cupy.cuda.Device(device).use()
    try:
        rank, world = joined.rank, joined.world_size
        if backend == "host":
            return HostGroup(world, (rank,), (None,), joined)
        cupy = gpu.cupy()

        uid = joined.broadcast(_uid_bytes(nccl.get_unique_id()) if rank == 0 else None)
        with cupy.cuda.Device(device):
            comm = _communicator(nccl, world, _uid_bytes(uid), rank)
        return NcclGroup([comm], world, (rank,), (device,), joined, nccl)
    except BaseException:
        joined.close()
        raise
