"""Launch small multi-process ``torch.distributed`` jobs from tests.

:func:`launch` starts ``nproc`` Python processes running one script with the environment ``torchrun`` would
give them (``RANK``, ``LOCAL_RANK``, ``WORLD_SIZE``, ``LOCAL_WORLD_SIZE``, ``MASTER_ADDR``, ``MASTER_PORT`` on
a free port), without torchrun's agent process, so each rank's exit code and output stay separate. Each
launch costs several seconds (interpreter + torch start-up per rank): put several checks in one launch.
"""

from __future__ import annotations

import dataclasses
import os
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]


@dataclasses.dataclass
class RankResult:
    """What one rank did."""

    rank: int
    returncode: int | None  # None: killed by launch() after the deadline
    stdout: str
    stderr: str

    def lines_with(self, prefix: str) -> list[str]:
        """Stdout lines starting with ``prefix``, with the prefix removed."""
        return [line[len(prefix) :] for line in self.stdout.splitlines() if line.startswith(prefix)]


class DistributedLaunchError(AssertionError):
    """A rank failed (non-zero exit) or the job ran past its deadline."""


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def offline_env(hf_home: str | None = None) -> dict[str, str]:
    """Environment variables that keep Hugging Face libraries off the network."""
    env = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    if hf_home is not None:
        env["HF_HOME"] = hf_home
    return env


def format_results(results: Sequence[RankResult], tail: int = 4000) -> str:
    """Each rank's exit code and the tails of its stdout/stderr, for error messages."""
    parts = []
    for r in results:
        code = "killed at deadline" if r.returncode is None else f"exit code {r.returncode}"
        parts.append(
            f"--- rank {r.rank}: {code}\n[stdout]\n{r.stdout[-tail:]}\n[stderr]\n{r.stderr[-tail:]}"
        )
    return "\n".join(parts)


def launch(
    script: str | os.PathLike[str],
    nproc: int,
    args: Sequence[str] = (),
    *,
    timeout_s: float = 120.0,
    env: Mapping[str, str] | None = None,
    check: bool = True,
    python: str = sys.executable,
) -> list[RankResult]:
    """Run ``python script *args`` as ranks ``0..nproc-1`` of one job and wait for all of them.

    Ranks still running ``timeout_s`` seconds after the start are killed (``returncode=None``). With
    ``check=True`` raises :class:`DistributedLaunchError` (with every rank's output) if any rank exited
    non-zero or was killed. Returns the per-rank results in rank order.
    """
    port = free_port()
    base_env = dict(os.environ)
    base_env.update(offline_env())
    base_env.update(
        {
            "MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": str(port),
            "WORLD_SIZE": str(nproc),
            "LOCAL_WORLD_SIZE": str(nproc),
            "GROUP_RANK": "0",
            "PYTHONUNBUFFERED": "1",
            "OMP_NUM_THREADS": "1",
            "PYTHONPATH": os.pathsep.join(p for p in (str(REPO_ROOT), os.environ.get("PYTHONPATH", "")) if p),
        }
    )
    if env:
        base_env.update(env)
    procs: list[tuple[subprocess.Popen, object, object]] = []
    with tempfile.TemporaryDirectory(prefix="dist_launch_") as tmp:
        for rank in range(nproc):
            rank_env = dict(base_env, RANK=str(rank), LOCAL_RANK=str(rank))
            out = open(Path(tmp) / f"rank{rank}.out", "w+")  # noqa: SIM115 - closed below
            err = open(Path(tmp) / f"rank{rank}.err", "w+")  # noqa: SIM115
            proc = subprocess.Popen(
                [python, str(script), *args], env=rank_env, stdout=out, stderr=err, cwd=str(REPO_ROOT)
            )
            procs.append((proc, out, err))
        deadline = time.monotonic() + timeout_s
        killed = set()
        for rank, (proc, _, _) in enumerate(procs):
            try:
                proc.wait(timeout=max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                killed.add(rank)
        for rank, (proc, _, _) in enumerate(procs):
            if proc.poll() is None:
                killed.add(rank)
                proc.kill()
                proc.wait()
        results = []
        for rank, (proc, out, err) in enumerate(procs):
            out.seek(0)
            err.seek(0)
            results.append(
                RankResult(
                    rank=rank,
                    returncode=None if rank in killed else proc.returncode,
                    stdout=out.read(),
                    stderr=err.read(),
                )
            )
            out.close()
            err.close()
    if check and any(r.returncode != 0 for r in results):
        failed = [r.rank for r in results if r.returncode != 0]
        header = f"{script} {' '.join(args)} with {nproc} processes: ranks {failed} failed\n"
        raise DistributedLaunchError(header + format_results(results))
    return results
