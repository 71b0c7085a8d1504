"""``python -m pycusparselt.distributed``: start one process per GPU, as torchrun does.

::

    python -m pycusparselt.distributed --nproc 4 script.py [args...]
    python -m pycusparselt.distributed --nproc 4 -m package.module [args...]

Each process gets ``RANK``, ``LOCAL_RANK``, ``WORLD_SIZE``, ``LOCAL_WORLD_SIZE``, ``MASTER_ADDR`` and
``MASTER_PORT`` (what :func:`pycusparselt.distributed.init_process_group` reads; rank 0 serves the
rendezvous store there) and ``NCCL_NVLS_ENABLE=0`` (NVLink multicast off, whatever the caller's environment
says). Rank ``r`` of a node uses GPU ``LOCAL_RANK``. With ``--nnodes`` > 1, run the launcher once per node
with its ``--node-rank`` and the same ``--master-addr`` and ``--master-port``.

If a process fails, the others are stopped and the launcher exits with the failed process's status.
"""

from __future__ import annotations

import argparse
import os
import signal
import socket
import subprocess
import sys
import time
from typing import Sequence

__all__ = ["main", "worker_environments", "free_port"]

_GRACE_S = 5.0


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def worker_environments(
    nproc: int, *, nnodes: int = 1, node_rank: int = 0, master_addr: str = "127.0.0.1", master_port: int,
    base: dict[str, str] | None = None,
) -> list[dict[str, str]]:
    """The environment of each process this node starts."""
    base = dict(os.environ if base is None else base)
    envs = []
    for local_rank in range(nproc):
        env = dict(base)
        env.update(
            RANK=str(node_rank * nproc + local_rank),
            LOCAL_RANK=str(local_rank),
            WORLD_SIZE=str(nnodes * nproc),
            LOCAL_WORLD_SIZE=str(nproc),
            MASTER_ADDR=master_addr,
            MASTER_PORT=str(master_port),
            NCCL_NVLS_ENABLE="0",
        )
        envs.append(env)
    return envs


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m pycusparselt.distributed",
        description="Start one process per GPU with the environment init_process_group() reads.",
    )
    parser.add_argument("--nproc", "--nproc-per-node", dest="nproc", type=int, default=1,
                        help="processes on this node, one per GPU (default 1)")
    parser.add_argument("--nnodes", type=int, default=1, help="nodes in the job (default 1)")
    parser.add_argument("--node-rank", type=int, default=0, help="this node's index (default 0)")
    parser.add_argument("--master-addr", default="127.0.0.1", help="where rank 0 serves the store (default 127.0.0.1)")
    parser.add_argument("--master-port", type=int, default=0,
                        help="the store's port (default: a free one; required with --nnodes > 1)")
    parser.add_argument("-m", dest="module", action="store_true", help="run the target as a module (python -m)")
    parser.add_argument("target", help="the script (or, with -m, the module) every process runs")
    parser.add_argument("args", nargs=argparse.REMAINDER, help="its arguments")
    return parser


def _stop(processes: list[subprocess.Popen]) -> None:
    for process in processes:
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + _GRACE_S
    for process in processes:
        try:
            process.wait(timeout=max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def main(argv: Sequence[str] | None = None) -> int:
    """Run the launcher; returns the exit status (0 when every process succeeded)."""
    parser = _parser()
    args = parser.parse_args(argv)
    if args.nproc < 1:
        parser.error(f"--nproc: expected a positive number of processes, got {args.nproc}")
    if args.nnodes < 1 or not 0 <= args.node_rank < args.nnodes:
        parser.error(f"--nnodes {args.nnodes} and --node-rank {args.node_rank}: expected 0 <= node-rank < nnodes")
    if args.nnodes > 1 and args.master_port == 0:
        parser.error("--master-port: a job of several nodes needs the same explicit port on every node")
    port = args.master_port or free_port(args.master_addr)
    python = [sys.executable] + (["-P"] if getattr(sys.flags, "safe_path", False) else [])
    command = python + (["-m", args.target] if args.module else [args.target]) + list(args.args)
    envs = worker_environments(
        args.nproc, nnodes=args.nnodes, node_rank=args.node_rank, master_addr=args.master_addr, master_port=port
    )
    processes: list[subprocess.Popen] = []
    try:
        for env in envs:
            processes.append(subprocess.Popen(command, env=env))
        while True:
            codes = [process.poll() for process in processes]
            failed = [(rank, code) for rank, code in enumerate(codes) if code not in (None, 0)]
            if failed:
                rank, code = failed[0]
                print(f"pycusparselt.distributed: local rank {rank} exited with status {code}; stopping the others",
                      file=sys.stderr)
                _stop(processes)
                return code if code > 0 else 128 - code
            if all(code == 0 for code in codes):
                return 0
            time.sleep(0.05)
    except KeyboardInterrupt:
        _stop(processes)
        return 130
