"""``python -m pycusparselt.distributed``: says how jobs start (pycusparselt has no launcher of its own)."""

import sys

GUIDE = """pycusparselt starts no processes itself: start one process per GPU with the launcher you already use.

  torchrun --nproc_per_node N script.py [args...]        (PyTorch; across nodes: --nnodes, --rdzv-endpoint)
  mpirun -np N python -m mpi4py script.py [args...]      (MPI with mpi4py)
  srun --ntasks-per-node N python -m mpi4py script.py    (Slurm)

In the script, pycusparselt.distributed.init_process_group() joins the job through the engine it finds
(torch.distributed, mpi4py or cupyx.distributed) and says which in group.engine."""

print(GUIDE, file=sys.stderr)
raise SystemExit(2)
