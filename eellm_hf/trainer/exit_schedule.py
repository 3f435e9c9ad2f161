"""EE-LLM's two pipeline-schedule optimisations for early exits, on nanotron's engines (design notes §3).

**Deferred exit forward** (``train.defer_exit_forward``, EE-LLM figure 3c). Normally a stage computes its exits'
logits and losses in the forward step of a micro-batch, and autograd keeps their activations (the
vocabulary-sized logits first of all) until that micro-batch's backward step, ``P - s`` steps later on stage ``s``
of 1F1B (all ``M`` micro-batches with all-forward-all-backward). With the option, on every stage but the last the
forward step only keeps each exit's *input* (a hidden state the backbone's own graph holds anyway); the exits'
forward runs at the start of the backward step, and its losses join the stage's backward (``L_i^exit + <x_i,
g_i>``, Proposition 3.1). Same operations on the same values: the gradients are those of the plain schedule up to
the order of floating-point sums (tested to 1e-6). The last stage runs each backward right after its forward, so
there is nothing to gain there.

**Bubble filling** (``train.fill_bubbles``, EE-LLM figure 4). In 1F1B, stage ``s`` waits about ``P - 1 - s``
backward steps between its first steady forward and its first backward, while the first gradient travels back. On
the stages up to the last one with exits (``E``, before the last stage) that idle time runs extra micro-batches
that go only as far as stage ``E`` and train only the exits: each stage runs its layers on them without
gradients (stage 0 embeds; the others receive the hidden states from the previous stage with their own message
tag) and passes them on, then runs its exits' forward and backward with the gradient restricted to exit
parameters (:meth:`ParallelEarlyExitGPT.is_exit_parameter`: an exit head tied to the final head belongs to the
backbone and gets none). Their tokens weigh like main tokens (the loss's normaliser is the main batch's label
count), so the exits' gradient becomes that of their summed token losses over main and extra tokens; the main
micro-batches' contribution, and every backbone gradient, is exactly what the plain schedule gives (gradient
clipping's global norm includes the extra exit gradient, so a clipped update differs). The stage's
last forward output goes downstream after this work, so the work must fit the wait: ``bubble_micro_batches``
(null: :func:`predicted_bubble_micro_batches`, the schedule model's count from FLOP estimates) sets how many.

Layout dependence (by the method's nature): which exits take part depends on the stages (exits on the last
stage never do), and the automatic count depends on ``pp`` and the layer split. With the same count and exits
before the last stage, the gradient is the same for every layout (tested). The extra micro-batches run every
layer (no layer dropout). Sequences come from their own shuffled stream (:func:`bubble_batch_indices`), so the
main batches are those of a run without the option.
"""

from __future__ import annotations

import collections
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from .ee_tuning import run_stage_layers
from .nanotron_compat import (
    AllForwardAllBackwardPipelineEngine,
    OneForwardOneBackwardPipelineEngine,
    ParallelContext,
    dist,
)
from .parallel_model import (
    ParallelEarlyExitGPT,
    StageLayout,
    exit_flops_per_token,
    head_flops_per_token,
    layer_flops_per_token,
)

__all__ = [
    "BubbleFiller",
    "DeferredExits",
    "SavedActivationMeter",
    "bubble_batch_indices",
    "bubble_stages_of",
    "make_pipeline_engine",
    "predicted_bubble_micro_batches",
]

_BUBBLE_TAG = 3  # point-to-point tag of the extra micro-batches' hidden states (nanotron uses 0, EE-Tuning 1-2)
_BUBBLE_SEED_OFFSET = 7919  # the extra micro-batches' shuffle stream: seed + this


def bubble_stages_of(layout: StageLayout) -> int:
    """How many leading stages the exit-only micro-batches run on (0: no exit before the last stage)."""
    stages = [layout.stage_of_exit(j) for j in range(len(layout.exit_layers))]
    early = [s for s in stages if s < layout.last_stage]
    return max(early) + 1 if early else 0


def predicted_bubble_micro_batches(config: Any, layout: StageLayout, num_micro_batches: int) -> int:
    """How many exit-only micro-batches fit before the first backward without lengthening the step, by
    :func:`~eellm_hf.trainer.schedule.max_bubble_microbatches` on per-stage FLOPs (backward = 2 x forward)."""
    from .schedule import StageTimes, max_bubble_microbatches

    layer, head = layer_flops_per_token(config), head_flops_per_token(config)
    exits = [0.0] * layout.num_stages
    for j in range(len(layout.exit_layers)):
        exits[layout.stage_of_exit(j)] += exit_flops_per_token(config)
    stages = []
    for s, count in enumerate(layout.layer_split):
        final = head if s == layout.last_stage else 0.0
        stages.append(StageTimes(count * layer, 2 * count * layer, exits[s], 2 * exits[s], final, 2 * final))
    return max_bubble_microbatches(stages, num_micro_batches)


def bubble_batch_indices(step: int, size: int, num_sequences: int, seed: int) -> np.ndarray:
    """Row indices of step ``step``'s ``size`` exit-only sequences: their own shuffled stream of epochs."""
    from .data import global_batch_indices

    return global_batch_indices(step, size, num_sequences, seed=seed + _BUBBLE_SEED_OFFSET)


class DeferredExits:
    """One stage's exits, their forward deferred to the backward step. While installed as the model's
    ``exit_interceptor`` (during a batch of the pipeline engine), each forward step keeps its exits' inputs;
    :meth:`losses` runs them for the oldest micro-batch, as the engine's backward steps go oldest first."""

    def __init__(self, model: ParallelEarlyExitGPT) -> None:
        self.model = model
        self.pending: collections.deque[list[tuple[int, torch.Tensor, torch.Tensor]]] = collections.deque()

    def new_micro_batch(self) -> None:
        self.pending.append([])

    def intercept(self, exit_index: int, hidden_states: Any, labels: Any) -> bool:
        if not isinstance(hidden_states, torch.Tensor) or not self.pending:  # another stage's exit
            return False
        self.pending[-1].append((exit_index, hidden_states, labels))
        return True

    def losses(self) -> list[torch.Tensor]:
        """The oldest micro-batch's exit losses, as registered for backward (normalised as in the forward)."""
        model, losses = self.model, []
        for j, hidden_states, labels in self.pending.popleft():
            exit_hidden = model.model.exits[j].pp_block(hidden_states)
            loss = model.exit_lm_heads[j].pp_block(exit_hidden, labels)["loss"]
            losses.append(model.loss.exit_backward_loss(loss))
        return losses


class BubbleFiller:
    """One stage's part of the exit-only micro-batches (a stage before :func:`bubble_stages_of`)."""

    def __init__(self, model: ParallelEarlyExitGPT, parallel_context: ParallelContext, stages: int) -> None:
        self.model = model
        self.pp_pg = parallel_context.pp_pg
        self.stage = dist.get_rank(self.pp_pg)
        self.stages = stages
        self.dtype = next(model.parameters()).dtype
        layout = model.layout
        self.local_exits = [j for j in range(len(layout.exit_layers)) if layout.stage_of_exit(j) == self.stage]
        seen: set[int] = set()
        self.exit_parameters = []
        for name, param in model.hf_named_parameters().items():
            if model.is_exit_parameter(name) and param.requires_grad and id(param) not in seen:
                seen.add(id(param))
                self.exit_parameters.append(param)
        self.micro_batches: Sequence[dict[str, torch.Tensor]] = ()

    def _peer(self, stage: int) -> int:
        return dist.get_global_rank(self.pp_pg, stage)

    def run(self) -> None:
        """Backbone forwards of every extra micro-batch (each passed on at once), then their exits' forward and
        backward (gradients of exit parameters only)."""
        sends, exit_inputs = [], []
        for micro_batch in self.micro_batches:
            with torch.no_grad():
                input_ids = micro_batch["input_ids"]
                if self.stage == 0:
                    hidden = self.model.model.embed_tokens.pp_block(input_ids)
                else:
                    hidden = torch.empty(*input_ids.shape, self.model.config.hidden_size, dtype=self.dtype,
                                         device=input_ids.device)
                    dist.recv(hidden, src=self._peer(self.stage - 1), group=self.pp_pg, tag=_BUBBLE_TAG)
                hidden, inputs = run_stage_layers(self.model, self.stage, hidden)
            if self.stage < self.stages - 1:
                sends.append((dist.isend(hidden, dst=self._peer(self.stage + 1), group=self.pp_pg,
                                         tag=_BUBBLE_TAG), hidden))
            exit_inputs.append(inputs)
        if self.local_exits:
            with self.model.loss.recording_bubble_sums():
                for micro_batch, inputs in zip(self.micro_batches, exit_inputs):
                    self._train_exits(inputs, micro_batch["labels"])
        for work, _ in sends:
            work.wait()

    def _train_exits(self, exit_inputs: dict[int, torch.Tensor], labels: torch.Tensor) -> None:
        model, losses = self.model, []
        for j in self.local_exits:
            exit_hidden = model.model.exits[j].pp_block(exit_inputs[j])
            losses.append(model.exit_lm_heads[j].pp_block(exit_hidden, labels)["loss"])
        total = model.loss.exit_backward_loss(sum(losses))
        if total.requires_grad and self.exit_parameters:
            torch.autograd.backward(total, inputs=self.exit_parameters)


class _ExitScheduleMixin:
    """Hooks of a nanotron pipeline engine: deferred exits in the forward and backward steps, bubble work at the
    start of the first backward step (the wait for the first gradient)."""

    def __init__(self, model: ParallelEarlyExitGPT, deferred: DeferredExits | None,
                 bubbles: BubbleFiller | None) -> None:
        super().__init__()
        self.model, self.deferred, self.bubbles = model, deferred, bubbles
        self._bubbles_done = True

    def train_batch_iter(self, model: Any, pg: Any, batch: Any, nb_microbatches: int, grad_accumulator: Any) -> Any:
        self._bubbles_done = self.bubbles is None or not self.bubbles.micro_batches
        if self.deferred is not None:
            self.model.exit_interceptor = self.deferred.intercept
        try:
            return super().train_batch_iter(model=model, pg=pg, batch=batch, nb_microbatches=nb_microbatches,
                                            grad_accumulator=grad_accumulator)
        finally:
            self.model.exit_interceptor = None
            if self.deferred is not None:
                self.deferred.pending.clear()

    def forward(self, context: Any, state: Any, micro_batch: Any, model: Any) -> Any:
        if self.deferred is not None:
            self.deferred.new_micro_batch()
        return super().forward(context=context, state=state, micro_batch=micro_batch, model=model)

    def backward(self, context: Any, state: Any, grad_accumulator: Any) -> None:
        if not self._bubbles_done:
            self._bubbles_done = True
            self.bubbles.run()
        if self.deferred is not None:
            # the engine pops the oldest micro-batch's list of activations requiring backward next
            state.microbatches_activations_requiring_backward[0].extend(self.deferred.losses())
        super().backward(context=context, state=state, grad_accumulator=grad_accumulator)


class ExitSchedule1F1BEngine(_ExitScheduleMixin, OneForwardOneBackwardPipelineEngine):
    """nanotron's 1F1B engine with the exit schedules."""


class ExitScheduleAFABEngine(_ExitScheduleMixin, AllForwardAllBackwardPipelineEngine):
    """nanotron's all-forward-all-backward engine with deferred exits."""


def make_pipeline_engine(model: ParallelEarlyExitGPT, parallel_context: ParallelContext, train: Any,
                         pp_engine: str = "1f1b") -> tuple[Any, BubbleFiller | None, int]:
    """The pipeline engine for ``train``'s options: ``(engine, bubble filler of this stage or None, extra
    micro-batches per step and DP rank)``. Without either option, nanotron's own engine."""
    layout, stage = model.layout, dist.get_rank(parallel_context.pp_pg)
    defer = bool(getattr(train, "defer_exit_forward", False))
    fill = bool(getattr(train, "fill_bubbles", False))
    for name, value in (("defer_exit_forward", defer), ("fill_bubbles", fill)):
        if value and layout.num_stages == 1:
            raise ValueError(f"train.{name} needs pipeline parallelism (pp > 1), got pp=1")
    count, stages = 0, bubble_stages_of(layout)
    if fill:
        if pp_engine != "1f1b":
            raise ValueError(f"train.fill_bubbles needs the 1f1b pipeline engine, got {pp_engine!r}")
        if stages == 0:
            raise ValueError(f"train.fill_bubbles: no exit (layers {list(layout.exit_layers)}) sits before the last "
                             f"pipeline stage of the layer split {list(layout.layer_split)}")
        count = train.bubble_micro_batches
        if count is None:
            count = predicted_bubble_micro_batches(model.config, layout, train.num_micro_batches(
                parallel_context.dp_pg.size()))
    if not defer and not count:
        return (AllForwardAllBackwardPipelineEngine() if pp_engine == "afab"
                else OneForwardOneBackwardPipelineEngine()), None, 0
    has_exits = any(layout.stage_of_exit(j) == stage for j in range(len(layout.exit_layers)))
    deferred = DeferredExits(model) if defer and has_exits and stage != layout.last_stage else None
    bubbles = BubbleFiller(model, parallel_context, stages) if count and stage < stages else None
    engine_class = ExitScheduleAFABEngine if pp_engine == "afab" else ExitSchedule1F1BEngine
    return engine_class(model, deferred, bubbles), bubbles, count


class _SavedTensor:
    __slots__ = ("meter", "key", "tensor")

    def __init__(self, meter: SavedActivationMeter, key: int, tensor: torch.Tensor) -> None:
        self.meter, self.key, self.tensor = meter, key, tensor

    def __del__(self) -> None:
        self.meter._release(self.key)


class SavedActivationMeter:
    """Bytes of the tensors autograd keeps for backward (storages counted once; ``exclude``: e.g. the
    parameters, which live anyway), current and peak, through ``torch.autograd.graph.saved_tensors_hooks``: the
    activation memory that :class:`DeferredExits` saves, measured exactly rather than through the allocator."""

    def __init__(self, exclude: Sequence[torch.Tensor] = ()) -> None:
        self._excluded = {t.untyped_storage().data_ptr() for t in exclude}
        self._live: dict[int, list[int]] = {}  # storage pointer -> [bytes, references]
        self.current = self.peak = 0
        self._hooks = torch.autograd.graph.saved_tensors_hooks(self._pack, self._unpack)

    def __enter__(self) -> SavedActivationMeter:
        self._hooks.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        self._hooks.__exit__(*exc)

    def _pack(self, tensor: torch.Tensor) -> Any:
        storage = tensor.untyped_storage()
        key = storage.data_ptr()
        if key in self._excluded or storage.nbytes() == 0:
            return tensor
        entry = self._live.setdefault(key, [storage.nbytes(), 0])
        if entry[1] == 0:
            self.current += entry[0]
            self.peak = max(self.peak, self.current)
        entry[1] += 1
        return _SavedTensor(self, key, tensor)

    @staticmethod
    def _unpack(saved: Any) -> torch.Tensor:
        return saved.tensor if isinstance(saved, _SavedTensor) else saved

    def _release(self, key: int) -> None:
        entry = self._live.get(key)
        if entry is not None:
            entry[1] -= 1
            if entry[1] == 0:
                self.current -= entry[0]
                del self._live[key]
