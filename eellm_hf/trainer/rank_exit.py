"""How a training (or pipeline-decoding) rank ends: at once with a clear message on an error, in order on success.

* :func:`fail_fast` turns an exception in one rank (typically a collective that timed out because a peer died)
  into a clear message and an immediate exit, instead of a hang at interpreter shutdown.
* :func:`destroy_process_groups` ends a finished job: a barrier, then the process groups are destroyed.
"""

from __future__ import annotations

import contextlib
import os
import sys
import traceback
from collections.abc import Iterator

import torch.distributed as dist

__all__ = ["destroy_process_groups", "fail_fast"]


@contextlib.contextmanager
def fail_fast(exit_code: int = 1) -> Iterator[None]:
    """Run a rank's main code; on any exception print a clear error and ``os._exit(exit_code)`` at once.

    A collective whose peer died raises after the group timeout (or at once when the peer's socket closed);
    exiting normally afterwards can hang in process-group teardown, so this exits hard after flushing.
    ``SystemExit(0)``/``SystemExit(None)`` pass through.
    """
    try:
        yield
    except SystemExit as exc:
        if exc.code in (0, None):
            raise
        _die(exc, exit_code if not isinstance(exc.code, int) else exc.code)
    except BaseException as exc:  # noqa: BLE001 - we report everything, then exit
        _die(exc, exit_code)


def destroy_process_groups() -> None:
    """End a finished job in order (collective): every rank reaches a barrier, then the process groups are
    destroyed. Exiting with them alive leaves the teardown of gloo's threads to the interpreter's exit, which can
    abort the process (``terminate called without an active exception``) after a successful run."""
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def _die(exc: BaseException, exit_code: int) -> None:
    rank = os.environ.get("RANK", "?")
    world = os.environ.get("WORLD_SIZE", "?")
    text = str(exc)
    hint = ""
    lowered = text.lower()
    if any(k in lowered for k in ("timed out", "timeout", "connection closed", "connection reset", "peer")):
        hint = " (a peer rank probably died or hung; check the other ranks' logs)"
    sys.stdout.flush()
    sys.stderr.write(
        f"[rank {rank}/{world}] FATAL: {type(exc).__name__}: {text}{hint}\n"
        + "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))
    )
    sys.stderr.flush()
    os._exit(exit_code)
