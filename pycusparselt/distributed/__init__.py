"""Several GPUs: tensor-parallel SparseLinear layers over NCCL, and the launcher that starts them.

Megatron-style tensor parallelism for 2:4 sparse layers: :class:`ColumnParallelSparseLinear` shards the
output features, :class:`RowParallelSparseLinear` the input features (on multiples of the 2:4 group and of
the plans' alignment), and :class:`ParallelSparseMLP` chains them with one all-reduce, or in the
sequence-parallel form (``form="sequence"``) with an all-gather of the token rows in and a reduce-scatter out,
chunk by chunk. :class:`~pycusparselt.distributed.DataParallel` (:mod:`~pycusparselt.distributed.data`) runs
a whole model on each rank's share of the batch instead, for models that fit one GPU. Collectives run on
NCCL through CuPy (``cupy.cuda.nccl``), one process per GPU, started the way multi-GPU jobs already start::

    torchrun --nproc_per_node 4 train.py ...            # PyTorch's launcher (torch.distributed engine)
    mpirun -np 4 python -m mpi4py train.py ...          # MPI (mpi4py engine); srun under Slurm

    # train.py
    from pycusparselt import distributed as dist
    group = dist.init_process_group()          # the engine is read from the environment: group.engine
    mlp = dist.ParallelSparseMLP(w1, b1, w2, b2, group=group)
    y = mlp(x)                                 # the whole output, on every rank

or one process driving several GPUs (:meth:`NcclGroup.local`). The engines
(:mod:`~pycusparselt.distributed.engines`: torch.distributed, mpi4py, cupyx.distributed) only introduce the
ranks to each other; the data goes over NCCL. A :class:`HostGroup` runs the same sharded arithmetic on the
NumPy reference, without a GPU. Importing this package loads neither CuPy, NCCL, PyTorch nor MPI.
"""

from __future__ import annotations

from . import data, engines, sharding
from .data import DataParallel, batch_share, gather_rows
from .engines import choose_engine, pin_local_gpu
from .groups import Group, HostGroup, NcclGroup, env_config, init_process_group, load_nccl
from .parallel import FORMS, ColumnParallelSparseLinear, ParallelSparseMLP, RowParallelSparseLinear
from .sharding import aligned_multiple, row_parallel_bounds, sequence_bounds, shard_bounds

__all__ = [
    "sharding",
    "engines",
    "data",
    "choose_engine",
    "pin_local_gpu",
    "Group",
    "NcclGroup",
    "HostGroup",
    "init_process_group",
    "env_config",
    "load_nccl",
    "ColumnParallelSparseLinear",
    "RowParallelSparseLinear",
    "ParallelSparseMLP",
    "FORMS",
    "DataParallel",
    "batch_share",
    "gather_rows",
    "shard_bounds",
    "aligned_multiple",
    "row_parallel_bounds",
    "sequence_bounds",
]
