"""Trainer configuration: one YAML file → validated dataclasses, checked before any process-group work.

Usage::

    cfg = load_config("configs/tiny_cpu.yaml", world_size=int(os.environ["WORLD_SIZE"]))
    model_config = cfg.model_config()            # an EarlyExitGPTConfig
    cfg.parallelism.stage_layers(model_config)   # decoder layers per pipeline stage (as the trainer splits them)
    cfg.train.lr_at(step, total_steps)           # learning rate of optimizer step `step` (0-based)
    cfg.train.exit_loss_weights_at(step, model_config.exit_loss_weights)
    cfg.fingerprint()                            # hash stored in checkpoints, compared on resume

:func:`load_config` raises ``ValueError`` (bad value; the message names the key, e.g. ``train.lr``) or
``FileNotFoundError`` (missing data file, tokenizer or ``init_from`` folder) for every problem it can see up
front, so that a bad config fails on every rank in the first second instead of deep inside a collective.

Relative paths (``data.files``, ``data.tokenizer``, ``data.cache_dir``, ``model.init_from``,
``checkpoint.dir``, ``run_dir``, ``export_hf``) are resolved against the directory of the YAML file (for a
dict: against ``base_dir``, default the current directory); ``~`` is expanded. All paths in the result are
absolute.

YAML layout (defaults in brackets; only the keys without a default are required)::

    model:                  # EarlyExitGPTConfig fields (vocab_size, hidden_size, ..., exit_layers,
                            # exit_loss_weights, exit_norm, exit_mlp, exit_block, tie_exit_heads, ...)
      init_from: HF_DIR     # OR start from a checkpoint's weights (see eellm_hf.trainer.init_model): an
                            # EarlyExitGPT folder (e.g. from eellm-convert), whose config the other model keys
                            # override, except the ones that change the parameter shapes (SHAPE_FIELDS), which
                            # must be left out or equal; or a pretrained Llama / Mistral / Qwen2 checkpoint (a
                            # folder, a .gguf file, or smollm2-135m) converted on the fly with the exits the
                            # model keys give (exit_layers required; backbone shape keys not allowed)
    parallelism:
      tp: 1, pp: 1, dp: 1   # [1 each]; tp*pp*dp must equal the world size
      layer_split: [2, 2]   # [null: cost-balanced split, parallel_model.balanced_layer_split] decoder layers per
                            # pipeline stage
      pp_engine: 1f1b       # [1f1b] | afab (all-forward-all-backward)
      timeout_s: 600        # [600] collective / point-to-point timeout: a dead or hung rank makes every other
                            # rank fail within this time (it also bounds how long the other ranks wait while
                            # rank 0 tokenizes the data at start-up: raise it for a big corpus)
    data:
      files: [corpus.txt]   # .txt / .jsonl / .json / .parquet (see eellm_hf.trainer.data.load_text_dataset),
                            # or builtin:python-stdlib / builtin:kjv (data.BUILTIN_CORPORA, written to run_dir)
      tokenizer: TOKENIZER_DIR                 # a Hugging Face tokenizer folder (default with model.init_from:
                                               # the checkpoint's own tokenizer), or
      # tokenizer: {train_bpe: {vocab_size: 4096, out_dir: DIR, min_frequency: 2}}  trained on `files` by
      #            ensure_tokenizer() when DIR holds no tokenizer yet
      seq_len: 64
      validation_fraction: 0.0 | validation_sequences: null   # [no validation set] at most one of the two
      shuffle_seed: 0, text_field: text, sample_by: line (line|paragraph|document), cache_dir: null
    train:
      steps: 3, global_batch_size: 8 (sequences per optimizer step), micro_batch_size: 2, lr: 1.0e-3
      seed: 0, min_lr: 0.0, warmup_steps: 0, lr_decay: cosine (cosine|linear|constant)
      weight_decay: 0.0, adam_beta1: 0.9, adam_beta2: 0.95, adam_eps: 1.0e-8, grad_clip: 1.0 (null: none)
      skip_nonfinite_steps: 0           # a step whose loss or gradient norm is not finite stops the run (no
                                        # update, no checkpoint of it); N > 0: skip up to N such steps instead
      exit_loss_weight_schedule: null   # or {init: 0.0, warmup_steps: 100, type: linear|cosine}: every exit's
                                        # weight starts at `init` (absolute, >= 0) and reaches its target
                                        # model.exit_loss_weights[i] at warmup_steps; init > target: a cool-down
      layer_dropout: null               # or {max_rate: 0.1, curriculum: constant|exponential}: LayerSkip's
                                        # per-sequence layer skipping while training (see LayerDropout)
      time_budget_minutes: null         # or a time budget: `steps` becomes an upper bound (see TrainConfig)
      exit_temperature: 1.0, freeze_backbone: false, zero_stage: 0 (0|1)
      exit_distillation: 0.0            # w in [0, 1], with freeze_backbone: each exit's loss is
                                        # w * KL(final head || exit) + (1 - w) * CE(labels) (self-distillation)
      val_interval: 0 (0: never), val_batches: null (batches of global_batch_size sequences; null: the whole
      validation set), log_interval: 1 (steps between logged training entries)
      dtype: float32 (float32|bfloat16)
      defer_exit_forward: false         # pp > 1: stages before the last run their exits' forward in the backward
                                        # step (EE-LLM fig. 3c; less activation memory, same gradients)
      fill_bubbles: false               # pp > 1, 1f1b, float32: extra exit-only micro-batches in the 1F1B bubble
      bubble_micro_batches: null        # with fill_bubbles, per DP rank and step (null: as many as the schedule
                                        # model predicts fit); see eellm_hf.trainer.exit_schedule
    checkpoint:             # optional section
      dir: CKPT_DIR, interval: 0 (0: only at the end), resume: false, keep_last: null (null: keep all)
      # resume: true: continue from the newest checkpoint of `dir` that verifies (an error if there is none);
      #         auto: the same when there is a checkpoint, else start from step 0 (it says which it did)
    run_dir: RUN_DIR
    export_hf: HF_OUT_DIR   # optional: save the trained model there with save_pretrained
    export_generation:      # optional: early-exit settings the export's generation_config.json carries
      early_exit_threshold: 0.9, exit_confidence: max_prob (max_prob|top2_margin|gate), active_exits: null

Tensor parallelism needs ``num_attention_heads``, ``num_key_value_heads`` and ``intermediate_size`` divisible by
``tp``; the vocabulary need not be (the parallel model pads it to a multiple of ``tp``, ``padded_vocab_size``).

Pipeline constraint: nanotron's 1F1B engine asserts ``nb_microbatches >= pp - 1`` where ``nb_microbatches =
global_batch_size / (dp * micro_batch_size)``; that exact condition is what is checked (``afab`` has no
constraint). Fewer than ``pp`` micro-batches is allowed but leaves the pipeline mostly idle.
"""

from __future__ import annotations

import dataclasses
import difflib
import hashlib
import json
import math
import os
import re
import types
import typing
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Literal, Union

import yaml

if typing.TYPE_CHECKING:
    from eellm_hf.modeling.configuration_early_exit_gpt import EarlyExitGPTConfig

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
    "ensure_tokenizer",
    "load_config",
]

SHAPE_FIELDS = (
    "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
    "num_key_value_heads", "head_dim", "hidden_act", "tie_word_embeddings", "attention_bias", "mlp_bias",
    "exit_layers", "exit_norm", "exit_mlp", "exit_block", "exit_gate", "tie_exit_heads",
)
"""Model fields that `init_from` configs may not change (they define the parameters to load)."""

TIME_BUDGET_WARMUP_STEPS = 1
"""``train.time_budget_minutes``: steps run before the step time is measured (start-up costs, not timed)."""
TIME_BUDGET_CALIBRATION_STEPS = 4
"""``train.time_budget_minutes``: steps after which the total is fixed (the warm-up steps, then the timed ones)."""


class _YamlLoader(yaml.SafeLoader):
    """``yaml.SafeLoader`` that also reads ``1e-3`` (exponent without a dot) as a float, as YAML 1.2 does."""


_YamlLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*)(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"),
    list("-+0123456789"),
)

EARLY_EXIT_GENERATION_KEYS = ("early_exit_threshold", "exit_confidence", "active_exits", "max_recompute_tokens")
"""``export_generation`` keys (as ``eellm_hf.modeling.generation_early_exit.EARLY_EXIT_GENERATION_KEYS``; not
imported, so that reading a config does not import transformers)."""
_TOP_LEVEL = ("model", "parallelism", "data", "train", "checkpoint", "run_dir", "export_hf", "export_generation")
_EXTRA_MODEL_KEYS = ("rope_theta", "rope_scaling")  # accepted by EarlyExitGPTConfig, folded into rope_parameters


# ------------------------------------------------------------------------------------------------------------
# Sections
# ------------------------------------------------------------------------------------------------------------


@dataclasses.dataclass
class ModelSection:
    """``model:``. ``fields`` are EarlyExitGPTConfig keyword arguments (overrides when ``init_from`` is set)."""

    fields: dict[str, Any]
    init_from: Path | str | None = None  # a folder, a .gguf file, or a bundled model's name (kept as a string)
    _pretrained_config: Any = dataclasses.field(default=None, init=False, repr=False, compare=False)

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

    @property
    def world_size(self) -> int:
        return self.tp * self.pp * self.dp

    def stage_layers(self, model_config: Any, frozen_backbone: bool = False) -> list[int]:
        """Number of decoder layers of each pipeline stage, exactly as the trainer splits them
        (:func:`eellm_hf.trainer.parallel_model.make_layout`): ``layer_split``, else the cost-balanced split that
        counts each exit head on its layer's stage and the final head on the last stage.
        ``model_config``: the model's ``EarlyExitGPTConfig`` (:meth:`TrainerConfig.model_config`);
        ``frozen_backbone``: ``train.freeze_backbone`` (EE-Tuning weighs the exits more)."""
        from eellm_hf.trainer.parallel_model import make_layout  # imports torch/nanotron: only when needed

        return list(make_layout(model_config, self.pp, self.layer_split, frozen_backbone).layer_split)

    def stage_of_layer(self, layer: int, model_config: Any) -> int:
        """Pipeline stage (0-based) holding decoder layer ``layer`` (1-based, as in ``exit_layers``)."""
        end = 0
        for stage, count in enumerate(self.stage_layers(model_config)):
            end += count
            if layer <= end:
                return stage
        raise ValueError(f"layer {layer} is outside [1, {model_config.num_hidden_layers}]")


@dataclasses.dataclass
class BpeTokenizerSpec:
    """``data.tokenizer: {train_bpe: {...}}``: a byte-level BPE tokenizer trained on ``data.files``."""

    vocab_size: int
    out_dir: Path
    min_frequency: int = 2


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

    @property
    def validation(self) -> float | int:
        """The ``val`` argument of ``data.train_val_split``: a row count or a fraction (0.0: none)."""
        return self.validation_sequences if self.validation_sequences is not None else self.validation_fraction

    @property
    def has_validation(self) -> bool:
        return bool(self.validation)


@dataclasses.dataclass
class ExitLossWeightSchedule:
    """``train.exit_loss_weight_schedule`` (EE-LLM's ``--exit-layer-weight-init``, ``--exit-layer-weight-warmup-
    iters``, ``--exit-layer-weight-warmup-style``): every exit's loss weight starts at ``init`` (an absolute
    weight, the same for every exit) at step 0 and moves to that exit's target ``model.exit_loss_weights[i]``
    over ``warmup_steps`` optimizer steps (``linear``, or ``cosine``: slow at both ends), then stays at the
    target. ``init`` above a target gives a cool-down, below it a warm-up."""

    init: float = 0.0
    warmup_steps: int = 0
    type: Literal["linear", "cosine"] = "linear"

    def progress(self, step: int) -> float:
        """How far along the schedule step ``step`` (0-based) is: 0 at step 0, 1 from ``warmup_steps`` on."""
        if self.warmup_steps <= 0 or step >= self.warmup_steps:
            return 1.0
        progress = max(step, 0) / self.warmup_steps
        if self.type == "cosine":
            progress = 0.5 * (1.0 - math.cos(math.pi * progress))
        return progress

    def weight_at(self, step: int, target: float) -> float:
        """The weight at ``step`` of an exit whose target weight is ``target``."""
        progress = self.progress(step)
        if progress >= 1.0:
            return float(target)
        return self.init + (float(target) - self.init) * progress


@dataclasses.dataclass
class LayerDropout:
    """``train.layer_dropout`` (LayerSkip's layer dropout, Elhoushi et al. 2024): while training, each sequence
    skips decoder layer ``l`` (1-based, of ``L``) with probability ``p_l(t) = S(t) * D(l) * max_rate``: the skipped
    layer passes its input through unchanged (no rescaling; exits after it still compute). ``D(l) = 2 ** ((l - 1)
    / (L - 1)) - 1`` rises from 0 (the first layer is never skipped) to 1 (the last layer). ``S(t)`` is 1
    (``curriculum: constant``) or ``2 ** (t / (T - 1)) - 1`` (``exponential``: 0 at the first of the ``T`` steps, 1
    at the last). Validation, evaluation and exported models run every layer."""

    max_rate: float = 0.1
    curriculum: Literal["constant", "exponential"] = "constant"

    def rates_at(self, step: int, total_steps: int, num_layers: int) -> list[float]:
        """Skip probability of each decoder layer (1..``num_layers``) at optimizer step ``step`` (0-based)."""
        if self.curriculum == "exponential":
            scale = 2.0 ** (min(max(step, 0), total_steps - 1) / (total_steps - 1)) - 1.0 if total_steps > 1 else 1.0
        else:
            scale = 1.0
        if num_layers == 1:
            return [0.0]
        return [scale * self.max_rate * (2.0 ** (layer / (num_layers - 1)) - 1.0) for layer in range(num_layers)]


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
    defer_exit_forward: bool = False
    fill_bubbles: bool = False
    bubble_micro_batches: int | None = None

    def __post_init__(self) -> None:
        """The exit-schedule options (:mod:`eellm_hf.trainer.exit_schedule`); the checks that need the parallel
        layout are in :func:`load_config`."""
        for name in ("defer_exit_forward", "fill_bubbles"):
            _need(isinstance(getattr(self, name), bool), f"`train.{name}` must be true or false, got "
                  f"{getattr(self, name)!r}")
            _need(not (getattr(self, name) and self.freeze_backbone),
                  f"`train.{name}` does not apply with `train.freeze_backbone: true`: EE-Tuning's step has no "
                  "pipeline backward (its exits already run after the backbone forward, see ee_tuning)")
        count = self.bubble_micro_batches
        _need(count is None or (isinstance(count, int) and not isinstance(count, bool) and count >= 1),
              f"`train.bubble_micro_batches` must be an integer >= 1 (or null), got {count!r}")
        _need(count is None or self.fill_bubbles,
              f"`train.bubble_micro_batches`={count} needs `train.fill_bubbles: true`")
        _need(not self.fill_bubbles or self.dtype == "float32",
              f"`train.fill_bubbles` needs `train.dtype: float32`, got {self.dtype!r} (the exit-only micro-batches' "
              "gradients bypass the fp32 gradient accumulator of low-precision training)")

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


# ------------------------------------------------------------------------------------------------------------
# Generic section parsing (type checks from the dataclass annotations)
# ------------------------------------------------------------------------------------------------------------


def _check_keys(where: str, mapping: Any, allowed: Sequence[str]) -> dict[str, Any]:
    if mapping is None:
        mapping = {}
    if not isinstance(mapping, Mapping):
        raise ValueError(f"`{where}` must be a mapping, got {type(mapping).__name__}: {mapping!r}")
    for key in mapping:
        if key not in allowed:
            close = difflib.get_close_matches(str(key), list(allowed), n=1)
            hint = f" (did you mean `{close[0]}`?)" if close else ""
            raise ValueError(f"unknown key `{where}.{key}`{hint}; allowed: {', '.join(sorted(allowed))}")
    return dict(mapping)


def _convert(name: str, value: Any, hint: Any, base_dir: Path) -> Any:
    origin = typing.get_origin(hint)
    if origin in (Union, types.UnionType):
        args = typing.get_args(hint)
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        if len(inner) == 2 and bool in inner:  # `bool | Literal[...]`, e.g. checkpoint.resume: true|false|auto
            (choices,) = [typing.get_args(a) for a in inner if a is not bool]
            if not isinstance(value, bool) and value not in choices:
                raise ValueError(f"`{name}` must be true, false or {', '.join(map(str, choices))}; got {value!r}")
            return value
        (inner_hint,) = inner
        return _convert(name, value, inner_hint, base_dir)
    if origin is Literal:
        choices = typing.get_args(hint)
        if value not in choices or isinstance(value, bool):
            raise ValueError(f"`{name}` must be one of {', '.join(map(str, choices))}; got {value!r}")
        return value
    if origin is list:
        if not isinstance(value, (list, tuple)):
            raise ValueError(f"`{name}` must be a list, got {value!r}")
        (inner,) = typing.get_args(hint)
        return [_convert(f"{name}[{i}]", v, inner, base_dir) for i, v in enumerate(value)]
    if hint is bool:
        if not isinstance(value, bool):
            raise ValueError(f"`{name}` must be true or false, got {value!r}")
        return value
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ValueError(f"`{name}` must be an integer, got {value!r}")
        return value
    if hint is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise ValueError(f"`{name}` must be a finite number, got {value!r}")
        return float(value)
    if hint is str:
        if not isinstance(value, str):
            raise ValueError(f"`{name}` must be a string, got {value!r}")
        return value
    if hint is Path:
        return _resolve(name, value, base_dir)
    raise TypeError(f"unsupported annotation {hint!r} for {name}")  # pragma: no cover


def _resolve(name: str, value: Any, base_dir: Path) -> Path:
    if not isinstance(value, (str, os.PathLike)) or not str(value):
        raise ValueError(f"`{name}` must be a path, got {value!r}")
    path = Path(value).expanduser()
    return (path if path.is_absolute() else base_dir / path).resolve()


def _build(cls: type, where: str, mapping: Any, base_dir: Path, skip: Sequence[str] = ()) -> Any:
    fields = {f.name: f for f in dataclasses.fields(cls) if f.name not in skip}
    values = _check_keys(where, mapping, list(fields))
    hints = typing.get_type_hints(cls)
    kwargs: dict[str, Any] = {}
    for name, field in fields.items():
        if name in values:
            kwargs[name] = _convert(f"{where}.{name}", values[name], hints[name], base_dir)
        elif field.default is dataclasses.MISSING and field.default_factory is dataclasses.MISSING:
            raise ValueError(f"missing required key `{where}.{name}`")
    return kwargs


def _need(condition: bool, message: str) -> None:
    if not condition:
        raise ValueError(message)


# ------------------------------------------------------------------------------------------------------------
# Loading and validation
# ------------------------------------------------------------------------------------------------------------


def load_config(
    path_or_dict: str | os.PathLike[str] | Mapping[str, Any],
    world_size: int | None = None,
    *,
    check_files: bool = True,
    base_dir: str | os.PathLike[str] | None = None,
) -> TrainerConfig:
    """Read and validate a trainer config (a YAML file or an already-parsed dict).

    ``world_size``: the number of processes (``tp * pp * dp`` must match); None skips that check.
    ``check_files``: check that data files, the tokenizer and ``init_from`` exist (False only for configs
    validated away from their data, e.g. GPU configs in tests). ``base_dir``: the directory relative paths of
    a dict are resolved against (default: current directory; a YAML file's own directory otherwise).
    """
    source: Path | None = None
    if isinstance(path_or_dict, Mapping):
        raw = dict(path_or_dict)
        base = Path(base_dir if base_dir is not None else os.getcwd()).expanduser().resolve()
    else:
        source = Path(path_or_dict).expanduser().resolve()
        if not source.is_file():
            raise FileNotFoundError(f"config file not found: {source}")
        with open(source, encoding="utf-8") as f:
            raw = yaml.load(f, Loader=_YamlLoader)  # noqa: S506 (a SafeLoader)
        if not isinstance(raw, Mapping):
            raise ValueError(f"{source}: the config must be a YAML mapping, got {type(raw).__name__}")
        base = Path(base_dir).expanduser().resolve() if base_dir is not None else source.parent
    raw = _check_keys("config", raw, _TOP_LEVEL)
    for key in ("model", "data", "train", "run_dir"):
        if raw.get(key) is None:
            raise ValueError(f"missing required section `{key}`")

    model = _parse_model(raw["model"], base)
    parallelism = ParallelismConfig(**_build(ParallelismConfig, "parallelism", raw.get("parallelism"), base))
    run_dir = _resolve("run_dir", raw["run_dir"], base)
    data = _parse_data(raw["data"], base, run_dir, default_tokenizer=_model_tokenizer(model, run_dir))
    train = _parse_train(raw["train"], base)
    checkpoint = None
    if raw.get("checkpoint") is not None:
        checkpoint = CheckpointConfig(**_build(CheckpointConfig, "checkpoint", raw["checkpoint"], base))
    cfg = TrainerConfig(
        model=model,
        parallelism=parallelism,
        data=data,
        train=train,
        run_dir=run_dir,
        checkpoint=checkpoint,
        export_hf=None if raw.get("export_hf") is None else _resolve("export_hf", raw["export_hf"], base),
        export_generation=dict(_check_keys("export_generation", raw.get("export_generation") or {},
                                           EARLY_EXIT_GENERATION_KEYS)),
        source=source,
    )
    _validate(cfg, world_size, check_files)
    return cfg


def _parse_model(section: Any, base: Path) -> ModelSection:
    from eellm_hf.modeling.configuration_early_exit_gpt import EarlyExitGPTConfig

    allowed = [*EarlyExitGPTConfig.__annotations__, *_EXTRA_MODEL_KEYS, "init_from"]
    fields = _check_keys("model", section, allowed)
    from eellm_hf.modeling.sources import BUNDLED_MODELS

    init_from = fields.pop("init_from", None)
    if init_from is not None and not (isinstance(init_from, str) and init_from in BUNDLED_MODELS):
        init_from = _resolve("model.init_from", init_from, base)
    return ModelSection(fields=fields, init_from=init_from)


def _model_tokenizer(model: ModelSection, run_dir: Path) -> Path | None:
    """The default ``data.tokenizer``: the ``init_from`` checkpoint's own (its converted folder's), if any."""
    from .init_model import converted_dir

    if model.init_from is None:
        return None
    return converted_dir(run_dir) if model.converts else Path(model.init_from)


def _builtin_files(files: Any, run_dir: Path) -> tuple[Any, dict[str, str]]:
    """``data.files`` with each ``builtin:NAME`` replaced by the run's file of that corpus, and those files."""
    from .data import BUILTIN_CORPORA, BUILTIN_PREFIX, builtin_corpus_file

    if not isinstance(files, list):
        return files, {}
    resolved, builtins = [], {}
    for entry in files:
        if isinstance(entry, str) and entry.startswith(BUILTIN_PREFIX):
            name = entry[len(BUILTIN_PREFIX):]
            _need(name in BUILTIN_CORPORA,
                  f"`data.files` entry {entry!r}: unknown built-in corpus, choose from {', '.join(BUILTIN_CORPORA)}")
            entry = str(builtin_corpus_file(run_dir, name))
            builtins[entry] = name
        resolved.append(entry)
    return resolved, builtins


def _parse_data(section: Any, base: Path, run_dir: Path, default_tokenizer: Path | None = None) -> DataConfig:
    section = _check_keys("data", section, [f.name for f in dataclasses.fields(DataConfig)
                                            if f.name not in ("train_bpe", "builtin_files")])
    section["files"], builtins = _builtin_files(section.get("files"), run_dir)
    tokenizer = section.pop("tokenizer", None)
    if tokenizer is None:
        if default_tokenizer is None:
            raise ValueError("missing required key `data.tokenizer` (it defaults to model.init_from's tokenizer "
                             "only when model.init_from is set)")
        tokenizer = default_tokenizer
    spec = None
    if isinstance(tokenizer, Mapping):
        spec_raw = _check_keys("data.tokenizer", tokenizer, ["train_bpe"])
        if "train_bpe" not in spec_raw:
            raise ValueError("`data.tokenizer` must be a folder or {train_bpe: {vocab_size, out_dir}}")
        spec = BpeTokenizerSpec(**_build(BpeTokenizerSpec, "data.tokenizer.train_bpe", spec_raw["train_bpe"], base))
        _need(spec.vocab_size >= 258, f"`data.tokenizer.train_bpe.vocab_size` must be >= 258, got {spec.vocab_size}")
        _need(spec.min_frequency >= 1, "`data.tokenizer.train_bpe.min_frequency` must be >= 1, got "
              f"{spec.min_frequency}")
        tokenizer_dir = spec.out_dir
    else:
        tokenizer_dir = _resolve("data.tokenizer", tokenizer, base)
    kwargs = _build(DataConfig, "data", {**section, "tokenizer": str(tokenizer_dir)}, base,
                    skip=("train_bpe", "builtin_files"))
    data = DataConfig(**kwargs, train_bpe=spec, builtin_files=builtins)
    _need(len(data.files) > 0, "`data.files` must list at least one file")
    _need(data.seq_len >= 1, f"`data.seq_len` must be >= 1, got {data.seq_len}")
    _need(0.0 <= data.validation_fraction < 1.0,
          f"`data.validation_fraction` must be in [0, 1), got {data.validation_fraction}")
    if data.validation_sequences is not None:
        _need(data.validation_sequences >= 0,
              f"`data.validation_sequences` must be >= 0, got {data.validation_sequences}")
        _need(data.validation_fraction == 0.0,
              "set only one of `data.validation_fraction` and `data.validation_sequences`, got "
              f"{data.validation_fraction} and {data.validation_sequences}")
    return data


def _parse_train(section: Any, base: Path) -> TrainConfig:
    section = _check_keys("train", section, [f.name for f in dataclasses.fields(TrainConfig)])
    schedule_raw = section.pop("exit_loss_weight_schedule", None)
    dropout_raw = section.pop("layer_dropout", None)
    kwargs = _build(TrainConfig, "train", section, base, skip=("exit_loss_weight_schedule", "layer_dropout"))
    schedule = None
    if schedule_raw is not None:
        where = "train.exit_loss_weight_schedule"
        schedule = ExitLossWeightSchedule(**_build(ExitLossWeightSchedule, where, schedule_raw, base))
        _need(schedule.init >= 0.0, f"`{where}.init` must be >= 0, got {schedule.init}")
        _need(schedule.warmup_steps >= 0, f"`{where}.warmup_steps` must be >= 0, got {schedule.warmup_steps}")
    layer_dropout = None
    if dropout_raw is not None:
        where = "train.layer_dropout"
        layer_dropout = LayerDropout(**_build(LayerDropout, where, dropout_raw, base))
        _need(0.0 <= layer_dropout.max_rate < 1.0,
              f"`{where}.max_rate` must be in [0, 1), got {layer_dropout.max_rate}")
    train = TrainConfig(**kwargs, exit_loss_weight_schedule=schedule, layer_dropout=layer_dropout)
    for name in ("steps", "global_batch_size", "micro_batch_size", "log_interval"):
        value = getattr(train, name)
        _need(value >= 1, f"`train.{name}` must be a positive integer, got {value}")
    _need(train.lr > 0, f"`train.lr` must be > 0, got {train.lr}")
    _need(0 <= train.min_lr <= train.lr, f"`train.min_lr` must be in [0, train.lr={train.lr}], got {train.min_lr}")
    _need(0 <= train.warmup_steps <= train.steps,
          f"`train.warmup_steps` must be in [0, train.steps={train.steps}], got {train.warmup_steps}")
    _need(train.weight_decay >= 0, f"`train.weight_decay` must be >= 0, got {train.weight_decay}")
    for name in ("adam_beta1", "adam_beta2"):
        _need(0 <= getattr(train, name) < 1, f"`train.{name}` must be in [0, 1), got {getattr(train, name)}")
    _need(train.adam_eps > 0, f"`train.adam_eps` must be > 0, got {train.adam_eps}")
    _need(train.grad_clip is None or train.grad_clip > 0,
          f"`train.grad_clip` must be > 0 (or null for no clipping), got {train.grad_clip}")
    _need(train.exit_temperature > 0, f"`train.exit_temperature` must be > 0, got {train.exit_temperature}")
    _need(0.0 <= train.exit_distillation <= 1.0,
          f"`train.exit_distillation` must be in [0, 1], got {train.exit_distillation}")
    _need(train.exit_distillation == 0.0 or train.freeze_backbone,
          f"`train.exit_distillation`={train.exit_distillation} needs `train.freeze_backbone: true` (the final "
          "head is the teacher of the exits only while the backbone is frozen)")
    _need(train.val_interval >= 0, f"`train.val_interval` must be >= 0 (0: never), got {train.val_interval}")
    _need(train.val_batches is None or train.val_batches >= 1,
          f"`train.val_batches` must be >= 1 (or null for all), got {train.val_batches}")
    _need(train.skip_nonfinite_steps >= 0,
          f"`train.skip_nonfinite_steps` must be >= 0 (0: stop at the first), got {train.skip_nonfinite_steps}")
    _need(train.time_budget_minutes is None or train.time_budget_minutes > 0,
          f"`train.time_budget_minutes` must be > 0 (or null for no budget), got {train.time_budget_minutes}")
    return train


def _validate(cfg: TrainerConfig, world_size: int | None, check_files: bool) -> None:
    par, train, data = cfg.parallelism, cfg.train, cfg.data
    for name in ("tp", "pp", "dp"):
        _need(getattr(par, name) >= 1, f"`parallelism.{name}` must be >= 1, got {getattr(par, name)}")
    _need(par.timeout_s > 0, f"`parallelism.timeout_s` must be > 0, got {par.timeout_s}")
    if world_size is not None:
        _need(par.world_size == world_size,
              f"parallelism tp*pp*dp = {par.tp}*{par.pp}*{par.dp} = {par.world_size} does not match the world "
              f"size {world_size} (number of processes)")

    if cfg.model.init_from is not None:
        _check_init_from(cfg.model)
    try:
        model = cfg.model_config()
    except (ValueError, TypeError) as exc:
        raise ValueError(f"invalid `model` section: {exc}") from exc

    for name in ("pad_token_id", "bos_token_id", "eos_token_id"):
        for token_id in _as_id_list(getattr(model, name, None)):
            _need(isinstance(token_id, int) and not isinstance(token_id, bool) and 0 <= token_id < model.vocab_size,
                  f"model.{name}={getattr(model, name)!r} is outside the vocabulary [0, vocab_size="
                  f"{model.vocab_size})")

    layers = model.num_hidden_layers
    if par.layer_split is not None:
        split = par.layer_split
        _need(len(split) == par.pp,
              f"`parallelism.layer_split` {split} must have pp={par.pp} entries (one per pipeline stage)")
        _need(all(n >= 1 for n in split), f"`parallelism.layer_split` {split} has an entry < 1 (an empty stage)")
        _need(sum(split) == layers,
              f"`parallelism.layer_split` {split} sums to {sum(split)}, not num_hidden_layers={layers}")
    else:  # the trainer's cost-balanced split (balanced_layer_split) gives every stage >= 1 layer
        _need(layers >= par.pp, f"num_hidden_layers={layers} cannot be split over pp={par.pp} pipeline stages")
    # vocab_size need not divide: the parallel model pads the vocabulary to a multiple of tp (padded_vocab_size)
    for name in ("num_attention_heads", "num_key_value_heads", "intermediate_size"):
        value = getattr(model, name)
        _need(value % par.tp == 0, f"model.{name}={value} is not divisible by parallelism.tp={par.tp}")

    per_step = par.dp * train.micro_batch_size
    _need(train.global_batch_size % per_step == 0,
          f"`train.global_batch_size`={train.global_batch_size} is not divisible by dp*micro_batch_size="
          f"{par.dp}*{train.micro_batch_size}={per_step}")
    n_micro = train.num_micro_batches(par.dp)
    if par.pp_engine == "1f1b":
        _need(n_micro >= par.pp - 1,
              f"{n_micro} micro-batches per step (global_batch_size / (dp*micro_batch_size)) is fewer than "
              f"pp-1={par.pp - 1}, which nanotron's 1F1B pipeline engine requires: raise "
              f"`train.global_batch_size` or lower `train.micro_batch_size`")

    _check_exit_schedule(train, par, model)

    _need(data.seq_len <= model.max_position_embeddings,
          f"`data.seq_len`={data.seq_len} exceeds model.max_position_embeddings={model.max_position_embeddings}")
    if train.freeze_backbone:
        _need(model.num_exits > 0, "`train.freeze_backbone` is true but the model has no exits to train")
    if cfg.export_generation:
        from eellm_hf.modeling.generation_early_exit import EarlyExitSettings

        try:
            EarlyExitSettings.resolve(model, cfg.export_generation, ())
        except ValueError as exc:
            raise ValueError(f"`export_generation`: {exc}") from exc
    _need(not model.exit_gate or train.freeze_backbone,
          "`model.exit_gate` needs `train.freeze_backbone: true` in this trainer: the gates learn to predict the "
          "frozen final head's token")
    if train.val_interval > 0:
        _need(data.has_validation,
              f"`train.val_interval`={train.val_interval} needs a validation set: set "
              "`data.validation_fraction` or `data.validation_sequences`")
    if cfg.checkpoint is not None:
        ck = cfg.checkpoint
        _need(ck.interval >= 0, f"`checkpoint.interval` must be >= 0 (0: only at the end), got {ck.interval}")
        _need(ck.keep_last is None or ck.keep_last >= 1,
              f"`checkpoint.keep_last` must be >= 1 (or null to keep all), got {ck.keep_last}")

    if data.train_bpe is not None:
        _need(data.train_bpe.vocab_size <= model.vocab_size,
              f"`data.tokenizer.train_bpe.vocab_size`={data.train_bpe.vocab_size} exceeds "
              f"model.vocab_size={model.vocab_size}")
    if check_files:
        missing = [str(f) for f in data.files if not f.is_file() and str(f) not in data.builtin_files]
        if missing:
            raise FileNotFoundError(f"`data.files`: missing data files: {', '.join(missing)}")
        empty = [str(f) for f in data.files if f.is_file() and f.stat().st_size == 0]
        _need(not empty, f"`data.files`: empty data files (0 bytes): {', '.join(empty)}")
        from eellm_hf.modeling.sources import resolve_source

        from .init_model import converted_dir

        if cfg.model.converts and data.tokenizer == converted_dir(cfg.run_dir):
            _need(resolve_source(cfg.model.init_from).has_tokenizer(),
                  f"`model.init_from` {cfg.model.init_from} has no tokenizer: set `data.tokenizer`")
        elif data.train_bpe is None or _is_tokenizer_dir(data.tokenizer):
            _check_tokenizer(data.tokenizer, model.vocab_size)


def _as_id_list(value: Any) -> list[Any]:
    """A token-id field (``eos_token_id`` may be a list) as a list; [] when unset."""
    if value is None:
        return []
    return list(value) if isinstance(value, (list, tuple)) else [value]


def _check_exit_schedule(train: TrainConfig, par: ParallelismConfig, model: Any) -> None:
    """``train.defer_exit_forward`` and ``train.fill_bubbles`` against the layout."""
    for name in ("defer_exit_forward", "fill_bubbles"):
        if getattr(train, name):
            _need(par.pp > 1, f"`train.{name}` needs pipeline parallelism (parallelism.pp > 1), got pp={par.pp}")
            _need(model.num_exits > 0, f"`train.{name}` is true but the model has no exits")
    if train.fill_bubbles:
        _need(par.pp_engine == "1f1b", f"`train.fill_bubbles` needs `parallelism.pp_engine: 1f1b` (its bubbles), got "
              f"{par.pp_engine!r}")
        stages = [par.stage_of_layer(layer, model) for layer in model.exit_layers]
        _need(min(stages) < par.pp - 1,
              f"`train.fill_bubbles`: every exit (layers {list(model.exit_layers)}) is on the last pipeline stage "
              f"(stages {par.stage_layers(model)} layers each), so exit-only micro-batches would run the whole "
              "pipeline: move an exit earlier or change `parallelism.layer_split`")


def _check_init_from(model: ModelSection) -> None:
    folder = model.init_from
    assert folder is not None
    if model.converts:
        _check_conversion(model)
        return
    if not (folder / "config.json").is_file():
        raise FileNotFoundError(f"`model.init_from`: no config.json in {folder}")
    with open(folder / "config.json", encoding="utf-8") as f:
        saved = json.load(f)
    if saved.get("model_type") != "early_exit_gpt":
        raise ValueError(
            f"`model.init_from` {folder} has model_type {saved.get('model_type')!r}, not 'early_exit_gpt': "
            "convert it first with `eellm-convert SRC DST --exit-layers ...`"
        )
    for name in SHAPE_FIELDS:
        if name in model.fields and name in saved and model.fields[name] != saved[name]:
            raise ValueError(
                f"`model.{name}`={model.fields[name]!r} differs from {saved[name]!r} in `model.init_from` "
                f"({folder}); fields that change parameter shapes cannot be overridden"
            )


def _check_conversion(model: ModelSection) -> None:
    """A pretrained checkpoint to convert: it exists, and the model keys only add exits (and non-shape keys)."""
    from eellm_hf.modeling.sources import resolve_source

    from .init_model import EXIT_FIELDS

    try:
        resolve_source(model.init_from)
    except FileNotFoundError as exc:
        raise FileNotFoundError(f"`model.init_from`: {exc}") from None
    _need("exit_layers" in model.fields,
          f"`model.init_from` {model.init_from} is not an EarlyExitGPT folder, so it is converted on the fly: "
          "`model.exit_layers` must say where the exits go")
    backbone = [name for name in SHAPE_FIELDS if name in model.fields and name not in EXIT_FIELDS]
    _need(not backbone, f"`model.{', model.'.join(backbone)}` cannot be set when converting `model.init_from` "
          f"{model.init_from}: the checkpoint defines the backbone's shapes")


def _is_tokenizer_dir(folder: Path) -> bool:
    return folder.is_dir() and any((folder / n).is_file() for n in ("tokenizer.json", "tokenizer_config.json"))


def _check_tokenizer(folder: Path, model_vocab_size: int) -> None:
    if not folder.is_dir():
        raise FileNotFoundError(f"`data.tokenizer`: tokenizer folder not found: {folder}")
    if not _is_tokenizer_dir(folder):
        raise FileNotFoundError(f"`data.tokenizer`: {folder} has no tokenizer.json or tokenizer_config.json")
    size = _tokenizer_size(folder)
    if size is not None and size > model_vocab_size:
        raise ValueError(
            f"`data.tokenizer` {folder} has {size} tokens, more than model.vocab_size={model_vocab_size}"
        )


def _tokenizer_size(folder: Path) -> int | None:
    """Number of ids of a fast tokenizer (read from tokenizer.json without loading transformers), or None."""
    try:
        with open(folder / "tokenizer.json", encoding="utf-8") as f:
            spec = json.load(f)
        vocab = spec["model"]["vocab"]
        ids = set(vocab.values()) if isinstance(vocab, dict) else set(range(len(vocab)))
        ids.update(tok["id"] for tok in spec.get("added_tokens", []))
        return max(ids) + 1 if ids else 0
    except (OSError, KeyError, TypeError, ValueError):
        return None


def ensure_tokenizer(data: DataConfig) -> Path:
    """The tokenizer folder, first training it (``data.train_bpe``) if it does not exist yet.

    Call it on one rank (e.g. global rank 0), then barrier, before every rank loads the tokenizer.
    """
    if data.train_bpe is not None and not _is_tokenizer_dir(data.tokenizer):
        from eellm_hf.trainer.data import train_bpe_tokenizer

        spec = data.train_bpe
        train_bpe_tokenizer(
            [Path(f) for f in data.files], spec.vocab_size, spec.out_dir,
            min_frequency=spec.min_frequency, text_field=data.text_field,
        )
    return data.tokenizer
