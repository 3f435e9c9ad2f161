"""Resuming a run: whether there is a checkpoint to resume, and the newest one that verifies on every rank."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from .nanotron_compat import ParallelContext, dist, optimizer_parameter_names

if TYPE_CHECKING:
    from .config import TrainerConfig

__all__ = ["check_optimizer_order", "check_something_to_resume", "load_verified_checkpoint"]


def check_something_to_resume(cfg: TrainerConfig, world_rank: int) -> None:
    """``checkpoint.resume: true`` needs a committed checkpoint in ``checkpoint.dir``; ``auto`` says which of
    resuming and starting it does."""
    from .checkpoint import resume_candidates

    ckpt = cfg.checkpoint
    if ckpt is None or ckpt.resume is False:
        return
    candidates = resume_candidates(ckpt.dir)
    if ckpt.resume is True and not candidates:
        what = "does not exist" if not Path(ckpt.dir).exists() else "holds no committed checkpoint (step_*/meta.json)"
        raise FileNotFoundError(f"`checkpoint.resume` is true but the checkpoint folder {ckpt.dir} {what}: fix "
                                "`checkpoint.dir`, or set `resume: auto` to start from scratch when there is none")
    if world_rank == 0 and ckpt.resume == "auto":
        print(f"checkpoint.resume auto: resuming from {candidates[0]}" if candidates else
              f"checkpoint.resume auto: no checkpoint in {ckpt.dir}, starting from step 0", file=sys.stderr, flush=True)


def load_verified_checkpoint(cfg: TrainerConfig, ctx: ParallelContext,
                              layout: dict[str, int]) -> tuple[dict[str, torch.Tensor], dict[str, Any]] | None:
    """This rank's part of the newest checkpoint whose files verify on every rank (collective), or None when
    there is nothing to resume. A checkpoint that fails on some rank is named with its bad files (printed by
    world rank 0), and the previous one is tried; if none verifies, ``CheckpointCorruptError``."""
    from .checkpoint import CheckpointCorruptError, load_checkpoint, resume_candidates

    ckpt, world_rank = cfg.checkpoint, dist.get_rank(ctx.world_pg)
    if ckpt is None or ckpt.resume is False:
        return None
    candidates = resume_candidates(ckpt.dir)
    problems: list[str] = []
    for path in candidates:
        error, loaded = None, None
        try:
            loaded = load_checkpoint(path, world_rank, world_size=cfg.parallelism.world_size, layout=layout,
                                     config_hash=cfg.fingerprint(), device=ctx.device)
        except CheckpointCorruptError as exc:
            error = str(exc)
        errors: list[str | None] = [None] * ctx.world_pg.size()
        dist.all_gather_object(errors, error, group=ctx.world_pg)
        bad = [e for e in errors if e is not None]
        if not bad:
            if world_rank == 0 and problems:
                print(f"resuming from {path} instead (the newest checkpoint that verifies)", file=sys.stderr,
                      flush=True)
            return loaded
        problems.extend(bad)
        if world_rank == 0:
            print(f"checkpoint {path} failed verification: {'; '.join(bad)}", file=sys.stderr, flush=True)
    if problems:
        raise CheckpointCorruptError(f"no checkpoint in {ckpt.dir} verifies: {'; '.join(problems)}")
    return None


def check_optimizer_order(optimizer: Any, saved: dict[str, Any], where: str | Path) -> None:
    """A checkpoint's optimizer state indexes parameters by position (``saved["names"]``: index -> name, from
    nanotron's ``NamedOptimizer``); it fits ``optimizer`` only if every index names the same parameter there.
    Otherwise (a checkpoint written by a version that ordered the parameters differently) the Adam moments would
    silently land on other parameters: ``CheckpointMismatchError``."""
    from .checkpoint import CheckpointMismatchError

    current = optimizer_parameter_names(optimizer)
    for index, name in sorted((saved.get("names") or {}).items()):
        now = current[index] if index < len(current) else None
        if now != name:
            raise CheckpointMismatchError(
                f"{where}: the optimizer state was saved with parameter {index} = {name!r}, but this run's "
                f"optimizer has {now!r} there (a checkpoint written by a version that orders parameters "
                "differently): resume it with that version, or start over with `checkpoint.resume: false`")
