"""The vocabulary-parallel modules of the parallel model: the input embedding, and the heads, each a vocabulary
projection with its loss (so that vocabulary-sized logits never leave the stage and TP rank that computes them).

The vocabulary is padded to a multiple of ``tp`` (``parallel_model.padded_vocab_size``); the padding entries get
``-inf`` logits (see :mod:`.loss`).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from .exit_shortlist import ShortlistShard
from .loss import (
    MultiExitLoss,
    TeacherTargets,
    distillation_token_losses,
    gate_token_losses,
    mask_padded_vocab,
    shortlist_token_losses,
    vocab_parallel_argmax,
    vocab_parallel_token_losses,
)
from .nanotron_compat import (
    PipelineBlock,
    PipelineTrainBatchState,
    TensorParallelColumnLinear,
    TensorParallelEmbedding,
    TensorParallelLinearMode,
    TensorPointer,
    differentiable_identity,
    dist,
)

__all__ = ["TP_MODE", "ExitHeadBlock", "VocabParallelEmbedding", "VocabParallelHead"]

TP_MODE = TensorParallelLinearMode.ALL_REDUCE
"""nanotron's tensor-parallel mode of every TP module (its async mode is broken in 0.4, see the design notes)."""


class VocabParallelEmbedding(TensorParallelEmbedding):
    """nanotron's vocabulary-parallel embedding over the padded vocabulary; ``padding_idx`` rows get no gradient
    from lookups (as ``nn.Embedding(padding_idx=...)``)."""

    def __init__(self, padded_vocab: int, hidden_size: int, tp_pg: dist.ProcessGroup, padding_idx: int | None,
                 device: torch.device | None = None) -> None:
        super().__init__(padded_vocab, hidden_size, pg=tp_pg, mode=TP_MODE, device=device)
        self.pad_id = padding_idx

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        out = super().forward(input_ids)
        if self.pad_id is not None and self.training:
            out = torch.where((input_ids == self.pad_id)[..., None], out.detach(), out)
        return out


class VocabParallelHead(TensorParallelColumnLinear):
    """A vocabulary projection (column-parallel over the padded vocabulary) and its cross-entropy.

    ``head``: exit index, or ``loss.final_index`` for the final head. Exit logits are divided by the loss's
    temperature in training mode. With a ``teacher`` (the final head's distribution) and the loss's
    ``distillation`` weight w > 0, an exit's token losses are ``w * KL(teacher || exit) + (1 - w) * CE``. With
    ``gate_logits`` (the exit's confidence gate) and a teacher, the gate's loss (:func:`gate_token_losses`) is
    added to the returned loss. An exit with a vocabulary ``shortlist`` (``config.exit_vocab``) projects onto its
    shortlisted rows only (:class:`ShortlistShard`), against a teacher restricted to them.
    """

    def __init__(self, hidden_size: int, padded_vocab: int, vocab_size: int, tp_pg: dist.ProcessGroup,
                 loss: MultiExitLoss, head: int, device: torch.device | None = None,
                 shortlist: list[int] | None = None) -> None:
        super().__init__(hidden_size, padded_vocab, pg=tp_pg, mode=TP_MODE, bias=False, device=device)
        self.vocab_size = vocab_size
        self.loss = loss
        self.head = head
        tp = tp_pg.size()
        self.shortlist = None if shortlist is None else ShortlistShard.of(
            shortlist, padded_vocab // tp, dist.get_rank(tp_pg) if tp > 1 else 0, tp, device)

    def sharded_logits(self, hidden_states: torch.Tensor) -> torch.Tensor:
        """This TP rank's shard of the logits (padded vocabulary entries not masked); with a shortlist, its
        shortlisted columns only."""
        if self.shortlist is None:
            return super().forward(hidden_states)
        # as nanotron's column-parallel linear in ALL_REDUCE mode: the input's gradient is summed over TP ranks
        rows = self.weight.index_select(0, self.shortlist.rows)
        return F.linear(differentiable_identity(hidden_states, group=self.pg), rows)

    def forward(self, hidden_states: torch.Tensor, labels: torch.Tensor,
                teacher: TeacherTargets | None = None,
                gate_logits: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        sharded_logits = self.sharded_logits(hidden_states)
        is_exit = self.head != self.loss.final_index
        if is_exit and self.training and self.loss.temperature != 1.0:
            sharded_logits = sharded_logits / self.loss.temperature
        weight = self.loss.distillation
        distilled = is_exit and teacher is not None and weight > 0.0
        if self.shortlist is not None:
            shortlist, weight = self.shortlist, weight if distilled else 0.0
            token_losses = shortlist_token_losses(sharded_logits, teacher, shortlist.label_columns(labels), labels,
                                                  shortlist.listed_labels(labels), self.pg, weight)
        elif distilled:
            token_losses = distillation_token_losses(sharded_logits, teacher, labels, self.pg, self.vocab_size,
                                                     weight)
        else:
            token_losses = vocab_parallel_token_losses(sharded_logits, labels, self.pg, self.vocab_size)
        loss = self.loss.head_loss(self.head, token_losses)
        if is_exit and gate_logits is not None and teacher is not None:
            loss = loss + self.loss.gate_loss(self.head, gate_token_losses(gate_logits, self._top(sharded_logits),
                                                                           teacher.top, labels))
        if not is_exit and torch.is_grad_enabled() and not loss.requires_grad:
            # Frozen final head (EE-Tuning): nanotron's engine needs a loss that requires grad.
            loss = loss + torch.zeros((), device=loss.device, requires_grad=True)
        return {"loss": loss}

    def _top(self, sharded_logits: torch.Tensor) -> torch.Tensor:
        """This head's greedy token (global vocabulary id) from its sharded logits."""
        if self.shortlist is not None:
            return vocab_parallel_argmax(sharded_logits.detach(), self.pg, self.shortlist.ids)
        masked = mask_padded_vocab(sharded_logits.detach(), self.vocab_size, dist.get_rank(self.pg))
        return vocab_parallel_argmax(masked, self.pg)


class ExitHeadBlock(PipelineBlock):
    """The ``PipelineBlock`` of an exit head: in training, registers the exit's loss (divided by the micro-batch
    count) in the stage's list of activations requiring backward, so it joins this stage's backward pass."""

    def forward(self, **kwargs: Any) -> dict[str, torch.Tensor | TensorPointer]:
        output = super().forward(**kwargs)
        loss = output["loss"]
        if isinstance(self.pipeline_state, PipelineTrainBatchState) and isinstance(loss, torch.Tensor):
            if loss.requires_grad:
                self.pipeline_state.register_activation_requiring_backward(self.pp_block.loss.exit_backward_loss(loss))
        return output
