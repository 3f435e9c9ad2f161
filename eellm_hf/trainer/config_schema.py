"""The trainer config's sections: dataclasses that validate themselves (``__post_init__``).

Built from YAML by :func:`eellm_hf.trainer.config_loading.load_config`, or directly in Python: either way a bad
value raises a ``ValueError`` naming the key (``ParallelismConfig(tp=0)``: "`parallelism.tp` must be >= 1, got
0"). A section checks its own values; :class:`TrainerConfig` checks the sections against each other and the
model. What needs the processes or the files is checked apart: :meth:`ParallelismConfig.check_world_size` and
:meth:`TrainerConfig.check_files`. The YAML layout is described in :mod:`eellm_hf.trainer.config`.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import typing
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

from .config_checks import check_shortlist_shards, is_int, need, need_choice
from .init_model import SHAPE_FIELDS, check_init_from
from .tokenizer_files import check_tokenizer, is_tokenizer_dir
from .train_schedules import ExitLossWeightSchedule, LayerDropout

if typing.TYPE_CHECKING:
    from eellm_hf.modeling.configuration_early_exit_gpt import EarlyExitGPTConfig

TIME_BUDGET_WARMUP_STEPS = 1
"""``train.time_budget_minutes``: steps run before the step time is measured (start-up costs, not timed)."""
TIME_BUDGET_CALIBRATION_STEPS = 4
"""``train.time_budget_minutes``: steps after which the total is fixed (the warm-up steps, then the timed ones)."""


@dataclasses.dataclass
class ModelSection:
    """``model:``. ``fields`` are EarlyExitGPTConfig keyword arguments (overrides when ``init_from`` is set)."""

    fields: dict[str, Any]
    init_from: Path | str | None = None  # a folder, a .gguf file, or a bundled model's name (kept as a string)
    # the exits' shortlist (EarlyExitGPTConfig.exit_vocab): the K tokens most frequent in the training split
    exit_vocab_size: int | None = None
    _pretrained_config: Any = dataclasses.field(default=None, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if not isinstance(self.fields, Mapping):
            raise ValueError(f"`model` must be a mapping, got {type(self.fields).__name__}: {self.fields!r}")
        if self.exit_vocab_size is not None:
            need(is_int(self.exit_vocab_size) and self.exit_vocab_size >= 1,
                 f"`model.exit_vocab_size` must be a positive integer, got {self.exit_vocab_size!r}")
            need("exit_vocab" not in self.fields, "`model.exit_vocab` and `model.exit_vocab_size` are exclusive: "
                 "give the shortlist, or its size to choose it from the training data")
        if self.init_from is not None:
            if isinstance(self.init_from, str) and self.init_from not in _bundled_models():
                self.init_from = Path(self.init_from)
            check_init_from(self.init_from, self.fields, self.converts)

    @property
    def converts(self) -> bool:
        """Whether ``init_from`` is a pretrained checkpoint converted on the fly (not an EarlyExitGPT folder)."""
        from .init_model import is_early_exit_folder

        return self.init_from is not None and not is_early_exit_folder(self.init_from)

    def pretrained_config(self) -> Any:
        """The transformers config of the checkpoint to convert (read once)."""
        if self._pretrained_config is None:
            from .init_model import pretrained_config

            self._pretrained_config = pretrained_config(self.init_from)
        return self._pretrained_config



@dataclasses.dataclass
class ParallelismConfig:
    """``parallelism:`` 3D layout. ``layer_split``: decoder layers per pipeline stage (None: the cost-balanced
    split of :func:`eellm_hf.trainer.parallel_model.balanced_layer_split`). ``timeout_s``: the timeout of every
    collective and point-to-point transfer (a dead or hung rank makes the others fail within it)."""

    tp: int = 1
    pp: int = 1
    dp: int = 1
    layer_split: list[int] | None = None
    pp_engine: Literal["1f1b", "afab"] = "1f1b"
    timeout_s: float = 600.0  # = nanotron_compat.DEFAULT_TIMEOUT_S (not imported: config stays torch-free)

    def __post_init__(self) -> None:
        for name in ("tp", "pp", "dp"):
            need(is_int(getattr(self, name)) and getattr(self, name) >= 1,
                  f"`parallelism.{name}` must be >= 1, got {getattr(self, name)}")
        need(self.timeout_s > 0, f"`parallelism.timeout_s` must be > 0, got {self.timeout_s}")
        need_choice("parallelism.pp_engine", self.pp_engine, ("1f1b", "afab"))
        if self.layer_split is not None:
            split = self.layer_split
            need(len(split) == self.pp,
                  f"`parallelism.layer_split` {split} must have pp={self.pp} entries (one per pipeline stage)")
            need(all(n >= 1 for n in split), f"`parallelism.layer_split` {split} has an entry < 1 (an empty stage)")

    def check_world_size(self, world_size: int) -> None:
        """``tp * pp * dp`` is the number of processes."""
        need(self.world_size == world_size,
              f"parallelism tp*pp*dp = {self.tp}*{self.pp}*{self.dp} = {self.world_size} does not match the world "
              f"size {world_size} (number of processes)")

    def check_model(self, model: Any) -> None:
        """The model splits over the pipeline stages and its heads and MLP over the tensor-parallel ranks."""
        layers = model.num_hidden_layers
        if self.layer_split is not None:
            need(sum(self.layer_split) == layers,
                  f"`parallelism.layer_split` {self.layer_split} sums to {sum(self.layer_split)}, not "
                  f"num_hidden_layers={layers}")
        else:  # the trainer's cost-balanced split (balanced_layer_split) gives every stage >= 1 layer
            need(layers >= self.pp, f"num_hidden_layers={layers} cannot be split over pp={self.pp} pipeline stages")
        # vocab_size need not divide: the parallel model pads the vocabulary to a multiple of tp (padded_vocab_size)
        for name in ("num_attention_heads", "num_key_value_heads", "intermediate_size"):
            value = getattr(model, name)
            need(value % self.tp == 0, f"model.{name}={value} is not divisible by parallelism.tp={self.tp}")
        check_shortlist_shards(model.exit_vocab, model.vocab_size, self.tp)

    @property
    def world_size(self) -> int:
        return self.tp * self.pp * self.dp

    def layout(self, model_config: Any, frozen_backbone: bool = False) -> Any:
        """The trainer's pipeline layout of the model (:func:`eellm_hf.trainer.parallel_model.make_layout`):
        ``layer_split``, else the cost-balanced split that counts each exit head on its layer's stage and the final
        head on the last stage. ``model_config``: the model's ``EarlyExitGPTConfig``
        (:meth:`TrainerConfig.model_config`); ``frozen_backbone``: ``train.freeze_backbone`` (EE-Tuning weighs the
        exits more)."""
        from eellm_hf.trainer.parallel_model import make_layout  # imports torch/nanotron: only when needed

        return make_layout(model_config, self.pp, self.layer_split, frozen_backbone)

    def stage_layers(self, model_config: Any, frozen_backbone: bool = False) -> list[int]:
        """Number of decoder layers of each pipeline stage, exactly as the trainer splits them (:meth:`layout`)."""
        return list(self.layout(model_config, frozen_backbone).layer_split)

    def stage_of_layer(self, layer: int, model_config: Any) -> int:
        """Pipeline stage (0-based) holding decoder layer ``layer`` (1-based, as in ``exit_layers``)."""
        return self.layout(model_config).stage_of_layer(layer)



@dataclasses.dataclass
class BpeTokenizerSpec:
    """``data.tokenizer: {train_bpe: {...}}``: a byte-level BPE tokenizer trained on ``data.files``."""

    vocab_size: int
    out_dir: Path
    min_frequency: int = 2

    def __post_init__(self) -> None:
        need(self.vocab_size >= 258, f"`data.tokenizer.train_bpe.vocab_size` must be >= 258, got {self.vocab_size}")
        need(self.min_frequency >= 1, "`data.tokenizer.train_bpe.min_frequency` must be >= 1, got "
              f"{self.min_frequency}")



@dataclasses.dataclass
class DataConfig:
    """``data:``. ``tokenizer`` is the tokenizer folder (``train_bpe.out_dir`` when ``train_bpe`` is set)."""

    files: list[Path]
    tokenizer: Path
    seq_len: int
    train_bpe: BpeTokenizerSpec | None = None
    validation_fraction: float = 0.0
    validation_sequences: int | None = None
    shuffle_seed: int = 0
    text_field: str = "text"
    sample_by: Literal["line", "paragraph", "document"] = "line"
    cache_dir: Path | None = None
    builtin_files: dict[str, str] = dataclasses.field(default_factory=dict)  # file -> built-in corpus name

    def __post_init__(self) -> None:
        need(len(self.files) > 0, "`data.files` must list at least one file")
        need(self.seq_len >= 1, f"`data.seq_len` must be >= 1, got {self.seq_len}")
        need(0.0 <= self.validation_fraction < 1.0,
              f"`data.validation_fraction` must be in [0, 1), got {self.validation_fraction}")
        need_choice("data.sample_by", self.sample_by, ("line", "paragraph", "document"))
        if self.validation_sequences is not None:
            need(self.validation_sequences >= 0,
                  f"`data.validation_sequences` must be >= 0, got {self.validation_sequences}")
            need(self.validation_fraction == 0.0,
                  "set only one of `data.validation_fraction` and `data.validation_sequences`, got "
                  f"{self.validation_fraction} and {self.validation_sequences}")

    @property
    def validation(self) -> float | int:
        """The ``val`` argument of ``data.train_val_split``: a row count or a fraction (0.0: none)."""
        return self.validation_sequences if self.validation_sequences is not None else self.validation_fraction

    @property
    def has_validation(self) -> bool:
        return bool(self.validation)



@dataclasses.dataclass
class TrainConfig:
    """``train:`` optimisation settings. ``global_batch_size`` and ``micro_batch_size`` count sequences.

    ``time_budget_minutes`` (None: off): train for as many steps as fit in the budget, ``steps`` being an upper
    bound. The run times its steps (step :data:`TIME_BUDGET_WARMUP_STEPS` not timed, then the steps up to
    :data:`TIME_BUDGET_CALIBRATION_STEPS`); global rank 0 then fixes the total number of steps, ``min(steps,
    done + floor((budget - elapsed) / step_time))`` and at least ``done + 1`` (``elapsed``: wall time since the
    first training step of this run, ``done``: steps completed), and broadcasts it, so that every rank stops at
    the same step. The budget counts training steps only: start-up (data, tokenizer, model) is before it, and the
    time of later validations and checkpoints is not in ``step_time``: leave room for them. From then on the
    learning-rate decay and the progress bar use that total; it is logged (``metrics.jsonl`` line ``{"event":
    "time_budget", ...}``) and saved in checkpoints, and a resumed run keeps it (a run resumed from a checkpoint
    saved before the total was fixed calibrates again, from its first step). The learning rate of the
    calibration steps (the total not known yet) follows the schedule for the ``steps`` upper bound: identical to
    the final schedule when ``warmup_steps >= TIME_BUDGET_CALIBRATION_STEPS`` or ``lr_decay: constant`` (the
    warm-up does not depend on the total), else a slightly different decay for those few steps.

    ``autocast: bfloat16`` (EE-Tuning only): the frozen backbone's forward and the exits' forward run under
    ``torch.autocast``, so their matrix multiplies are bf16 (about 4x fp32's throughput on CPUs with AVX-512 BF16
    or AMX, and on GPUs), while every weight, gradient and optimizer moment stays fp32: the backbone stays the
    checkpoint's own, bit for bit, and the export is fp32. The teacher logits travel between stages in bf16.
    Validation runs in fp32, so its losses compare with runs without autocast.

    ``prefetch_next_step`` (EE-Tuning at pp > 1; elsewhere it changes nothing): the stages before the last run the
    next step's first micro-batch while the last stage finishes the current step, which removes the pipeline's
    fill at the start of every step that directly follows another (not after a validation or a checkpoint).
    The results are the same either way (see :mod:`eellm_hf.trainer.ee_tuning`).
    """

    steps: int
    global_batch_size: int
    micro_batch_size: int
    lr: float
    seed: int = 0
    min_lr: float = 0.0
    warmup_steps: int = 0
    lr_decay: Literal["cosine", "linear", "constant"] = "cosine"
    weight_decay: float = 0.0
    adam_beta1: float = 0.9
    adam_beta2: float = 0.95
    adam_eps: float = 1.0e-8
    grad_clip: float | None = 1.0
    skip_nonfinite_steps: int = 0
    exit_loss_weight_schedule: ExitLossWeightSchedule | None = None
    layer_dropout: LayerDropout | None = None
    time_budget_minutes: float | None = None
    exit_temperature: float = 1.0
    freeze_backbone: bool = False
    exit_distillation: float = 0.0
    zero_stage: Literal[0, 1] = 0
    val_interval: int = 0
    val_batches: int | None = None
    log_interval: int = 1
    dtype: Literal["float32", "bfloat16"] = "float32"
    autocast: Literal["bfloat16"] | None = None
    defer_exit_forward: bool = False
    fill_bubbles: bool = False
    bubble_micro_batches: int | None = None
    prefetch_next_step: bool = True

    def __post_init__(self) -> None:
        for name in ("steps", "global_batch_size", "micro_batch_size", "log_interval"):
            value = getattr(self, name)
            need(is_int(value) and value >= 1, f"`train.{name}` must be a positive integer, got {value}")
        need(self.lr > 0, f"`train.lr` must be > 0, got {self.lr}")
        need(0 <= self.min_lr <= self.lr, f"`train.min_lr` must be in [0, train.lr={self.lr}], got {self.min_lr}")
        need(0 <= self.warmup_steps <= self.steps,
              f"`train.warmup_steps` must be in [0, train.steps={self.steps}], got {self.warmup_steps}")
        need(self.weight_decay >= 0, f"`train.weight_decay` must be >= 0, got {self.weight_decay}")
        for name in ("adam_beta1", "adam_beta2"):
            need(0 <= getattr(self, name) < 1, f"`train.{name}` must be in [0, 1), got {getattr(self, name)}")
        need(self.adam_eps > 0, f"`train.adam_eps` must be > 0, got {self.adam_eps}")
        need(self.grad_clip is None or self.grad_clip > 0,
              f"`train.grad_clip` must be > 0 (or null for no clipping), got {self.grad_clip}")
        self._check_exit_training()
        self._check_exit_schedule()
        self._check_counts()
        need_choice("train.lr_decay", self.lr_decay, ("cosine", "linear", "constant"))
        need_choice("train.dtype", self.dtype, ("float32", "bfloat16"))
        need_choice("train.zero_stage", self.zero_stage, (0, 1))

    def _check_exit_training(self) -> None:
        need(self.exit_temperature > 0, f"`train.exit_temperature` must be > 0, got {self.exit_temperature}")
        need(self.autocast in (None, "bfloat16"), f"`train.autocast` must be bfloat16 or null, got {self.autocast!r}")
        need(self.autocast is None or self.freeze_backbone,
              f"`train.autocast`={self.autocast} needs `train.freeze_backbone: true` (it runs EE-Tuning's forward-only "
              "backbone and its exits in bf16; to train a whole model in bf16 use `train.dtype: bfloat16`)")
        need(self.autocast is None or self.dtype == "float32",
              f"`train.autocast`={self.autocast} needs `train.dtype: float32` (the weights it keeps in fp32), got "
              f"{self.dtype!r}")
        need(0.0 <= self.exit_distillation <= 1.0,
              f"`train.exit_distillation` must be in [0, 1], got {self.exit_distillation}")
        need(self.exit_distillation == 0.0 or self.freeze_backbone,
              f"`train.exit_distillation`={self.exit_distillation} needs `train.freeze_backbone: true` (the final "
              "head is the teacher of the exits only while the backbone is frozen)")

    def _check_exit_schedule(self) -> None:
        """The exit-schedule options (:mod:`eellm_hf.trainer.exit_schedule`); those that need the parallel
        layout are checked by :meth:`check_exit_schedule_layout`."""
        for name in ("defer_exit_forward", "fill_bubbles", "prefetch_next_step"):
            need(isinstance(getattr(self, name), bool), f"`train.{name}` must be true or false, got "
                  f"{getattr(self, name)!r}")
        for name in ("defer_exit_forward", "fill_bubbles"):
            need(not (getattr(self, name) and self.freeze_backbone),
                  f"`train.{name}` does not apply with `train.freeze_backbone: true`: EE-Tuning's step has no "
                  "pipeline backward (its exits already run after the backbone forward, see ee_tuning)")
        count = self.bubble_micro_batches
        need(count is None or (is_int(count) and count >= 1),
              f"`train.bubble_micro_batches` must be an integer >= 1 (or null), got {count!r}")
        need(count is None or self.fill_bubbles,
              f"`train.bubble_micro_batches`={count} needs `train.fill_bubbles: true`")
        need(not self.fill_bubbles or self.dtype == "float32",
              f"`train.fill_bubbles` needs `train.dtype: float32`, got {self.dtype!r} (the exit-only micro-batches' "
              "gradients bypass the fp32 gradient accumulator of low-precision training)")

    def check_exit_schedule_layout(self, parallelism: ParallelismConfig, model: Any) -> None:
        """``defer_exit_forward`` and ``fill_bubbles`` against the parallel layout and the model's exits."""
        for name in ("defer_exit_forward", "fill_bubbles"):
            if getattr(self, name):
                need(parallelism.pp > 1,
                      f"`train.{name}` needs pipeline parallelism (parallelism.pp > 1), got pp={parallelism.pp}")
                need(model.num_exits > 0, f"`train.{name}` is true but the model has no exits")
        if self.fill_bubbles:
            need(parallelism.pp_engine == "1f1b", "`train.fill_bubbles` needs `parallelism.pp_engine: 1f1b` (its "
                  f"bubbles), got {parallelism.pp_engine!r}")
            stages = [parallelism.stage_of_layer(layer, model) for layer in model.exit_layers]
            need(min(stages) < parallelism.pp - 1,
                  f"`train.fill_bubbles`: every exit (layers {list(model.exit_layers)}) is on the last pipeline "
                  f"stage (stages {parallelism.stage_layers(model)} layers each), so exit-only micro-batches would "
                  "run the whole pipeline: move an exit earlier or change `parallelism.layer_split`")

    def _check_counts(self) -> None:
        need(self.val_interval >= 0, f"`train.val_interval` must be >= 0 (0: never), got {self.val_interval}")
        need(self.val_batches is None or self.val_batches >= 1,
              f"`train.val_batches` must be >= 1 (or null for all), got {self.val_batches}")
        need(self.skip_nonfinite_steps >= 0,
              f"`train.skip_nonfinite_steps` must be >= 0 (0: stop at the first), got {self.skip_nonfinite_steps}")
        need(self.time_budget_minutes is None or self.time_budget_minutes > 0,
              f"`train.time_budget_minutes` must be > 0 (or null for no budget), got {self.time_budget_minutes}")

    def check_batches(self, parallelism: ParallelismConfig) -> None:
        """The one check of how a global batch splits: into ``dp`` ranks of whole micro-batches, and (1F1B) into
        enough micro-batches for nanotron's pipeline engine."""
        per_step = parallelism.dp * self.micro_batch_size
        need(self.global_batch_size % per_step == 0,
              f"`train.global_batch_size`={self.global_batch_size} is not divisible by dp*micro_batch_size="
              f"{parallelism.dp}*{self.micro_batch_size}={per_step}")
        n_micro = self.num_micro_batches(parallelism.dp)
        if parallelism.pp_engine == "1f1b":
            need(n_micro >= parallelism.pp - 1,
                  f"{n_micro} micro-batches per step (global_batch_size / (dp*micro_batch_size)) is fewer than "
                  f"pp-1={parallelism.pp - 1}, which nanotron's 1F1B pipeline engine requires: raise "
                  f"`train.global_batch_size` or lower `train.micro_batch_size`")

    def lr_at(self, step: int, total_steps: int | None = None) -> float:
        """Learning rate of optimizer step ``step`` (0-based): linear warmup from ``lr / warmup_steps`` to
        ``lr`` over ``warmup_steps`` steps, then ``lr_decay`` down to ``min_lr`` at the last step of
        ``total_steps`` (default ``steps``; with a time budget, the total fixed by the run)."""
        if step < self.warmup_steps:
            return self.lr * (step + 1) / self.warmup_steps
        if self.lr_decay == "constant":
            return self.lr
        decay_steps = (self.steps if total_steps is None else total_steps) - self.warmup_steps
        progress = 1.0 if decay_steps <= 1 else min(1.0, (step - self.warmup_steps) / (decay_steps - 1))
        if self.lr_decay == "cosine":
            progress = 0.5 * (1.0 - math.cos(math.pi * progress))
        return self.lr + (self.min_lr - self.lr) * progress

    def exit_loss_weights_at(self, step: int, weights: Sequence[float]) -> list[float]:
        """The exits' loss weights at optimizer step ``step`` (0-based): ``weights`` (the targets,
        ``model.exit_loss_weights``) under ``exit_loss_weight_schedule`` (unchanged without one)."""
        schedule = self.exit_loss_weight_schedule
        if schedule is None:
            return [float(w) for w in weights]
        return [schedule.weight_at(step, w) for w in weights]

    def layer_skip_rates_at(self, step: int, num_layers: int, total_steps: int | None = None) -> list[float]:
        """Per decoder layer, the probability that a sequence skips it at step ``step`` (``layer_dropout``; all 0
        without it). ``total_steps``: the length of the curriculum (default ``steps``)."""
        if self.layer_dropout is None:
            return [0.0] * num_layers
        return self.layer_dropout.rates_at(step, self.steps if total_steps is None else total_steps, num_layers)

    def budgeted_total_steps(self, done: int, elapsed_s: float, step_time_s: float) -> int:
        """The total number of steps under ``time_budget_minutes`` after ``done`` steps that took ``elapsed_s``
        seconds in all, a step taking ``step_time_s``: ``done`` plus the steps that fit in the rest of the
        budget, at least ``done + 1``, at most ``steps``."""
        assert self.time_budget_minutes is not None
        remaining = self.time_budget_minutes * 60.0 - elapsed_s
        fit = done + math.floor(remaining / max(step_time_s, 1e-9)) if remaining > 0 else done
        return min(self.steps, max(done + 1, fit))

    def num_micro_batches(self, dp: int) -> int:
        """Micro-batches per optimizer step on each data-parallel rank (pipeline / accumulation count)."""
        return self.global_batch_size // (dp * self.micro_batch_size)



@dataclasses.dataclass
class CheckpointConfig:
    """``checkpoint:``. ``interval`` 0: save only at the end. ``resume``: ``true`` continues from the newest
    checkpoint of ``dir`` that verifies and fails when there is none; ``"auto"`` resumes when there is one and
    starts from step 0 otherwise; ``false`` always starts from step 0. ``keep_last``: prune older checkpoints
    (None: keep all)."""

    dir: Path
    interval: int = 0
    resume: bool | Literal["auto"] = False
    keep_last: int | None = None

    def __post_init__(self) -> None:
        need(self.interval >= 0, f"`checkpoint.interval` must be >= 0 (0: only at the end), got {self.interval}")
        need(self.keep_last is None or self.keep_last >= 1,
              f"`checkpoint.keep_last` must be >= 1 (or null to keep all), got {self.keep_last}")
        need(isinstance(self.resume, bool) or self.resume == "auto",
              f"`checkpoint.resume` must be true, false or auto; got {self.resume!r}")



@dataclasses.dataclass
class TrainerConfig:
    """The whole validated configuration (see the module docstring)."""

    model: ModelSection
    parallelism: ParallelismConfig
    data: DataConfig
    train: TrainConfig
    run_dir: Path
    checkpoint: CheckpointConfig | None = None
    export_hf: Path | None = None
    export_generation: dict[str, Any] = dataclasses.field(default_factory=dict)
    source: Path | None = None  # the YAML file, if loaded from one

    def __post_init__(self) -> None:
        """Checks across sections (each section checked itself already); file checks are :meth:`check_files`."""
        try:
            model = self.model_config()
        except (ValueError, TypeError) as exc:
            raise ValueError(f"invalid `model` section: {exc}") from exc
        _check_token_ids(model)
        self.parallelism.check_model(model)
        self.train.check_batches(self.parallelism)
        self.train.check_exit_schedule_layout(self.parallelism, model)
        data, train = self.data, self.train
        need(data.seq_len <= model.max_position_embeddings,
              f"`data.seq_len`={data.seq_len} exceeds model.max_position_embeddings={model.max_position_embeddings}")
        if train.freeze_backbone:
            need(model.num_exits > 0, "`train.freeze_backbone` is true but the model has no exits to train")
        size = self.model.exit_vocab_size
        if size is not None:
            need(model.num_exits > 0, f"`model.exit_vocab_size`={size} but the model has no exits")
            need(size <= model.vocab_size, f"`model.exit_vocab_size`={size} exceeds vocab_size={model.vocab_size}")
        self._check_export_generation(model)
        need(not model.exit_gate or train.freeze_backbone,
              "`model.exit_gate` needs `train.freeze_backbone: true` in this trainer: the gates learn to predict the "
              "frozen final head's token")
        if train.val_interval > 0:
            need(data.has_validation,
                  f"`train.val_interval`={train.val_interval} needs a validation set: set "
                  "`data.validation_fraction` or `data.validation_sequences`")
        if data.train_bpe is not None:
            need(data.train_bpe.vocab_size <= model.vocab_size,
                  f"`data.tokenizer.train_bpe.vocab_size`={data.train_bpe.vocab_size} exceeds "
                  f"model.vocab_size={model.vocab_size}")

    def _check_export_generation(self, model: Any) -> None:
        if not self.export_generation:
            return
        from eellm_hf.modeling.early_exit_settings import EARLY_EXIT_GENERATION_KEYS, EarlyExitSettings

        unknown = [key for key in self.export_generation if key not in EARLY_EXIT_GENERATION_KEYS]
        if unknown:
            raise ValueError(f"unknown key `export_generation.{unknown[0]}`; allowed: "
                             f"{', '.join(sorted(EARLY_EXIT_GENERATION_KEYS))}")
        try:
            EarlyExitSettings.resolve(model, self.export_generation)
        except ValueError as exc:
            raise ValueError(f"`export_generation`: {exc}") from exc

    def check_files(self) -> None:
        """The data files, and the tokenizer (unless it is trained or converted later), exist and fit the model."""
        data = self.data
        missing = [str(f) for f in data.files if not f.is_file() and str(f) not in data.builtin_files]
        if missing:
            raise FileNotFoundError(f"`data.files`: missing data files: {', '.join(missing)}")
        empty = [str(f) for f in data.files if f.is_file() and f.stat().st_size == 0]
        need(not empty, f"`data.files`: empty data files (0 bytes): {', '.join(empty)}")
        from eellm_hf.modeling.sources import resolve_source

        from .init_model import converted_dir

        if self.model.converts and data.tokenizer == converted_dir(self.run_dir):
            need(resolve_source(self.model.init_from).has_tokenizer(),
                  f"`model.init_from` {self.model.init_from} has no tokenizer: set `data.tokenizer`")
        elif data.train_bpe is None or is_tokenizer_dir(data.tokenizer):
            check_tokenizer(data.tokenizer, self.model_config().vocab_size)

    def model_config(self) -> EarlyExitGPTConfig:
        """The model's ``EarlyExitGPTConfig``: from the ``model`` fields, or ``init_from``'s config with the
        fields as overrides."""
        from eellm_hf.modeling.configuration_early_exit_gpt import EarlyExitGPTConfig

        if self.model.init_from is None:
            return EarlyExitGPTConfig(**self.model.fields)
        if self.model.converts:
            from eellm_hf.modeling.convert import backbone_fields

            return EarlyExitGPTConfig(**{**backbone_fields(self.model.pretrained_config()), **self.model.fields})
        base = EarlyExitGPTConfig.from_pretrained(str(self.model.init_from))
        merged = base.to_dict()
        merged.update(self.model.fields)
        return EarlyExitGPTConfig.from_dict(merged)

    def to_dict(self) -> dict[str, Any]:
        """A plain dict (absolute paths as strings) that :func:`load_config` accepts again; for saving the
        resolved config to the run directory (``yaml.safe_dump``)."""
        out: dict[str, Any] = {"model": dict(self.model.fields)}
        if self.model.init_from is not None:
            out["model"]["init_from"] = str(self.model.init_from)
        if self.model.exit_vocab_size is not None:  # the shortlist it chose from the data (if yet) is derived
            out["model"].pop("exit_vocab", None)
            out["model"]["exit_vocab_size"] = self.model.exit_vocab_size
        out["parallelism"] = _plain(self.parallelism)
        data = _plain(self.data)
        spec = data.pop("train_bpe")
        builtins = data.pop("builtin_files")
        data["files"] = [f"builtin:{builtins[f]}" if f in builtins else f for f in data["files"]]
        if spec is not None:
            data["tokenizer"] = {"train_bpe": spec}
        out["data"] = data
        out["train"] = _plain(self.train)
        if self.checkpoint is not None:
            out["checkpoint"] = _plain(self.checkpoint)
        out["run_dir"] = str(self.run_dir)
        if self.export_hf is not None:
            out["export_hf"] = str(self.export_hf)
        if self.export_generation:
            out["export_generation"] = dict(self.export_generation)
        return out

    def fingerprint(self) -> str:
        """Hash of what a resumed run must not change: the model section, the data order and split
        (``seq_len``, ``shuffle_seed``, validation split), ``global_batch_size``, ``seed`` and ``dtype``.
        Step counts, learning rates, intervals, paths and the parallel layout (checked separately) may change."""
        data = self.data
        key = {
            "model": self.to_dict()["model"] | ({"init_from": Path(self.model.init_from).name}
                                                if self.model.init_from else {}),
            "data": [data.seq_len, data.shuffle_seed, data.validation_fraction, data.validation_sequences],
            "train": [self.train.global_batch_size, self.train.seed, self.train.dtype],
        }
        return hashlib.sha256(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _plain(obj: Any) -> Any:
    if dataclasses.is_dataclass(obj):
        return {f.name: _plain(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, Path):
        return str(obj)
    if isinstance(obj, list):
        return [_plain(x) for x in obj]
    return obj



def _bundled_models() -> Any:
    from eellm_hf.modeling.sources import BUNDLED_MODELS

    return BUNDLED_MODELS


def _check_token_ids(model: Any) -> None:
    for name in ("pad_token_id", "bos_token_id", "eos_token_id"):
        for token_id in _as_id_list(getattr(model, name, None)):
            need(is_int(token_id) and 0 <= token_id < model.vocab_size,
                  f"model.{name}={getattr(model, name)!r} is outside the vocabulary [0, vocab_size="
                  f"{model.vocab_size})")


def _as_id_list(value: Any) -> list[Any]:
    """A token-id field (``eos_token_id`` may be a list) as a list; [] when unset."""
    if value is None:
        return []
    return list(value) if isinstance(value, (list, tuple)) else [value]


__all__ = [
    "SHAPE_FIELDS",
    "TIME_BUDGET_CALIBRATION_STEPS",
    "TIME_BUDGET_WARMUP_STEPS",
    "BpeTokenizerSpec",
    "CheckpointConfig",
    "DataConfig",
    "ExitLossWeightSchedule",
    "LayerDropout",
    "ModelSection",
    "ParallelismConfig",
    "TrainConfig",
    "TrainerConfig",
]
