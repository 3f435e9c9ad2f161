"""A training run (:func:`run`, what ``eellm-train`` calls on every rank): data, the trainer, resuming, the step
loop with metrics, the time-budget calibration, validation and checkpoints, and the HF export.

Faults: a non-finite step stops every rank with :class:`~.train_loop.NonFiniteTrainingError` naming the step and
the heads (or is skipped, up to ``train.skip_nonfinite_steps``, and logged); non-finite weights are never
committed as a checkpoint or export. A resumed run verifies the checkpoint's checksums and falls back to the
newest one that verifies, and refuses optimizer state saved for another parameter order.
"""

from __future__ import annotations

import dataclasses
import math
import os
import time
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from ..host_memory import keep_freed_memory
from .nanotron_compat import ParallelContext, dist, make_parallel_context
from .resume import check_something_to_resume, load_verified_checkpoint
from .run_data import packed_rows, validation_batch
from .train_loop import NonFiniteTrainingError, ParallelTrainer, StepResult

if TYPE_CHECKING:
    from .config import TrainConfig, TrainerConfig

__all__ = ["run"]


def _run_id(ctx: ParallelContext) -> str:
    """16 random hex digits drawn on world rank 0, the same on every rank: the prefix of this run's
    checkpoint temporaries."""
    value = torch.tensor([int.from_bytes(os.urandom(7), "big")], dtype=torch.int64, device=ctx.device)
    dist.broadcast(value, src=0, group=ctx.world_pg)
    return f"{int(value.item()):016x}"


def _skip_or_stop(result: StepResult, skipped: int, train: TrainConfig, exit_layers: Sequence[int],
                  logger: Any) -> int:
    """A non-finite step (no update was made): stop with :class:`NonFiniteTrainingError`, or, while fewer than
    ``train.skip_nonfinite_steps`` were skipped, log it as skipped. Returns the new count of skipped steps."""
    message = _nonfinite_message(result, exit_layers)
    if skipped >= train.skip_nonfinite_steps:
        raise NonFiniteTrainingError(
            f"{message}; stopped with no update at this step and no checkpoint of it (skipped {skipped} such "
            f"step(s) before, `train.skip_nonfinite_steps`={train.skip_nonfinite_steps}). Lower `train.lr` or "
            "resume from the last checkpoint")
    logger.log_event("nonfinite_step_skipped", result.step + 1, reason=message, skipped=skipped + 1,
                     max_skipped=train.skip_nonfinite_steps)
    return skipped + 1


def _nonfinite_message(result: StepResult, exit_layers: Sequence[int]) -> str:
    """Which heads' losses (or the gradient norm) were not finite at a step, for errors and events."""
    from .metrics import head_names

    heads = [name for name, value in zip(head_names(exit_layers), result.exit_losses) if not math.isfinite(value)]
    what = f"the loss of head(s) {', '.join(heads)}" if heads else "the gradient norm"
    if not heads and math.isfinite(result.grad_norm):
        what = "a loss or the gradient norm on another rank"
    return (f"step {result.step + 1}: {what} is not finite (loss {result.loss}, exit losses "
            f"{result.exit_losses}, grad norm {result.grad_norm})")


def _check_finite_weights(trainer: ParallelTrainer, step: int, what: str) -> None:
    """Refuse to save or export non-finite weights (collective)."""
    bad = trainer.nonfinite_parameters()
    if bad:
        raise NonFiniteTrainingError(
            f"step {step}: {len(bad)} parameter(s) hold non-finite values ({', '.join(bad[:4])}"
            f"{', ...' if len(bad) > 4 else ''}); not writing the {what}. Lower `train.lr`"
        )


def _fix_total_steps(ctx: ParallelContext, train: TrainConfig, done: int, elapsed_s: float,
                     step_times: Sequence[float]) -> tuple[int, float]:
    """The number of steps of a time-budgeted run (``train.time_budget_minutes``), decided by global rank 0 from
    its timings and broadcast (collective: every rank calls it after the same step, and all get rank 0's
    answer): :meth:`TrainConfig.budgeted_total_steps` with the mean of ``step_times``. Returns
    ``(total, step_time_s)``."""
    step_time = sum(step_times) / len(step_times)
    total = train.budgeted_total_steps(done, elapsed_s, step_time)
    decision = torch.tensor([float(total), step_time], dtype=torch.float64, device=ctx.device)
    dist.broadcast(decision, src=0, group=ctx.world_pg)  # world rank 0 is rank 0 of world_pg
    return int(decision[0].item()), float(decision[1].item())


@dataclasses.dataclass
class _Progress:
    """Where a run stands besides weights and optimizer: what a checkpoint records and a resumed run restores.
    ``fixed_total``: the steps of a time-budgeted run once calibrated (None until then)."""

    start_step: int = 0
    resumed: bool = False
    fixed_total: int | None = None
    skipped_steps: int = 0  # non-finite steps skipped so far (train.skip_nonfinite_steps)


def _prepare(cfg: TrainerConfig, ctx: ParallelContext, world_rank: int) -> tuple[ParallelTrainer, Any, Any]:
    """The ``init_from`` conversion, the built-in corpora, the data split and the trainer (collective)."""
    from .data import PackedDataset, train_val_split, write_builtin_corpus

    par, data = cfg.parallelism, cfg.data
    model_config = cfg.model_config()
    init_dir = None
    if cfg.model.init_from is not None:
        from .init_model import prepare_init_model

        init_dir = prepare_init_model(cfg.model.init_from, model_config, cfg.run_dir, is_writer=world_rank == 0,
                                      barrier=lambda: dist.barrier(group=ctx.world_pg))
    if world_rank == 0:
        for path, name in data.builtin_files.items():
            if not Path(path).is_file():
                Path(path).parent.mkdir(parents=True, exist_ok=True)
                write_builtin_corpus(name, path)
    rows = packed_rows(cfg, ctx)
    train_set, val_set = train_val_split(PackedDataset(rows), data.validation, seed=data.shuffle_seed)
    if len(train_set) < 1:
        raise ValueError("no training sequences: more text or a smaller data.seq_len is needed")
    if cfg.model.exit_vocab_size is not None:
        model_config = _with_exit_shortlist(cfg, train_set)
    trainer = ParallelTrainer(model_config, ctx, cfg.train, layer_split=par.layer_split, pp_engine=par.pp_engine,
                              init_from=init_dir)
    return trainer, train_set, val_set


def _with_exit_shortlist(cfg: TrainerConfig, train_set: Any) -> Any:
    """``model.exit_vocab_size``: the model config with the exits' shortlist, the training split's most frequent
    label tokens (every rank holds the same split, so every rank chooses the same)."""
    from .exit_shortlist import exit_vocab_of_training_data

    vocab_size = cfg.model_config().vocab_size
    cfg.model.fields["exit_vocab"] = exit_vocab_of_training_data(train_set.rows, train_set.indices,
                                                                 cfg.model.exit_vocab_size, vocab_size)
    model_config = cfg.model_config()
    cfg.parallelism.check_model(model_config)
    return model_config


def _resume(cfg: TrainerConfig, ctx: ParallelContext, trainer: ParallelTrainer, layout: dict[str, int]
            ) -> _Progress:
    """Restore the newest checkpoint that verifies, if the config asks to resume (collective)."""
    from .checkpoint import restore_rng_state, unflatten_optimizer_state
    from .resume import check_optimizer_order

    loaded = load_verified_checkpoint(cfg, ctx, layout)
    if loaded is None:
        return _Progress()
    tensors, state = loaded
    trainer.load_state_tensors(tensors)
    if trainer.optimizer is not None:
        saved = unflatten_optimizer_state(tensors, state["optimizer"])
        check_optimizer_order(trainer.optimizer, saved, cfg.checkpoint.dir)
        trainer.optimizer.load_state_dict(saved)
    restore_rng_state(state["rng"])
    total = state.get("total_steps")
    return _Progress(start_step=int(state["step"]), resumed=True,
                     fixed_total=None if cfg.train.time_budget_minutes is None or total is None
                     else min(int(total), cfg.train.steps),
                     skipped_steps=int(state.get("skipped_nonfinite_steps", 0)))


class _TrainingRun:
    """The step loop of :func:`run` on one rank: steps, metrics, the time-budget calibration, validation and
    checkpoints."""

    def __init__(self, cfg: TrainerConfig, ctx: ParallelContext, trainer: ParallelTrainer, train_set: Any,
                 val_set: Any, progress: _Progress, layout: dict[str, int]) -> None:
        from .metrics import MetricsLogger

        self.cfg, self.ctx, self.trainer, self.train_set = cfg, ctx, trainer, train_set
        self.progress, self.layout = progress, layout
        self.world_rank = dist.get_rank(ctx.world_pg)
        self.run_id = _run_id(ctx)
        self.exit_layers = trainer.config.exit_layers
        self.total = progress.fixed_total if progress.fixed_total is not None else cfg.train.steps
        self.logger = MetricsLogger(cfg.run_dir, self.total, enabled=self.world_rank == 0,
                                    exit_layers=self.exit_layers,
                                    resume_step=progress.start_step if progress.resumed else None)
        self.val_rows = validation_batch(val_set, cfg.train, cfg.parallelism.dp)
        self.step_times: list[float] = []  # time-budget calibration: durations of the timed steps
        self.loop_start = time.perf_counter()

    def save(self, step: int) -> None:
        from .checkpoint import capture_rng_state, flatten_optimizer_state, save_checkpoint

        cfg, trainer, progress = self.cfg, self.trainer, self.progress
        _check_finite_weights(trainer, step, "checkpoint")
        opt_tensors, opt_state = ({}, None) if trainer.optimizer is None else flatten_optimizer_state(
            trainer.optimizer.state_dict())
        save_checkpoint(cfg.checkpoint.dir, step, self.world_rank, cfg.parallelism.world_size,
                        tensors={**trainer.state_tensors(), **opt_tensors},
                        state={"step": step, "consumed_sequences": step * cfg.train.global_batch_size,
                               "total_steps": progress.fixed_total, "optimizer": opt_state,
                               "rng": capture_rng_state(), "skipped_nonfinite_steps": progress.skipped_steps},
                        barrier=self.ctx.world_pg, layout=self.layout, config_hash=cfg.fingerprint(),
                        keep_last=cfg.checkpoint.keep_last, run_id=self.run_id)

    def _calibrate_budget(self, done: int, step_start: float) -> None:
        """Time the calibration steps of a time-budgeted run, then fix its number of steps (collective)."""
        from .config import TIME_BUDGET_CALIBRATION_STEPS, TIME_BUDGET_WARMUP_STEPS

        train, progress = self.cfg.train, self.progress
        if train.time_budget_minutes is None or progress.fixed_total is not None:
            return
        if done - progress.start_step > TIME_BUDGET_WARMUP_STEPS:
            self.step_times.append(time.perf_counter() - step_start)
        if done - progress.start_step == TIME_BUDGET_CALIBRATION_STEPS:
            progress.fixed_total, step_time = _fix_total_steps(
                self.ctx, train, done, time.perf_counter() - self.loop_start, self.step_times)
            self.total = progress.fixed_total
            self.logger.set_total_steps(self.total)
            self.logger.log_event("time_budget", done, steps=self.total, step_time_s=round(step_time, 6),
                                  budget_minutes=train.time_budget_minutes, max_steps=train.steps)

    def _after_step(self, result: StepResult, step_start: float) -> None:
        cfg, train, done = self.cfg, self.cfg.train, result.step + 1
        if not result.finite:
            self.progress.skipped_steps = _skip_or_stop(result, self.progress.skipped_steps, train,
                                                        self.exit_layers, self.logger)
        if result.finite and (done % train.log_interval == 0 or done == self.total):
            self.logger.log_train(done, result.loss, exit_losses=result.exit_losses, lr=result.lr,
                                  tokens=train.global_batch_size * cfg.data.seq_len, grad_norm=result.grad_norm,
                                  exit_weights=result.exit_weights, **result.optional_metrics())
        self._calibrate_budget(done, step_start)
        if self._validates_after(done):
            val = self.trainer.evaluate(self.val_rows["input_ids"], self.val_rows["labels"])
            weights = train.exit_loss_weights_at(done - 1, self.trainer.config.exit_loss_weights)
            self.logger.log_validation(done, val[-1] + sum(w * x for w, x in zip(weights, val[:-1])),
                                       exit_losses=val)
        if self._saves_after(done):
            self.save(done)

    def _validates_after(self, done: int) -> bool:
        train = self.cfg.train
        return self.val_rows is not None and train.val_interval > 0 and (
            done % train.val_interval == 0 or done == self.total)

    def _saves_after(self, done: int) -> bool:
        ckpt = self.cfg.checkpoint
        return ckpt is not None and ((ckpt.interval > 0 and done % ckpt.interval == 0) or done == self.total)

    def _next_step_follows(self, done: int) -> bool:
        """Whether step ``done`` (0-based) will run right after the step now starting, with nothing between and
        inputs already known (``train.prefetch_next_step``: the trainer may start it early). A time budget
        fixed after this step keeps at least one more step (:meth:`TrainConfig.budgeted_total_steps`), but
        changes the layer-dropout rates, which follow the total."""
        from .config import TIME_BUDGET_CALIBRATION_STEPS

        train = self.cfg.train
        fixing_total = (train.time_budget_minutes is not None and self.progress.fixed_total is None
                        and done - self.progress.start_step == TIME_BUDGET_CALIBRATION_STEPS)
        return (self.trainer.prefetches and done < self.total and not self._validates_after(done)
                and not self._saves_after(done) and not (fixing_total and train.layer_dropout is not None))

    def _batch(self, step: int) -> dict[str, torch.Tensor]:
        from .data import global_batch_indices

        train = self.cfg.train
        return self.train_set.batch(global_batch_indices(step, train.global_batch_size, len(self.train_set),
                                                         seed=self.cfg.data.shuffle_seed))

    def loop(self) -> tuple[list[StepResult], int]:
        """Train up to the run's total; returns the steps' results and the last step done."""
        seed, results = self.cfg.data.shuffle_seed, []
        step, batch = self.progress.start_step, None
        try:
            while step < self.total:
                step_start = time.perf_counter()
                batch = batch or self._batch(step)
                next_batch = self._batch(step + 1) if self._next_step_follows(step + 1) else None
                result = self.trainer.train_step(step, batch["input_ids"], batch["labels"],
                                                 total_steps=self.progress.fixed_total,
                                                 bubble=self.trainer.bubble_batch(self.train_set, step, seed),
                                                 next_batch=next_batch)
                results.append(result)
                step, batch = step + 1, next_batch
                self._after_step(result, step_start)
        except NonFiniteTrainingError:  # every rank stops at the same step: finish what it started of the next
            self.trainer.discard_prefetched()
            raise
        finally:
            self.logger.close()
        return results, step


def run(cfg: TrainerConfig) -> list[StepResult]:
    """Train as ``cfg`` says (every rank calls it): data, steps, validation, metrics, checkpoints, export.

    With ``train.time_budget_minutes`` the number of steps is fixed after the calibration steps (see
    :class:`~eellm_hf.trainer.config.TrainConfig`) and kept by a resumed run (checkpoint ``state["total_steps"]``).
    """
    keep_freed_memory()  # large CPU tensors reuse freed pages instead of page-faulting fresh ones every step
    par = cfg.parallelism
    ctx = make_parallel_context(par.tp, par.pp, par.dp, timeout_s=par.timeout_s)
    world_rank = dist.get_rank(ctx.world_pg)
    check_something_to_resume(cfg, world_rank)
    layout = {"tp": par.tp, "pp": par.pp, "dp": par.dp}
    trainer, train_set, val_set = _prepare(cfg, ctx, world_rank)
    progress = _resume(cfg, ctx, trainer, layout)
    results, step = _TrainingRun(cfg, ctx, trainer, train_set, val_set, progress, layout).loop()
    if cfg.export_hf is not None:
        from .weights import export_hf

        _check_finite_weights(trainer, step, "export")
        export_hf(trainer.model, cfg.export_hf, tokenizer=cfg.data.tokenizer,
                  generation_kwargs=cfg.export_generation)
    dist.barrier(group=ctx.world_pg)
    return results
