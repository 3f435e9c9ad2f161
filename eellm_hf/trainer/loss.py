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
(:func:`vocab_parallel_kl`, on TP-sharded logits).

Each stage registers its exits' losses in nanotron's "activations requiring backward" list, next to the
activation it sends downstream: backpropagating their sum is the auxiliary loss ``L_i^exit + <x_i, g_i>`` of
EE-LLM's Proposition 3.1, with no communication beyond normal pipeline parallelism. Vocabulary-sized logits never
leave the stage of their head: :func:`vocab_parallel_token_losses` runs nanotron's ``sharded_cross_entropy`` on
the TP-sharded logits.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

from .nanotron_compat import dist, sharded_cross_entropy

__all__ = [
    "IGNORE_INDEX",
    "MultiExitLoss",
    "count_label_tokens",
    "mask_padded_vocab",
    "reduce_head_sums",
    "summarize_losses",
    "vocab_parallel_kl",
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


def _log_softmax(sharded_logits: torch.Tensor, tp_pg: dist.ProcessGroup) -> torch.Tensor:
    """Log-softmax over the whole (TP-sharded) vocabulary; ``-inf`` entries (padding) stay ``-inf``."""
    peak = sharded_logits.amax(dim=-1, keepdim=True)
    if tp_pg.size() > 1:
        dist.all_reduce(peak, op=dist.ReduceOp.MAX, group=tp_pg)
    shifted = sharded_logits - peak
    total = shifted.exp().sum(dim=-1, keepdim=True)
    if tp_pg.size() > 1:
        dist.all_reduce(total, op=dist.ReduceOp.SUM, group=tp_pg)
    return shifted - total.log()


class _VocabParallelKL(torch.autograd.Function):
    """Per-token ``KL(softmax(teacher) || softmax(student))`` over the TP-sharded vocabulary (fp32); the gradient
    reaches the student's logits only: ``softmax(student) - softmax(teacher)``."""

    @staticmethod
    def forward(ctx, student: torch.Tensor, teacher: torch.Tensor, tp_pg: dist.ProcessGroup) -> torch.Tensor:
        log_student = _log_softmax(student, tp_pg)
        log_teacher = _log_softmax(teacher, tp_pg)
        teacher_probs = log_teacher.exp()
        # 0 * log 0 = 0 where the teacher gives no mass (vocabulary padding)
        terms = torch.where(teacher_probs > 0, teacher_probs * (log_teacher - log_student), 0.0)
        kl = terms.sum(dim=-1)
        if tp_pg.size() > 1:
            dist.all_reduce(kl, op=dist.ReduceOp.SUM, group=tp_pg)
        ctx.save_for_backward(log_student.exp() - teacher_probs)
        return kl

    @staticmethod
    def backward(ctx, grad_kl: torch.Tensor) -> tuple[torch.Tensor, None, None]:
        (probs_difference,) = ctx.saved_tensors
        return probs_difference * grad_kl.unsqueeze(-1), None, None


def vocab_parallel_kl(
    sharded_teacher: torch.Tensor, sharded_student: torch.Tensor, labels: torch.Tensor, tp_pg: dist.ProcessGroup,
    vocab_size: int,
) -> torch.Tensor:
    """Per-token ``KL(teacher || student)`` (fp32) of TP-sharded logits ``(batch, seq, vocab_padded / tp)``, ``0``
    where the label is ``IGNORE_INDEX`` (the tokens cross-entropy counts); padding vocabulary entries masked."""
    tp_rank = dist.get_rank(tp_pg) if tp_pg.size() > 1 else 0
    student = mask_padded_vocab(sharded_student.float(), vocab_size, tp_rank)
    teacher = mask_padded_vocab(sharded_teacher.detach().float(), vocab_size, tp_rank)
    return _VocabParallelKL.apply(student, teacher, tp_pg) * (labels != IGNORE_INDEX)


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
        self.captured_logits: dict[int, list[torch.Tensor]] | None = None

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

    def take_sums(self, device: torch.device | str = "cpu") -> torch.Tensor:
        """The accumulated per-head token-loss sums (float64 on ``device``, length ``num_exits + 1``; zeros for
        heads on other ranks), then reset."""
        sums = torch.zeros(self.num_exits + 1, dtype=torch.float64, device=device)
        for head, value in enumerate(self._sums):
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

    def exit_backward_loss(self, loss: torch.Tensor) -> torch.Tensor:
        """An exit's micro-batch loss as registered for backward: divided by the micro-batch count, as nanotron's
        engine does for the final head's loss."""
        return loss / self.num_micro_batches

    def capture(self, head: int, logits: torch.Tensor) -> None:
        """Keep a head's full (TP-gathered, unpadded) logits when :attr:`captured_logits` is a dict (tests)."""
        if self.captured_logits is not None:
            self.captured_logits.setdefault(head, []).append(logits.detach().cpu())


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
