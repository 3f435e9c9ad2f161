"""Start the trainer's ranks on this machine: ``eellm-train --config cfg.yaml`` outside a launcher becomes
``torchrun --standalone --nproc-per-node tp*pp*dp -m eellm_hf.trainer --config cfg.yaml``."""

from __future__ import annotations

import os
import sys
from pathlib import Path

__all__ = ["launched_by_torchrun", "exec_torchrun", "torchrun_command", "threads_per_rank"]


def launched_by_torchrun() -> bool:
    """Whether this process is one rank of a launched job (torchrun, or any launcher that sets ``WORLD_SIZE``)."""
    return "WORLD_SIZE" in os.environ


def torchrun_command(config: str | Path, processes: int) -> list[str]:
    """torchrun (as ``python -m torch.distributed.run``, the same interpreter) with one local standalone job."""
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(processes),
            "-m", "eellm_hf.trainer", "--config", str(config)]


def threads_per_rank(processes: int) -> str:
    """``OMP_NUM_THREADS`` for each rank: the caller's, else this machine's usable cores shared out (torchrun's
    own default is 1 whatever the machine)."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return os.environ.get("OMP_NUM_THREADS") or str(max(1, cores // processes))


def exec_torchrun(config: str | Path, processes: int) -> None:
    """Replace this process by torchrun running ``processes`` ranks of the trainer, so that Ctrl-C and the exit
    status are torchrun's own (a dead rank ends the others there)."""
    print(f"eellm-train: {config} asks for {processes} processes (tp*pp*dp); starting them with torchrun",
          file=sys.stderr, flush=True)
    env = {**os.environ, "OMP_NUM_THREADS": threads_per_rank(processes)}
    command = torchrun_command(config, processes)
    os.execve(command[0], command, env)
