"""A tensor-parallel 2:4 sparse MLP block, one process per GPU, checked against one SparseLinear pair.

Start one process per GPU with the launcher you use (one process works on a single GPU)::

    torchrun --standalone --nproc_per_node 2 examples/tensor_parallel_mlp.py
    mpirun -np 2 python -m mpi4py examples/tensor_parallel_mlp.py
    python examples/tensor_parallel_mlp.py                    # one rank

Every rank builds the same weights (same seed) and keeps its shards: ``fc1`` column-parallel (the hidden
features split, ReLU fused), ``fc2`` row-parallel (one all-reduce). Rank 0 then runs the whole block with
two plain :class:`~pycusparselt.SparseLinear` layers on the same weights and prints the largest difference.

Without a GPU (or with ``--backend host``) the ranks run the NumPy reference and exchange arrays through the
job's engine (torch.distributed or MPI; one process needs none): the same sharded arithmetic, anywhere.
"""

from __future__ import annotations

import argparse

import ml_dtypes
import numpy as np

import pycusparselt as psl
from pycusparselt import distributed as dist

DTYPES = {"float16": np.float16, "bfloat16": ml_dtypes.bfloat16}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backend", choices=("auto", "nccl", "host"), default="auto",
                        help="nccl on GPUs, host on the NumPy reference (auto: nccl where a GPU is usable)")
    parser.add_argument("--hidden", type=int, default=1024, help="model width (BERT-large: 1024)")
    parser.add_argument("--ffn", type=int, default=4096, help="hidden features of the block (BERT-large: 4096)")
    parser.add_argument("--tokens", type=int, default=384, help="rows of x (batch x sequence)")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="float16")
    args = parser.parse_args()
    backend = args.backend
    if backend == "auto":
        backend = "nccl" if psl.gpu_unavailable_reason() is None else "host"
    elif backend == "nccl":
        psl.require_gpu(exit=True)  # one line, not a traceback, where no GPU is usable

    group = dist.init_process_group(backend)
    dtype = DTYPES[args.dtype]
    rng = np.random.default_rng(0)  # the same weights and input on every rank
    w1 = (rng.standard_normal((args.ffn, args.hidden)) / args.hidden**0.5).astype(dtype)
    b1 = (0.1 * rng.standard_normal(args.ffn)).astype(dtype)
    w2 = (rng.standard_normal((args.hidden, args.ffn)) / args.ffn**0.5).astype(dtype)
    b2 = (0.1 * rng.standard_normal(args.hidden)).astype(dtype)
    x = rng.standard_normal((args.tokens, args.hidden)).astype(dtype)
    if backend == "nccl":
        import cupy as xp  # init_process_group made this rank's GPU current

        w1, b1, w2, b2, x = (xp.asarray(a) for a in (w1, b1, w2, b2, x))
    else:
        xp = np

    with dist.ParallelSparseMLP(w1, b1, w2, b2, group=group, activation="relu") as mlp:
        y = mlp(x)
        if group.rank == 0:
            # the same block on one device: two SparseLinear layers on the full weights
            fc1, fc2 = psl.SparseLinear(w1, b1, activation="relu"), psl.SparseLinear(w2, b2)
            y_one = fc2(fc1(x))
            diff = float(xp.abs(y.astype(xp.float32) - y_one.astype(xp.float32)).max())
            scale = float(xp.abs(y_one.astype(xp.float32)).max())
            print(f"tensor-parallel MLP {args.hidden} -> {args.ffn} -> {args.hidden}, {args.dtype}, "
                  f"{group.world_size} rank(s), backend {backend}, engine {group.engine}, "
                  f"hidden shards {mlp.fc1.sizes}")
            print(f"output {tuple(y.shape)}: max |difference| from one SparseLinear pair {diff:.3g} "
                  f"(largest |y| {scale:.3g}, relative {diff / scale:.2e})")
            # partial sums are rounded per rank before the all-reduce: a few units of the type's precision
            eps = float(ml_dtypes.finfo(dtype).eps)
            assert diff <= 8 * group.world_size * eps * scale, "the tensor-parallel block disagrees"
            print("agrees with the single-device block")
    group.barrier()
    group.close()


if __name__ == "__main__":
    main()
