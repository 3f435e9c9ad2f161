"""The multi-exit loss across pipeline stages (design notes §2-§3).

``loss = CE(final head) + sum_i w_i * CE(exit i)``, every CE a token mean over the whole *global* batch that
counts only real labels (``labels != -100``). Each head computes the summed token losses of its micro-batch and
scales them by ``num_micro_batches / num_label_tokens`` (``num_label_tokens``: the global count, known on every
rank because every rank sees the global batch); nanotron's engine then divides the final head's loss by
``num_micro_batches`` and the exit heads do the same themselves (:meth:`MultiExitLoss.exit_backward_loss`).
Gradients are summed over data-parallel ranks, so the result is exactly the gradient of the global token mean,
whatever the layout.

Self-distillation (``train.exit_distillation`` w, EE-Tuning only): an exit's per-token loss becomes
``w * KL(final head || exit) + (1 - w) * CE``, the final head's distribution a constant teacher
(:func:`distillation_token_losses`, on TP-sharded logits).

Each stage registers its exits' losses in nanotron's "activations requiring backward" list, next to the
activation it sends downstream: backpropagating their sum is the auxiliary loss ``L_i^exit + <x_i, g_i>`` of
EE-LLM's Proposition 3.1, with no communication beyond normal pipeline parallelism. Vocabulary-sized logits never
leave the stage of their head: :func:`vocab_parallel_token_losses` runs nanotron's ``sharded_cross_entropy`` on
the TP-sharded logits.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Iterator, Sequence
from typing import Any

import torch
import torch.nn.functional as F

from .nanotron_compat import dist, sharded_cross_entropy

__all__ = [
    "IGNORE_INDEX",
    "MultiExitLoss",
    "count_label_tokens",
    "mask_padded_vocab",
    "reduce_head_sums",
    "TeacherTargets",
    "distillation_token_losses",
    "gate_token_losses",
    "shortlist_token_losses",
    "teacher_top",
    "summarize_losses",
    "vocab_parallel_argmax",
    "vocab_parallel_token_losses",
]

IGNORE_INDEX = -100
"""Label value that contributes no loss (as in transformers)."""


def count_label_tokens(labels: torch.Tensor) -> int:
    """Number of real labels (``!= IGNORE_INDEX``) in a batch."""
    return int((labels != IGNORE_INDEX).sum())


def mask_padded_vocab(sharded_logits: torch.Tensor, vocab_size: int, tp_rank: int) -> torch.Tensor:
    """Set the logits of padding vocabulary entries (ids ``>= vocab_size``) of this TP shard to ``-inf``, so they
    never win and never enter the loss. A no-op when the shard holds no padding."""
    shard = sharded_logits.shape[-1]
    start = tp_rank * shard
    if start + shard <= vocab_size:
        return sharded_logits
    padded = torch.arange(start, start + shard, device=sharded_logits.device) >= vocab_size
    return sharded_logits.masked_fill(padded, float("-inf"))


def vocab_parallel_token_losses(
    sharded_logits: torch.Tensor, labels: torch.Tensor, tp_pg: dist.ProcessGroup, vocab_size: int
) -> torch.Tensor:
    """Per-token cross-entropy (fp32) of TP-sharded logits ``(batch, seq, vocab_padded / tp)``; ``0`` where the
    label is ``IGNORE_INDEX``. Padding vocabulary entries are masked out. nanotron's ``sharded_cross_entropy``
    with TP, ``F.cross_entropy`` without."""
    if tp_pg.size() == 1:  # the same math, without nanotron's collectives and in-place passes
        logits = sharded_logits[..., :vocab_size].float()
        return F.cross_entropy(logits.reshape(-1, vocab_size), labels.reshape(-1), ignore_index=IGNORE_INDEX,
                               reduction="none").view_as(labels)
    sharded_logits = mask_padded_vocab(sharded_logits, vocab_size, dist.get_rank(tp_pg))
    real = labels != IGNORE_INDEX
    token_losses = sharded_cross_entropy(sharded_logits, labels.clamp(min=0), group=tp_pg, dtype=torch.float32)
    return token_losses * real


@dataclasses.dataclass
class TeacherTargets:
    """The final head's distribution over this TP rank's vocabulary shard, the teacher of self-distillation and
    the target of exit gates: ``probs`` (fp32, 0 on padding entries), ``neg_entropy`` (per token ``sum p log p``
    over the whole vocabulary) and ``top``. Computed once per micro-batch and shared by every exit of a stage.

    For exits with a vocabulary shortlist (``config.exit_vocab``) the teacher is the final head's distribution
    restricted to the shortlist and renormalised there (:meth:`from_shortlist`): ``probs`` and ``neg_entropy`` over
    this rank's shortlisted columns (:class:`~eellm_hf.trainer.exit_shortlist.ShortlistShard`), ``top`` still the
    final head's greedy token over the whole vocabulary (an exit cannot agree with a token off its shortlist)."""

    probs: torch.Tensor
    neg_entropy: torch.Tensor
    top: torch.Tensor  # the final head's greedy token (global vocabulary id), the target of exit gates

    @classmethod
    @torch.no_grad()
    def from_logits(cls, sharded_logits: torch.Tensor, tp_pg: dist.ProcessGroup, vocab_size: int) -> TeacherTargets:
        raw = sharded_logits.float()
        logits = mask_padded_vocab(raw, vocab_size, _tp_rank(tp_pg))
        values, indices = logits.max(dim=-1)  # one pass: the softmax's shift and the greedy token
        top = _global_argmax(values, indices + _tp_rank(tp_pg) * logits.shape[-1], tp_pg)
        # on the raw logits, whose padding entries are finite (with probability 0), not -inf
        probs, neg_entropy = _softmax_and_neg_entropy(logits, raw, values, tp_pg)
        return cls(probs, neg_entropy, top)

    @classmethod
    @torch.no_grad()
    def from_shortlist(cls, shortlisted_logits: torch.Tensor, top: torch.Tensor,
                       tp_pg: dist.ProcessGroup) -> TeacherTargets:
        """The teacher restricted to a shortlist, from the final head's logits at this rank's shortlisted columns
        and its greedy token over the whole vocabulary (:func:`teacher_top`)."""
        logits = shortlisted_logits.float()
        probs, neg_entropy = _softmax_and_neg_entropy(logits, logits, logits.amax(dim=-1), tp_pg)
        return cls(probs, neg_entropy, top)


def _softmax_and_neg_entropy(logits: torch.Tensor, raw: torch.Tensor, local_peak: torch.Tensor,
                             tp_pg: dist.ProcessGroup) -> tuple[torch.Tensor, torch.Tensor]:
    """The softmax of TP-sharded ``logits`` (each rank's largest entry ``local_peak``) and ``sum p log p`` per
    token, as ``sum p * raw - logsumexp`` (``raw``: the logits with finite values where ``logits`` has -inf)."""
    peak = local_peak.unsqueeze(-1).clone()
    _all_reduce(peak, tp_pg, dist.ReduceOp.MAX)
    probs = (logits - peak).exp_()
    total = probs.sum(dim=-1, keepdim=True)
    _all_reduce(total, tp_pg)
    probs.div_(total)
    neg_entropy = (probs * raw).sum(dim=-1)  # sum p log p = sum p * z - logsumexp(z), as sum p = 1
    _all_reduce(neg_entropy, tp_pg)
    neg_entropy -= (peak + total.log()).squeeze(-1)
    return probs, neg_entropy


@torch.no_grad()
def teacher_top(sharded_logits: torch.Tensor, tp_pg: dist.ProcessGroup, vocab_size: int) -> torch.Tensor:
    """The final head's greedy token (global id) from its TP-sharded logits (padding entries never win)."""
    return vocab_parallel_argmax(mask_padded_vocab(sharded_logits, vocab_size, _tp_rank(tp_pg)), tp_pg)


@torch.no_grad()
def vocab_parallel_argmax(sharded: torch.Tensor, tp_pg: dist.ProcessGroup,
                          column_ids: torch.Tensor | None = None) -> torch.Tensor:
    """Per token, the global vocabulary id of the largest entry of TP-sharded scores (the lowest id on ties, as
    ``torch.argmax`` on the whole vocabulary). Padding entries must already be ``-inf`` (or 0 probabilities).
    ``column_ids``: the global id of each column (default: this rank's contiguous shard of the vocabulary)."""
    values, indices = sharded.max(dim=-1)
    if column_ids is None:
        return _global_argmax(values, indices + _tp_rank(tp_pg) * sharded.shape[-1], tp_pg)
    return _global_argmax(values, column_ids[indices], tp_pg)


def _global_argmax(values: torch.Tensor, ids: torch.Tensor, tp_pg: dist.ProcessGroup) -> torch.Tensor:
    """The global vocabulary id of the largest entry, from each TP rank's largest entry (``values``) and its
    global id (``ids``); the lowest id on ties."""
    if tp_pg.size() == 1:
        return ids
    best = values.clone()
    dist.all_reduce(best, op=dist.ReduceOp.MAX, group=tp_pg)
    candidate = torch.where(values == best, ids, torch.iinfo(ids.dtype).max)
    dist.all_reduce(candidate, op=dist.ReduceOp.MIN, group=tp_pg)
    return candidate


def gate_token_losses(gate_logits: torch.Tensor, exit_top: torch.Tensor, teacher_top: torch.Tensor,
                      labels: torch.Tensor) -> torch.Tensor:
    """Per-token binary cross-entropy (fp32) of an exit's confidence gate against "the exit's greedy token is
    the final head's"; ``0`` where the label is ``IGNORE_INDEX``."""
    agree = (exit_top == teacher_top).float()
    losses = F.binary_cross_entropy_with_logits(gate_logits.float(), agree, reduction="none")
    return losses * (labels != IGNORE_INDEX)


def _tp_rank(tp_pg: dist.ProcessGroup) -> int:
    return dist.get_rank(tp_pg) if tp_pg.size() > 1 else 0


def _all_reduce(tensor: torch.Tensor, tp_pg: dist.ProcessGroup, op: Any = None) -> None:
    if tp_pg.size() > 1:
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM if op is None else op, group=tp_pg)


class _DistillationCrossEntropy(torch.autograd.Function):
    """Per-token ``w * KL(teacher || softmax(z)) + (1 - w) * CE(z, label)`` on TP-sharded logits ``z`` (fp32), in
    one pass over the columns: with ``lse = logsumexp(z)``, ``KL = sum p log p - sum p z + lse`` and
    ``CE = lse - z[label]``; the gradient is ``softmax(z) - w * p - (1 - w) * onehot(label)``.

    ``label_column``: the label's column on this rank (-1: elsewhere); ``real``: tokens with a label (the KL
    counts them); ``listed``: tokens whose label the head can predict (the CE counts them; ``real`` for a whole
    vocabulary). Columns from ``width`` on are padding (probability 0). Without a teacher ``w`` must be 0."""

    @staticmethod
    def forward(ctx, logits: torch.Tensor, teacher: TeacherTargets | None, label_column: torch.Tensor,
                real: torch.Tensor, listed: torch.Tensor, weight: float, width: int,
                tp_pg: dist.ProcessGroup) -> torch.Tensor:
        peak = logits.amax(dim=-1, keepdim=True)  # padding entries may raise it: still a valid shift
        _all_reduce(peak, tp_pg, dist.ReduceOp.MAX)
        probs = (logits - peak).exp_()
        if width < logits.shape[-1]:
            probs[..., width:] = 0.0
        total = probs.sum(dim=-1, keepdim=True)
        _all_reduce(total, tp_pg)
        probs.div_(total)
        lse = (peak + total.log()).squeeze(-1)
        in_shard = label_column >= 0
        column = label_column.clamp(min=0)
        label_logit = torch.where(in_shard, logits.gather(-1, column.unsqueeze(-1)).squeeze(-1), 0.0)
        _all_reduce(label_logit, tp_pg)
        losses = (1.0 - weight) * (lse - label_logit) * listed
        if teacher is not None:
            cross = (teacher.probs * logits).sum(dim=-1)  # padding: teacher probability 0
            _all_reduce(cross, tp_pg)
            losses = losses + weight * (teacher.neg_entropy - cross + lse) * real
        ctx.save_for_backward(probs, column, in_shard, real, listed)
        ctx.teacher_probs = None if teacher is None else teacher.probs
        ctx.weight = weight
        return losses

    @staticmethod
    def backward(ctx, grad_losses: torch.Tensor) -> tuple:
        probs, column, in_shard, real, listed = ctx.saved_tensors
        weight = ctx.weight
        # d/dz of w * real * KL + (1 - w) * listed * CE (the saved softmax is not needed any more)
        grad = probs.mul_((weight * real + (1.0 - weight) * listed).unsqueeze(-1))
        if ctx.teacher_probs is not None:
            grad.sub_(ctx.teacher_probs * (weight * real).unsqueeze(-1))
        hard = torch.where(in_shard, 1.0 - weight, 0.0).to(grad.dtype)
        grad.scatter_add_(-1, column.unsqueeze(-1), -hard.unsqueeze(-1))
        grad.mul_(grad_losses.unsqueeze(-1))
        return grad, None, None, None, None, None, None, None


def distillation_token_losses(
    sharded_logits: torch.Tensor, teacher: TeacherTargets, labels: torch.Tensor, tp_pg: dist.ProcessGroup,
    vocab_size: int, weight: float,
) -> torch.Tensor:
    """Per-token ``weight * KL(teacher || exit) + (1 - weight) * CE`` (fp32) of an exit's TP-sharded logits
    ``(batch, seq, vocab_padded / tp)``; ``0`` where the label is ``IGNORE_INDEX``."""
    shard = sharded_logits.shape[-1]
    start = _tp_rank(tp_pg) * shard
    real = labels != IGNORE_INDEX
    local = labels - start
    label_column = torch.where(real & (local >= 0) & (local < shard), local, -1)
    width = min(max(vocab_size - start, 0), shard)
    return _DistillationCrossEntropy.apply(sharded_logits.float(), teacher, label_column, real, real, float(weight),
                                           width, tp_pg)


def shortlist_token_losses(
    shortlisted_logits: torch.Tensor, teacher: TeacherTargets | None, label_column: torch.Tensor,
    labels: torch.Tensor, listed: torch.Tensor, tp_pg: dist.ProcessGroup, weight: float,
) -> torch.Tensor:
    """Per-token losses (fp32) of an exit with a vocabulary shortlist, from its logits at this rank's shortlisted
    columns: ``weight * KL(teacher restricted to the shortlist || exit) + (1 - weight) * CE``, where a label off
    the shortlist (``listed`` False) costs no CE; ``label_column``: the label's column here (-1: elsewhere)."""
    real = labels != IGNORE_INDEX
    return _DistillationCrossEntropy.apply(shortlisted_logits.float(), teacher if weight > 0.0 else None,
                                           label_column, real, listed & real, float(weight),
                                           shortlisted_logits.shape[-1], tp_pg)


class MultiExitLoss:
    """Loss bookkeeping shared by the heads of one model replica on one rank.

    Heads are indexed ``0..num_exits-1`` (exits, in ``exit_layers`` order) and ``num_exits`` (the final head).
    Per step the trainer calls :meth:`begin_step`; each head calls :meth:`head_loss` per micro-batch, which also
    accumulates the detached token-loss sums that :meth:`take_sums` returns (zeros for heads on other ranks).
    """

    def __init__(self, num_exits: int, exit_weights: Sequence[float] | None = None) -> None:
        self.num_exits = num_exits
        self.exit_weights = [1.0] * num_exits if exit_weights is None else [float(w) for w in exit_weights]
        self.temperature = 1.0
        self.distillation = 0.0
        self.num_label_tokens = 1
        self.num_micro_batches = 1
        self._sums: list[torch.Tensor | None] = [None] * (num_exits + 1)
        self._gate_sums: list[torch.Tensor | None] = [None] * num_exits
        self._bubble_sums: list[torch.Tensor | None] = [None] * (num_exits + 1)

    @property
    def final_index(self) -> int:
        return self.num_exits

    def begin_step(
        self,
        num_label_tokens: int,
        num_micro_batches: int,
        exit_weights: Sequence[float] | None = None,
        temperature: float | None = None,
        distillation: float | None = None,
    ) -> None:
        """Set this step's normaliser (global count of real label tokens), micro-batch count, exit weights,
        exit temperature and distillation weight, and reset the accumulated sums."""
        if len(exit_weights or []) not in (0, self.num_exits):
            raise ValueError(f"expected {self.num_exits} exit weights, got {list(exit_weights or [])}")
        self.num_label_tokens = max(int(num_label_tokens), 1)
        self.num_micro_batches = int(num_micro_batches)
        if exit_weights is not None:
            self.exit_weights = [float(w) for w in exit_weights]
        if temperature is not None:
            self.temperature = float(temperature)
        if distillation is not None:
            self.distillation = float(distillation)
        self.reset_sums()

    def reset_sums(self) -> None:
        self._sums = [None] * (self.num_exits + 1)
        self._gate_sums = [None] * self.num_exits
        self._bubble_sums = [None] * (self.num_exits + 1)

    @contextlib.contextmanager
    def recording_bubble_sums(self) -> Iterator[None]:
        """Within: head losses accumulate into the bubble micro-batches' sums (:mod:`.exit_schedule`), apart
        from the main micro-batches' (their normalisation is the same: per token, as a main token)."""
        main, self._sums = self._sums, self._bubble_sums
        try:
            yield
        finally:
            self._bubble_sums, self._sums = self._sums, main

    def take_bubble_sums(self, device: torch.device | str = "cpu") -> torch.Tensor:
        """The bubble micro-batches' per-head token-loss sums (float64, length ``num_exits + 1``; zeros for heads
        they did not reach), then reset."""
        sums = torch.zeros(self.num_exits + 1, dtype=torch.float64, device=device)
        for head, value in enumerate(self._bubble_sums):
            if value is not None:
                sums[head] = value.to(device=device, dtype=torch.float64)
        self._bubble_sums = [None] * (self.num_exits + 1)
        return sums

    def take_sums(self, device: torch.device | str = "cpu") -> torch.Tensor:
        """The accumulated per-head token-loss sums, then the exit gates' (float64 on ``device``, length
        ``2 * num_exits + 1``; zeros for heads on other ranks and exits without gates), then reset."""
        sums = torch.zeros(2 * self.num_exits + 1, dtype=torch.float64, device=device)
        for head, value in enumerate(self._sums + self._gate_sums):
            if value is not None:
                sums[head] = value.to(device=device, dtype=torch.float64)
        self.reset_sums()
        return sums

    def weight(self, head: int) -> float:
        return 1.0 if head == self.final_index else self.exit_weights[head]

    def head_loss(self, head: int, token_losses: torch.Tensor) -> torch.Tensor:
        """This micro-batch's weighted, normalised loss of ``head`` (what nanotron divides by the micro-batch
        count before backward); records the unweighted token-loss sum for logging."""
        total = token_losses.sum()
        previous = self._sums[head]
        detached = total.detach().to(torch.float64)
        self._sums[head] = detached if previous is None else previous + detached
        return total * (self.weight(head) * self.num_micro_batches / self.num_label_tokens)

    def gate_loss(self, head: int, token_losses: torch.Tensor) -> torch.Tensor:
        """This micro-batch's normalised loss of exit ``head``'s gate (weight 1); records its sum for logging."""
        total = token_losses.sum()
        previous = self._gate_sums[head]
        detached = total.detach().to(torch.float64)
        self._gate_sums[head] = detached if previous is None else previous + detached
        return total * (self.num_micro_batches / self.num_label_tokens)

    def exit_backward_loss(self, loss: torch.Tensor) -> torch.Tensor:
        """An exit's micro-batch loss as registered for backward: divided by the micro-batch count, as nanotron's
        engine does for the final head's loss."""
        return loss / self.num_micro_batches


def reduce_head_sums(sums: torch.Tensor, groups: Sequence[dist.ProcessGroup]) -> torch.Tensor:
    """Sum per-head token-loss sums over ``groups`` (the pipeline group, then the data-parallel group). TP ranks
    hold identical values and are not reduced."""
    sums = sums.to(torch.float64).clone()
    for group in groups:
        if group.size() > 1:
            dist.all_reduce(sums, op=dist.ReduceOp.SUM, group=group)
    return sums


def summarize_losses(
    sums: torch.Tensor, num_label_tokens: int, exit_weights: Sequence[float]
) -> tuple[float, list[float]]:
    """``(loss, per_head)`` from global per-head sums: ``per_head`` are the unweighted token means (exits, then
    the final head) and ``loss`` = final + ``sum_i w_i * exit_i``."""
    per_head = [float(s) / max(int(num_label_tokens), 1) for s in sums.tolist()]
    loss = per_head[-1] + sum(w * x for w, x in zip(exit_weights, per_head[:-1]))
    return loss, per_head
