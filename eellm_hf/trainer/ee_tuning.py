"""EE-Tuning's training step: a frozen backbone runs forward only, and only the exits are trained.

With the backbone frozen (``train.freeze_backbone``), nothing that depends on a stage's output needs a gradient
from a later stage, so the pipeline needs no backward pass at all. :class:`FrozenBackboneStep` therefore bypasses
nanotron's pipeline engine and runs, on every rank:

1. the backbone forward of each micro-batch under ``torch.no_grad`` (hidden states sent stage to stage with
   non-blocking point-to-point sends), keeping the input of each exit on this stage;
2. on the last stage, the final head (its loss is logged; with ``train.exit_distillation`` or exit gates its
   logits are the teacher of the exits' distillation and the target of their gates, and are sent, TP shard by TP
   shard, to the stages that hold exits: one message a micro-batch for all of a stage's exits; with exit
   shortlists, ``config.exit_vocab``, only the shortlist's columns and the greedy token travel);
3. each exit's forward and backward, from its saved input (and teacher), micro-batch by micro-batch.

The losses and their normalisation are those of :class:`~eellm_hf.trainer.loss.MultiExitLoss`, so a step gives
exactly the gradients of the nanotron-engine path (and of single-process training), whatever the layout. Only
the exits' activations are ever kept for backward, and no stage waits for a gradient.

Across steps (``train.prefetch_next_step``, pp > 1): the last stage cannot start a step before the first micro-batch
has crossed the stages before it, and those stages idle at the end of a step while the last one finishes its
micro-batches and exits. The frozen backbone's output does not depend on the exits' update, so every stage but
the last runs the *next* step's first micro-batch right after this step's backbone forwards, before its exits;
the next step then starts with that micro-batch already on its way to the last stage. Only the order of the
work changes, not its result.

With ``train.autocast`` the forward passes (backbone, final head, exits) run under ``torch.autocast`` and the
backward outside it, as PyTorch recommends; the weights stay in their own dtype, so hidden states between stages
keep it (a residual stream in fp32 stays fp32) while the teacher logits, a bf16 matmul's output, travel in bf16.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Sequence
from typing import Any

import torch

from .exit_shortlist import ShortlistShard
from .loss import TeacherTargets, teacher_top, vocab_parallel_token_losses
from .nanotron_compat import ParallelContext, dist
from .parallel_model import ParallelEarlyExitGPT

__all__ = ["FrozenBackboneStep", "run_stage_layers"]

_HIDDEN_TAG, _TEACHER_TAG, _TEACHER_TOP_TAG = 1, 2, 3

Teacher = tuple[torch.Tensor, ...]
"""What the last stage keeps and sends of the final head per micro-batch: its TP shard of the logits; with
exit shortlists, only their columns and the greedy token over the whole vocabulary."""


def run_stage_layers(model: ParallelEarlyExitGPT, stage: int, hidden: torch.Tensor,
                     layer_keep: torch.Tensor | None = None) -> tuple[torch.Tensor, dict[int, torch.Tensor]]:
    """Stage ``stage``'s decoder layers on ``hidden`` (its input), outside nanotron's pipeline blocks: the
    stage's output and the input of each of its exits (by exit index)."""
    exit_inputs = {}
    for number, layer in enumerate(model.model.layers, start=1):
        if layer.rank != stage:
            continue
        keep = None if layer_keep is None else layer_keep[:, number - 1]
        hidden = layer.pp_block(hidden, keep=keep)
        for j in model.exits_after.get(number, ()):
            exit_inputs[j] = hidden
    return hidden, exit_inputs


@dataclasses.dataclass
class _Prefetched:
    """The next step's first micro-batch, as far as this stage took it in the current step: its exit inputs
    (None on the last stage, which has not received it yet) and its pending sends."""

    micro_batch: dict[str, torch.Tensor]
    exit_inputs: dict[int, torch.Tensor] | None
    sends: list[tuple[dist.Work, torch.Tensor]] = dataclasses.field(default_factory=list)


class FrozenBackboneStep:
    """One rank's part of an EE-Tuning step over its data-parallel rank's micro-batches."""

    def __init__(self, model: ParallelEarlyExitGPT, parallel_context: ParallelContext,
                 autocast: torch.dtype | None = None) -> None:
        self.model = model
        self.dtype = next(model.parameters()).dtype
        self.autocast = autocast
        self.teacher_dtype = autocast or self.dtype
        self.device_type = parallel_context.device.type
        self.pp_pg, self.tp_pg = parallel_context.pp_pg, parallel_context.tp_pg
        tp, shard = self.tp_pg.size(), model.padded_vocab // self.tp_pg.size()  # the final head's TP shard
        shortlist = model.config.exit_vocab
        self.shortlist = None if shortlist is None else ShortlistShard.of(
            shortlist, shard, dist.get_rank(self.tp_pg) if tp > 1 else 0, tp, parallel_context.device)
        self.teacher_width = shard if self.shortlist is None else self.shortlist.rows.numel()
        self.stage = dist.get_rank(self.pp_pg)
        self.last_stage = model.layout.last_stage
        self.local_exits = [j for j in range(len(model.layout.exit_layers))
                            if model.layout.stage_of_exit(j) == self.stage]
        # stages (other than the last) whose exits need the final head's logits as teacher
        self.teacher_stages = sorted({model.layout.stage_of_exit(j) for j in range(len(model.layout.exit_layers))}
                                     - {self.last_stage})
        self._prefetched: _Prefetched | None = None  # the next step's first micro-batch, started in this one

    def _autocast(self) -> contextlib.AbstractContextManager:
        if self.autocast is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device_type, dtype=self.autocast)

    def _peer(self, stage: int) -> int:
        return dist.get_global_rank(self.pp_pg, stage)

    def run(self, micro_batches: Sequence[dict[str, torch.Tensor]], grad_accumulator: Any = None,
            next_first: dict[str, torch.Tensor] | None = None) -> None:
        """Accumulate the exits' gradients of these micro-batches (the loss's step must have begun);
        ``grad_accumulator``: nanotron's fp32 gradient accumulator of a low-precision model, if any;
        ``next_first`` (``train.prefetch_next_step``): the next step's first micro-batch, whose backbone forward the
        stages before the last run in this step (the same on every rank of the step's pipeline)."""
        # the final head's distribution: the teacher of distillation and the target of the exits' gates
        needs_teacher = self.model.loss.distillation > 0.0 or bool(getattr(self.model.config, "exit_gate", False))
        sends: list[tuple[dist.Work, torch.Tensor]] = []
        exit_inputs, teachers = [], []
        for index, micro_batch in enumerate(micro_batches):
            ahead = self._take_prefetched(sends) if index == 0 else None
            if ahead is not None:
                inputs, teacher = ahead, None
            else:
                with self._autocast():
                    inputs, teacher = self._backbone_forward(micro_batch, needs_teacher, sends)
            exit_inputs.append(inputs)
            teachers.append(teacher)
        if next_first is not None:
            self._prefetch(next_first)
        for index, micro_batch in enumerate(micro_batches):
            teacher = teachers[index]
            if needs_teacher and self.local_exits and teacher is None:
                teacher = self._receive_teacher(micro_batch["labels"])
            if teacher is not None:  # once per micro-batch, for every exit of this stage
                teacher = self._teacher_targets(teacher)
            with self._autocast():
                losses = [self._exit_loss(j, exit_inputs[index][j], micro_batch["labels"], teacher)
                          for j in self.local_exits]
            losses = [loss for loss in losses if loss.requires_grad]
            if losses:  # one backward per micro-batch, as nanotron's engine does
                total = self.model.loss.exit_backward_loss(sum(losses))
                if grad_accumulator is None:
                    total.backward()
                else:
                    grad_accumulator.backward(total)
            teachers[index] = None  # free the teacher as soon as this stage's exits are done with it
        for work, _ in sends:
            work.wait()

    @property
    def has_prefetched(self) -> bool:
        """Whether the next step's first micro-batch was started (``run(..., next_first=...)``)."""
        return self._prefetched is not None

    def _prefetch(self, micro_batch: dict[str, torch.Tensor]) -> None:
        """The next step's first micro-batch through this stage's layers (stages before the last; the last
        stage only remembers it: it receives it in the next step, as any other). Its sends are received, and
        waited for, in the next step."""
        inputs, sends = None, []
        if self.stage != self.last_stage:
            with self._autocast():
                inputs, _ = self._backbone_forward(micro_batch, False, sends)
        self._prefetched = _Prefetched(micro_batch, inputs, sends)

    def continues_with(self, micro_batch: dict[str, torch.Tensor]) -> bool:
        """Whether a step starting with ``micro_batch`` may run: nothing was prefetched, or exactly it."""
        prefetched = self._prefetched
        return prefetched is None or (prefetched.micro_batch.keys() == micro_batch.keys() and all(
            torch.equal(micro_batch[key], value) for key, value in prefetched.micro_batch.items()))

    def _take_prefetched(self, sends: list[tuple[dist.Work, torch.Tensor]]) -> dict[int, torch.Tensor] | None:
        """This step's first micro-batch as the previous step started it (the caller checked it with
        :meth:`continues_with`): its exit inputs (None if it was not started, or on the last stage, which runs it
        now as any other); its send, still pending, is waited for with this step's."""
        prefetched, self._prefetched = self._prefetched, None
        if prefetched is None:
            return None
        sends.extend(prefetched.sends)
        return prefetched.exit_inputs

    def discard_prefetched(self) -> None:
        """Complete the prefetched micro-batch's transfers and drop it, when no step follows after all (every rank
        of the pipeline calls it): the last stage receives it (the stages between did in :meth:`_prefetch`), and
        the senders wait for their sends."""
        prefetched, self._prefetched = self._prefetched, None
        if prefetched is None:
            return
        if self.stage == self.last_stage and self.stage > 0:
            hidden = self._empty(prefetched.micro_batch["input_ids"], self.model.config.hidden_size)
            dist.recv(hidden, src=self._peer(self.stage - 1), group=self.pp_pg, tag=_HIDDEN_TAG)
        for work, _ in prefetched.sends:
            work.wait()

    @torch.no_grad()
    def _backbone_forward(self, micro_batch: dict[str, torch.Tensor], needs_teacher: bool,
                          sends: list[tuple[dist.Work, torch.Tensor]]
                          ) -> tuple[dict[int, torch.Tensor], Teacher | None]:
        """This stage's layers on one micro-batch: the inputs of its exits, and (last stage, ``needs_teacher``) the
        teacher kept for its own exits."""
        model, stage = self.model, self.stage
        backbone = model.model
        input_ids, layer_keep = micro_batch["input_ids"], micro_batch.get("layer_keep")
        if stage == 0:
            hidden = backbone.embed_tokens.pp_block(input_ids)
        else:
            hidden = self._empty(input_ids, model.config.hidden_size)
            dist.recv(hidden, src=self._peer(stage - 1), group=self.pp_pg, tag=_HIDDEN_TAG)
        hidden, exit_inputs = run_stage_layers(model, stage, hidden, layer_keep)
        if stage != self.last_stage:
            hidden = hidden.to(self.dtype).contiguous()
            sends.append((dist.isend(hidden, dst=self._peer(stage + 1), group=self.pp_pg, tag=_HIDDEN_TAG),
                          hidden))
            return exit_inputs, None
        head = model.lm_head.pp_block
        logits = head.sharded_logits(backbone.norm.pp_block(hidden))
        labels = micro_batch["labels"]
        model.loss.head_loss(model.loss.final_index,
                             vocab_parallel_token_losses(logits, labels, head.pg, head.vocab_size))
        if not needs_teacher:
            return exit_inputs, None
        if self.shortlist is None:
            teacher = (logits.to(self.teacher_dtype).contiguous(),)
        else:  # the exits need the shortlist's columns and the greedy token only
            teacher = (logits[..., self.shortlist.rows].to(self.teacher_dtype).contiguous(),
                       teacher_top(logits, self.tp_pg, model.config.vocab_size).contiguous())
        for target in self.teacher_stages:
            for tag, tensor in zip((_TEACHER_TAG, _TEACHER_TOP_TAG), teacher):
                sends.append((dist.isend(tensor, dst=self._peer(target), group=self.pp_pg, tag=tag), tensor))
        return exit_inputs, teacher if self.local_exits else None

    def _receive_teacher(self, labels: torch.Tensor) -> Teacher:
        teacher = [self._empty(labels, self.teacher_width, self.teacher_dtype)]
        if self.shortlist is not None:
            teacher.append(torch.empty_like(labels))
        for tag, tensor in zip((_TEACHER_TAG, _TEACHER_TOP_TAG), teacher):
            dist.recv(tensor, src=self._peer(self.last_stage), group=self.pp_pg, tag=tag)
        return tuple(teacher)

    def _teacher_targets(self, teacher: Teacher) -> TeacherTargets:
        if self.shortlist is None:
            return TeacherTargets.from_logits(teacher[0], self.tp_pg, self.model.config.vocab_size)
        return TeacherTargets.from_shortlist(teacher[0], teacher[1], self.tp_pg)

    def _exit_loss(self, exit_index: int, exit_input: torch.Tensor, labels: torch.Tensor,
                   teacher: TeacherTargets | None) -> torch.Tensor:
        model = self.model
        exit_module = model.model.exits[exit_index].pp_block
        hidden, gate_input = exit_module.output_and_gate_input(exit_input)
        gate_logits = exit_module.gate_logit(gate_input) if gate_input is not None else None
        head = model.exit_lm_heads[exit_index].pp_block
        return head(hidden, labels, teacher=teacher, gate_logits=gate_logits)["loss"]

    def _empty(self, like_ids: torch.Tensor, width: int, dtype: torch.dtype | None = None) -> torch.Tensor:
        """A receive buffer of shape ``(*like_ids.shape, width)`` in ``dtype`` (default: the model's)."""
        return torch.empty(*like_ids.shape, width, dtype=dtype or self.dtype, device=like_ids.device)
