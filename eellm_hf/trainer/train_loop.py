"""The training loop: nanotron's pipeline engine over micro-batches, DP gradient sync, (ZeRO-1) AdamW.

:class:`ParallelTrainer` is one training process's view of the job (model shard, optimizer, engine); it takes
*global* batches, so the same config with another ``parallelism`` section trains the same model: every layout
sees the same sequences at each step, each DP rank takes its contiguous block of the global batch and splits it
into micro-batches, gradients are summed over DP ranks, and the losses are token means over the whole global
batch (:mod:`.loss`). :func:`.training_run.run` adds data, validation, metrics, checkpoints and the HF export
around it.

Faults: a step whose loss (any head's) or gradient norm is not finite on any rank takes no optimizer update
(:attr:`StepResult.finite`); :func:`.training_run.run` then stops with :class:`NonFiniteTrainingError` or skips it.

Precision: fp32 everywhere on CPU; with ``train.dtype: bfloat16`` the model runs in bf16 and nanotron's
``FP32GradientAccumulator`` keeps fp32 master weights and gradients (on GPUs; also tested on CPU with the shipped
GPU configs shrunk, ZeRO-1 and tp=2 included). EE-Tuning may instead keep fp32 weights and run its forward
passes under ``torch.autocast`` (``train.autocast: bfloat16``, :mod:`.ee_tuning`).
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors

from ..dtypes import DTYPES
from .ee_tuning import FrozenBackboneStep
from .exit_schedule import bubble_batch_indices, bubble_stages_of, make_pipeline_engine
from .layer_dropout import layer_keep_mask
from .loss import count_label_tokens, reduce_head_sums, summarize_losses
from .nanotron_compat import (
    NamedOptimizer,
    OptimizerFromGradientAccumulator,
    ParallelContext,
    PipelineEvalBatchState,
    ZeroDistributedOptimizer,
    clip_grad_norm,
    dist,
    make_fp32_grad_accumulator,
    named_params_with_correct_tied,
    reset_pipeline_state,
    sync_tied_weights_gradients,
)
from .parallel_model import ParallelEarlyExitGPT, make_layout
from .weights import init_from_hf, initialize_weights

if TYPE_CHECKING:
    from .config import TrainConfig

__all__ = ["NonFiniteTrainingError", "ParallelTrainer", "StepResult", "forward_only"]


@dataclasses.dataclass
class StepResult:
    """What one optimizer step did (identical on every rank)."""

    step: int
    loss: float
    exit_losses: list[float]  # unweighted token means: exits in exit_layers order, then the final head
    exit_weights: list[float]
    lr: float
    grad_norm: float
    num_label_tokens: int
    seconds: float
    finite: bool = True  # False: a loss or the gradient norm was not finite on some rank; no update was made
    gate_losses: list[float] = dataclasses.field(default_factory=list)  # per exit (exit_gate), else empty
    # train.fill_bubbles: label tokens of the exit-only micro-batches, and per exit their token-mean loss (None for
    # exits they do not reach)
    bubble_label_tokens: int = 0
    bubble_exit_losses: list[float | None] = dataclasses.field(default_factory=list)


    def optional_metrics(self) -> dict[str, Any]:
        """The entries of this step's ``metrics.jsonl`` line that only some runs have (gates, exit-only
        micro-batches)."""
        extra: dict[str, Any] = {"gate_losses": self.gate_losses} if self.gate_losses else {}
        if self.bubble_label_tokens:
            extra.update(bubble_exit_losses=self.bubble_exit_losses, bubble_label_tokens=self.bubble_label_tokens)
        return extra


class NonFiniteTrainingError(FloatingPointError):
    """A training step's loss or gradient norm, or the weights about to be saved, were not finite."""


class ParallelTrainer:
    """Model shard, optimizer and pipeline engine of one rank.

    ``model_config``: an ``EarlyExitGPTConfig`` (or an object with its fields). ``train``: the ``train`` section
    of the trainer config. ``init_from``: an HF ``EarlyExitGPTForCausalLM`` folder to start from (else the
    layout-independent initialisation seeded by ``train.seed``).
    """

    def __init__(
        self,
        model_config: Any,
        parallel_context: ParallelContext,
        train: TrainConfig,
        *,
        layer_split: Sequence[int] | None = None,
        pp_engine: str = "1f1b",
        init_from: str | Path | None = None,
    ) -> None:
        self.config = model_config
        self.ctx = parallel_context
        self.train_config = train
        self.device = parallel_context.device
        self.dtype = DTYPES[train.dtype]
        torch.manual_seed(train.seed)
        layout = make_layout(model_config, parallel_context.pipeline_parallel_size, layer_split,
                             frozen_backbone=train.freeze_backbone)
        self.model = ParallelEarlyExitGPT(model_config, parallel_context, layout, dtype=self.dtype, device=self.device)
        if init_from is not None:
            init_from_hf(self.model, init_from)
        else:
            initialize_weights(self.model, train.seed)
        self.frozen_step = None
        if train.freeze_backbone:  # EE-Tuning: forward-only backbone, no pipeline backward (see .ee_tuning)
            self.model.freeze_backbone()
            self.frozen_step = FrozenBackboneStep(self.model, parallel_context,
                                                  autocast=train.autocast and DTYPES[train.autocast])
        # nanotron's engine, or with train.defer_exit_forward / train.fill_bubbles its subclass (.exit_schedule)
        self.engine, self.bubbles, self.bubble_micro_batches = make_pipeline_engine(
            self.model, parallel_context, train, pp_engine)
        self.named_trainable = [(n, p) for n, p in named_params_with_correct_tied(self.model) if p.requires_grad]
        self.grad_accumulator = None
        self.optimizer = self._build_optimizer()

    # -- optimizer -------------------------------------------------------------------------------------------

    def _build_optimizer(self) -> Any:
        train, named = self.train_config, self.named_trainable
        if not named:  # e.g. EE-Tuning stages without exits
            return None

        zero = train.zero_stage == 1 and self.ctx.dp_pg.size() > 1
        # ZeRO hands the optimizer flat slices (nanotron's SlicedFlatTensor): per-tensor AdamW there, fused else.
        kernel = {"foreach": False} if zero else {"fused": True}

        def adamw(groups: Any) -> NamedOptimizer:
            return NamedOptimizer(groups, lambda param_groups: torch.optim.AdamW(
                param_groups, lr=train.lr, betas=(train.adam_beta1, train.adam_beta2), eps=train.adam_eps,
                weight_decay=train.weight_decay, **kernel))

        def fp32_master(groups: Any) -> OptimizerFromGradientAccumulator:
            """Low-precision model: AdamW on nanotron's fp32 master weights and fp32 gradient buffers."""
            optimizer = OptimizerFromGradientAccumulator(
                gradient_accumulator_builder=lambda params: make_fp32_grad_accumulator(
                    params, grad_buckets_named_params=named, device=self.device),
                named_params_or_groups=groups,
                optimizer_builder=adamw,
            )
            self.grad_accumulator = optimizer.gradient_accumulator
            return optimizer

        builder = adamw if self.dtype == torch.float32 else fp32_master
        if zero:
            optimizer = ZeroDistributedOptimizer(named, builder, dp_pg=self.ctx.dp_pg)
            if self.grad_accumulator is not None:
                self.grad_accumulator.assign_param_offsets(
                    optimizer.param_name_to_dp_rank_offsets, dp_rank=dist.get_rank(self.ctx.dp_pg))
            return optimizer
        return builder(named)

    def set_lr(self, lr: float) -> None:
        if self.optimizer is not None:
            for group in self.optimizer.param_groups:
                group["lr"] = lr

    # -- batches ---------------------------------------------------------------------------------------------

    def _rank_micro_batches(self, input_ids: torch.Tensor, labels: torch.Tensor,
                            layer_keep: torch.Tensor | None = None) -> list[dict[str, torch.Tensor]]:
        """This DP rank's contiguous block of a global batch, split into micro-batches (on the device);
        ``layer_keep`` (layer dropout: ``(batch, num_hidden_layers)`` bool) is split alongside."""
        dp, dp_rank = self.ctx.dp_pg.size(), dist.get_rank(self.ctx.dp_pg)
        mbs = self.train_config.micro_batch_size
        if input_ids.shape[0] % (dp * mbs):
            raise ValueError(f"a batch of {input_ids.shape[0]} sequences does not split into dp={dp} x "
                             f"micro-batches of {mbs}")
        per_rank = input_ids.shape[0] // dp
        start = dp_rank * per_rank
        micro_batches = []
        for i in range(start, start + per_rank, mbs):
            micro_batch = {"input_ids": input_ids[i : i + mbs].to(self.device),
                           "labels": labels[i : i + mbs].to(self.device)}
            if layer_keep is not None:
                micro_batch["layer_keep"] = layer_keep[i : i + mbs].to(self.device)
            micro_batches.append(micro_batch)
        return micro_batches

    # -- training --------------------------------------------------------------------------------------------

    @property
    def bubble_batch_size(self) -> int:
        """Sequences of exit-only micro-batches per step, all DP ranks together (``train.fill_bubbles``)."""
        return self.bubble_micro_batches * self.ctx.dp_pg.size() * self.train_config.micro_batch_size

    def bubble_batch(self, dataset: Any, step: int, seed: int) -> dict[str, torch.Tensor] | None:
        """Step ``step``'s exit-only sequences from ``dataset`` (a ``PackedDataset``; their own shuffled stream),
        or None without ``train.fill_bubbles``."""
        if not self.bubble_micro_batches:
            return None
        return dataset.batch(bubble_batch_indices(step, self.bubble_batch_size, len(dataset), seed))

    @property
    def prefetches(self) -> bool:
        """Whether :meth:`train_step` uses ``next_batch``: EE-Tuning at pp > 1 with ``train.prefetch_next_step``."""
        return (self.frozen_step is not None and self.train_config.prefetch_next_step
                and self.ctx.pipeline_parallel_size > 1)

    def train_step(self, step: int, input_ids: torch.Tensor, labels: torch.Tensor,
                   total_steps: int | None = None, bubble: dict[str, torch.Tensor] | None = None,
                   next_batch: dict[str, torch.Tensor] | None = None) -> StepResult:
        """One optimizer step on a global batch (``(global_batch_size, seq_len)`` tensors, the same on every
        rank). ``step`` is 0-based (learning-rate and exit-weight schedules); ``total_steps``: the length of
        the learning-rate schedule (default ``train.steps``). ``bubble`` (``train.fill_bubbles``): the exit-only
        sequences, ``input_ids`` and ``labels`` of :attr:`bubble_batch_size` rows. ``next_batch`` (used when
        :attr:`prefetches`): the next step's global batch, ``input_ids`` and ``labels``, given only when step
        ``step + 1`` follows this one directly (no validation or checkpoint between), with the same
        ``total_steps``; this step then starts it (see :mod:`.ee_tuning`), and the next call must train on it."""
        train, model, ctx = self.train_config, self.model, self.ctx
        start = time.perf_counter()
        num_tokens, bubble_tokens, weights = self.compute_gradients(step, input_ids, labels, total_steps, bubble,
                                                                    next_batch)
        max_norm = train.grad_clip if train.grad_clip is not None else math.inf
        grad_norm = clip_grad_norm(ctx.mp_pg, self.named_trainable, max_norm=max_norm,
                                   grad_accumulator=self.grad_accumulator, device=self.device)
        lr = train.lr_at(step, total_steps)
        self.set_lr(lr)
        bubble_sums = reduce_head_sums(model.loss.take_bubble_sums(self.device), [ctx.pp_pg, ctx.dp_pg]).cpu()
        sums = reduce_head_sums(model.loss.take_sums(self.device), [ctx.pp_pg, ctx.dp_pg]).cpu()
        heads = model.loss.num_exits + 1
        loss, per_head = summarize_losses(sums[:heads], num_tokens, weights)
        has_gates = getattr(self.config, "exit_gate", False)
        gate_losses = [float(x) / max(num_tokens, 1) for x in sums[heads:]] if has_gates else []
        finite = self._all_ranks_finite([loss, *per_head, *gate_losses, float(grad_norm)])
        if self.optimizer is not None:
            if finite:  # a non-finite step updates nothing (its gradients are dropped)
                self.optimizer.step()
            self.optimizer.zero_grad()
        return StepResult(step=step, loss=loss, exit_losses=per_head, exit_weights=list(weights), lr=lr,
                          grad_norm=float(grad_norm), num_label_tokens=num_tokens,
                          seconds=time.perf_counter() - start, finite=finite, gate_losses=gate_losses,
                          bubble_label_tokens=bubble_tokens,
                          bubble_exit_losses=self._bubble_exit_losses(bubble_sums, bubble_tokens))

    def compute_gradients(self, step: int, input_ids: torch.Tensor, labels: torch.Tensor,
                          total_steps: int | None = None, bubble: dict[str, torch.Tensor] | None = None,
                          next_batch: dict[str, torch.Tensor] | None = None) -> tuple[int, int, list[float]]:
        """The forward and backward passes of :meth:`train_step`, gradients summed over DP ranks and tied
        copies, without the update. Returns the global label-token counts (main, exit-only) and the exit
        weights."""
        train, model, ctx = self.train_config, self.model, self.ctx
        micro_batches = self._step_micro_batches(step, input_ids, labels, total_steps)
        if self.frozen_step is not None and not self.frozen_step.continues_with(micro_batches[0]):
            self.frozen_step.discard_prefetched()
            raise ValueError(f"train_step({step}): the batch is not the `next_batch` the previous step was given "
                             "(and started); that step's early start was dropped, the next call may train on any "
                             "batch")
        next_first = None
        if next_batch is not None and self.prefetches:
            next_first = self._step_micro_batches(step + 1, next_batch["input_ids"], next_batch["labels"],
                                                  total_steps)[0]
        num_tokens = count_label_tokens(labels)
        bubble_tokens = self._set_bubble_batch(bubble)
        weights = train.exit_loss_weights_at(step, self.config.exit_loss_weights or [])
        model.loss.begin_step(num_tokens, len(micro_batches), weights, train.exit_temperature,
                              train.exit_distillation)
        model.train()
        try:
            if self.frozen_step is not None:
                self.frozen_step.run(micro_batches, self.grad_accumulator, next_first)
            else:
                self.engine.train_batch_iter(model=model, pg=ctx.pp_pg, batch=iter(micro_batches),
                                             nb_microbatches=len(micro_batches),
                                             grad_accumulator=self.grad_accumulator)
        except BaseException:
            reset_pipeline_state()
            raise
        self._sync_gradients()
        return num_tokens, bubble_tokens, weights

    def _step_micro_batches(self, step: int, input_ids: torch.Tensor, labels: torch.Tensor,
                            total_steps: int | None) -> list[dict[str, torch.Tensor]]:
        """Step ``step``'s micro-batches of this DP rank, with its layer-dropout mask (``train.layer_dropout``)."""
        train, layer_keep = self.train_config, None
        if train.layer_dropout is not None:
            rates = train.layer_skip_rates_at(step, self.config.num_hidden_layers, total_steps)
            layer_keep = layer_keep_mask(train.seed, step, input_ids.shape[0], rates)
        return self._rank_micro_batches(input_ids, labels, layer_keep)

    def discard_prefetched(self) -> None:
        """When a step was given a ``next_batch`` but no step follows after all (a run stopping on a non-finite
        step): complete its started transfers (collective over the pipeline)."""
        if self.frozen_step is not None:
            self.frozen_step.discard_prefetched()

    def _set_bubble_batch(self, bubble: dict[str, torch.Tensor] | None) -> int:
        """Hand this stage its exit-only micro-batches; returns their global label-token count."""
        if not self.bubble_micro_batches:
            return 0
        if bubble is None or bubble["input_ids"].shape[0] != self.bubble_batch_size:
            got = None if bubble is None else bubble["input_ids"].shape[0]
            raise ValueError(f"train.fill_bubbles: each step needs {self.bubble_batch_size} exit-only sequences "
                             f"(bubble_micro_batches={self.bubble_micro_batches} x dp x micro_batch_size), got {got}")
        if self.bubbles is not None:
            self.bubbles.micro_batches = self._rank_micro_batches(bubble["input_ids"], bubble["labels"])
        return count_label_tokens(bubble["labels"])

    def _bubble_exit_losses(self, sums: torch.Tensor, tokens: int) -> list[float | None]:
        if not self.bubble_micro_batches:
            return []
        reached = bubble_stages_of(self.model.layout)
        return [float(sums[j]) / max(tokens, 1) if self.model.layout.stage_of_exit(j) < reached else None
                for j in range(self.model.loss.num_exits)]

    def _all_ranks_finite(self, values: Sequence[float]) -> bool:
        """Whether ``values`` are finite on every rank (one small all-reduce: every rank decides alike)."""
        bad = torch.tensor([0.0 if all(math.isfinite(v) for v in values) else 1.0], device=self.device)
        dist.all_reduce(bad, op=dist.ReduceOp.MAX, group=self.ctx.world_pg)
        return bad.item() == 0.0

    def nonfinite_parameters(self) -> list[str]:
        """HF names of the parameters that hold a non-finite value on any rank (collective over the world)."""
        names = sorted(self.model.hf_parameters.shapes)  # the same list on every rank
        local = self.model.hf_named_parameters()
        flags = torch.zeros(len(names), device=self.device)
        for i, name in enumerate(names):
            if name in local:
                flags[i] = float(not bool(torch.isfinite(local[name]).all()))
        dist.all_reduce(flags, op=dist.ReduceOp.MAX, group=self.ctx.world_pg)
        return [name for name, flag in zip(names, flags.tolist()) if flag]

    def _sync_gradients(self) -> None:
        """Sum gradients over data-parallel ranks, then over the ranks of each tied parameter."""
        dp_pg = self.ctx.dp_pg
        params = [p for _, p in self.named_trainable]
        if self.grad_accumulator is not None:
            self.grad_accumulator.sync_gradients_across_dp(dp_pg, reduce_op=dist.ReduceOp.SUM, reduce_scatter=False)
        else:
            for p in params:
                if p.grad is None:
                    p.grad = torch.zeros_like(p)
            if dp_pg.size() > 1 and params:
                grads = [p.grad for p in params]
                flat = _flatten_dense_tensors(grads)
                dist.all_reduce(flat, op=dist.ReduceOp.SUM, group=dp_pg)
                for grad, synced in zip(grads, _unflatten_dense_tensors(flat, grads)):
                    grad.copy_(synced)
        sync_tied_weights_gradients(self.model, parallel_context=self.ctx, grad_accumulator=self.grad_accumulator)

    # -- evaluation ------------------------------------------------------------------------------------------

    @torch.no_grad()
    def evaluate(self, input_ids: torch.Tensor, labels: torch.Tensor) -> list[float]:
        """Per-head token-mean cross-entropy (exits, then the final head; no temperature) of a batch of
        sequences (the same on every rank; its size a multiple of ``dp * micro_batch_size``)."""
        model, ctx = self.model, self.ctx
        if self.frozen_step is not None and self.frozen_step.has_prefetched:
            raise RuntimeError("evaluate() after a train_step given a `next_batch`: train that step first")
        micro_batches = self._rank_micro_batches(input_ids, labels)
        model.eval()
        model.loss.reset_sums()
        try:
            forward_only(model, micro_batches)
        finally:
            model.train()
        sums = reduce_head_sums(model.loss.take_sums(self.device), [ctx.pp_pg, ctx.dp_pg])
        return summarize_losses(sums.cpu()[: model.loss.num_exits + 1], count_label_tokens(labels), [])[1]

    # -- checkpoints -----------------------------------------------------------------------------------------

    def state_tensors(self) -> dict[str, torch.Tensor]:
        """This rank's model shards, keyed ``model/<HF name>``."""
        return {f"model/{name}": p for name, p in self.model.hf_named_parameters().items()}

    @torch.no_grad()
    def load_state_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        for name, p in self.model.hf_named_parameters().items():
            p.copy_(tensors[f"model/{name}"])


@torch.no_grad()
def forward_only(model: ParallelEarlyExitGPT, micro_batches: Sequence[dict[str, torch.Tensor]]) -> None:
    """Run the pipeline forward over micro-batches without backward (nanotron's ``validate_batch_iter`` without
    its requires-grad assertion)."""
    from nanotron.parallel.pipeline_parallel.context_manager import attach_pipeline_state_to_model

    state = PipelineEvalBatchState()
    try:
        with attach_pipeline_state_to_model(model=model, pipeline_state=state):
            for micro_batch in micro_batches:
                model(**micro_batch)
                while state.microbatches_activations_to_send:
                    state.microbatches_activations_to_send.popleft()()
    except BaseException:
        reset_pipeline_state()
        raise


# ------------------------------------------------------------------------------------------------------------
# The whole run
# ------------------------------------------------------------------------------------------------------------
