"""The checks the trainer config's dataclasses run in ``__post_init__``: a ``ValueError`` naming the bad value."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

__all__ = ["check_shortlist_shards", "is_int", "need", "need_choice"]


def need(condition: bool, message: str) -> None:
    if not condition:
        raise ValueError(message)


def need_choice(name: str, value: Any, choices: Sequence[Any]) -> None:
    need(value in choices and not isinstance(value, bool),
          f"`{name}` must be one of {', '.join(map(str, choices))}; got {value!r}")


def is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def check_shortlist_shards(exit_vocab: Sequence[int] | None, vocab_size: int, tp: int) -> None:
    """Every TP rank's vocabulary shard holds a shortlisted id (``model.exit_vocab``): a shortlisted exit's logits
    on a rank are its shard's shortlisted rows (:mod:`eellm_hf.trainer.exit_shortlist`), which may not be none."""
    if exit_vocab is None or tp == 1:
        return
    shard = -(-vocab_size // tp)  # the padded vocabulary's shard (parallel_model.padded_vocab_size)
    held = {token // shard for token in exit_vocab}
    for rank in range(tp):
        need(rank in held, f"`model.exit_vocab` has no token id in [{rank * shard}, {(rank + 1) * shard}), the "
                           f"vocabulary shard of TP rank {rank} of tp={tp}: shortlisted exits need one on every TP "
                           "rank (a larger shortlist, or a smaller tp)")
