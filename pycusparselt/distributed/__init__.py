"""Several GPUs: tensor-parallel SparseLinear layers over NCCL, and the launcher that starts them.

Megatron-style tensor parallelism for 2:4 sparse layers: :class:`ColumnParallelSparseLinear` shards the
output features, :class:`RowParallelSparseLinear` the input features (on multiples of the 2:4 group and of
the plans' alignment), and :class:`ParallelSparseMLP` chains them with one all-reduce. Collectives run on
NCCL through CuPy (``cupy.cuda.nccl``), one process per GPU::

    python -m pycusparselt.distributed --nproc 4 train.py ...

    # train.py
    from pycusparselt import distributed as dist
    group = dist.init_process_group()          # RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT
    mlp = dist.ParallelSparseMLP(w1, b1, w2, b2, group=group)
    y = mlp(x)                                 # the whole output, on every rank

or one process driving several GPUs (:meth:`NcclGroup.local`). A :class:`HostGroup` runs the same sharded
arithmetic on the NumPy reference, without a GPU. Importing this package loads neither CuPy nor NCCL.
"""

from __future__ import annotations

from . import sharding
from .groups import Group, HostGroup, NcclGroup, env_config, init_process_group, load_nccl
from .parallel import ColumnParallelSparseLinear, ParallelSparseMLP, RowParallelSparseLinear
from .sharding import aligned_multiple, row_parallel_bounds, shard_bounds
from .store import StoreTimeout, TCPStore

__all__ = [
    "sharding",
    "Group",
    "NcclGroup",
    "HostGroup",
    "init_process_group",
    "env_config",
    "load_nccl",
    "ColumnParallelSparseLinear",
    "RowParallelSparseLinear",
    "ParallelSparseMLP",
    "shard_bounds",
    "aligned_multiple",
    "row_parallel_bounds",
    "TCPStore",
    "StoreTimeout",
]
