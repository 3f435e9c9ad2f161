"""Vocabulary-pruned exits in the parallel model: each TP rank's part of the exits' shortlist.

With ``config.exit_vocab`` an exit predicts among the shortlisted tokens only (see ``EarlyExitGPTConfig``). The
heads stay vocabulary-parallel: TP rank ``r`` holds rows ``[r * shard, (r + 1) * shard)`` of the (padded)
vocabulary, so its part of the shortlist is the shortlisted ids in that range, and the exit's logits on that
rank are its weight shard's rows at those ids only. The final head's teacher logits are sharded the same way, so
restricting the teacher to the shortlist needs no communication either.

``model.exit_vocab_size: K`` in the trainer's YAML chooses the shortlist: the K tokens most frequent among the
training split's labels (:func:`exit_vocab_of_training_data`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import numpy as np
import torch

from .loss import IGNORE_INDEX

__all__ = ["ShortlistShard", "exit_vocab_of_training_data"]


@dataclasses.dataclass(frozen=True)
class ShortlistShard:
    """TP rank ``tp_rank``'s part of a shortlist: ``rows``, the shortlisted ids' indices in the rank's vocabulary
    shard (rows of an exit head's weight shard, columns of the teacher's logits), and ``ids``, their global ids;
    over the padded vocabulary, ``column`` (each id's column in this rank's shortlisted logits, -1 when it is on
    another rank or off the shortlist) and ``listed`` (whether the id is on the shortlist at all)."""

    rows: torch.Tensor
    ids: torch.Tensor
    column: torch.Tensor
    listed: torch.Tensor

    @classmethod
    def of(cls, exit_vocab: Sequence[int], shard: int, tp_rank: int, tp: int,
           device: torch.device | None = None) -> ShortlistShard:
        every = torch.tensor(sorted(exit_vocab), dtype=torch.long, device=device)
        start = tp_rank * shard
        ids = every[(every >= start) & (every < start + shard)]
        if ids.numel() == 0:  # refused when the run is configured (config_checks.check_shortlist_shards)
            raise ValueError(f"`exit_vocab` has no id in TP rank {tp_rank}'s vocabulary shard [{start}, "
                             f"{start + shard})")
        column = torch.full((shard * tp,), -1, dtype=torch.long, device=device)
        column[ids] = torch.arange(ids.numel(), device=device)
        listed = torch.zeros(shard * tp, dtype=torch.bool, device=device)
        listed[every] = True
        return cls(rows=ids - start, ids=ids, column=column, listed=listed)

    def label_columns(self, labels: torch.Tensor) -> torch.Tensor:
        """Each label's column in this rank's shortlisted logits (-1: another rank's, off the shortlist, or
        ``IGNORE_INDEX``)."""
        return torch.where(labels != IGNORE_INDEX, self.column[labels.clamp(min=0)], -1)

    def listed_labels(self, labels: torch.Tensor) -> torch.Tensor:
        """Whether each label is a shortlisted token (False for ``IGNORE_INDEX``)."""
        return (labels != IGNORE_INDEX) & self.listed[labels.clamp(min=0)]


def exit_vocab_of_training_data(rows: np.ndarray, indices: np.ndarray, size: int, vocab_size: int,
                                chunk_rows: int = 4096) -> list[int]:
    """The ``size`` tokens most frequent among the labels of the training split (``rows[indices]``, packed rows
    whose labels are ``row[1:]``; ties to the lower id), sorted: the shortlist ``model.exit_vocab_size`` asks for.
    Counted ``chunk_rows`` rows at a time, so a memory-mapped split is never copied whole."""
    from eellm_hf.modeling.convert import exit_vocab_from_counts

    counts = np.zeros(vocab_size, dtype=np.int64)
    for start in range(0, len(indices), chunk_rows):
        labels = np.asarray(rows[np.sort(indices[start:start + chunk_rows]), 1:]).reshape(-1)
        counts += np.bincount(labels[(labels >= 0) & (labels < vocab_size)], minlength=vocab_size)
    return exit_vocab_from_counts(torch.from_numpy(counts), size)
