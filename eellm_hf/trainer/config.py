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
      autocast: null                    # or bfloat16, with freeze_backbone: EE-Tuning's matmuls run in bf16
                                        # (torch.autocast) while weights, optimizer and export stay fp32
      defer_exit_forward: false         # pp > 1: stages before the last run their exits' forward in the backward
                                        # step (EE-LLM fig. 3c; less activation memory, same gradients)
      fill_bubbles: false               # pp > 1, 1f1b, float32: extra exit-only micro-batches in the 1F1B bubble
      bubble_micro_batches: null        # with fill_bubbles, per DP rank and step (null: as many as the schedule
                                        # model predicts fit); see eellm_hf.trainer.exit_schedule
      prefetch_next_step: true          # EE-Tuning at pp > 1: the first stages start the next step's first
                                        # micro-batch while the last stage finishes a step (same results)
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

The sections are dataclasses that validate themselves (:mod:`.config_schema`), so a config built in Python is
checked like one read from YAML (``ParallelismConfig(tp=0)`` raises ``ValueError``); :mod:`.config_loading` reads
the YAML with dacite; :mod:`.tokenizer_files` checks and trains the tokenizer.

Pipeline constraint: nanotron's 1F1B engine asserts ``nb_microbatches >= pp - 1`` where ``nb_microbatches =
global_batch_size / (dp * micro_batch_size)``; that exact condition is what is checked (``afab`` has no
constraint). Fewer than ``pp`` micro-batches is allowed but leaves the pipeline mostly idle.
"""

from .config_loading import load_config
from .config_schema import (
    TIME_BUDGET_CALIBRATION_STEPS,
    TIME_BUDGET_WARMUP_STEPS,
    BpeTokenizerSpec,
    CheckpointConfig,
    DataConfig,
    ExitLossWeightSchedule,
    LayerDropout,
    ModelSection,
    ParallelismConfig,
    TrainConfig,
    TrainerConfig,
)
from .init_model import SHAPE_FIELDS
from .tokenizer_files import ensure_tokenizer

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
