"""Tests for eellm_hf.trainer.config: the example config loads; each invalid case fails naming the bad value."""

from __future__ import annotations

import copy
import json
import math
from pathlib import Path
from typing import Any

import pytest
import yaml

from eellm_hf.trainer.config import TrainerConfig, load_config

REPO_ROOT = Path(__file__).resolve().parents[1]

EXAMPLE = """
model:
  vocab_size: 512
  hidden_size: 64
  intermediate_size: 128
  num_hidden_layers: 4
  num_attention_heads: 4
  num_key_value_heads: 4
  max_position_embeddings: 128
  exit_layers: [1, 2]
  exit_loss_weights: [0.5, 0.5]
parallelism: {tp: 1, pp: 1, dp: 1}
data: {files: [corpus.txt], tokenizer: tok, seq_len: 64}
train: {steps: 3, global_batch_size: 8, micro_batch_size: 2, lr: 1.0e-3, seed: 0}
checkpoint: {dir: ckpt, interval: 2, resume: false}
run_dir: run
export_hf: hf_out
"""


def _write_tokenizer(folder: Path, size: int = 300) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    vocab = {f"t{i}": i for i in range(size)}
    (folder / "tokenizer.json").write_text(json.dumps({"model": {"type": "BPE", "vocab": vocab}, "added_tokens": []}))


@pytest.fixture()
def workdir(tmp_path: Path) -> Path:
    (tmp_path / "corpus.txt").write_text("In the beginning God created the heaven and the earth.\n")
    _write_tokenizer(tmp_path / "tok")
    (tmp_path / "config.yaml").write_text(EXAMPLE)
    return tmp_path


def _raw() -> dict[str, Any]:
    return yaml.safe_load(EXAMPLE)


def _load(workdir: Path, raw: dict[str, Any], **kwargs: Any) -> TrainerConfig:
    return load_config(raw, base_dir=workdir, **kwargs)


def test_example_loads_with_paths_relative_to_yaml(workdir: Path, tmp_path_factory: pytest.TempPathFactory,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path_factory.mktemp("elsewhere"))  # relative paths follow the YAML, not the cwd
    cfg = load_config(workdir / "config.yaml", world_size=1)
    assert cfg.data.files == [workdir / "corpus.txt"]
    assert cfg.data.tokenizer == workdir / "tok"
    assert cfg.run_dir == workdir / "run" and cfg.export_hf == workdir / "hf_out"
    assert cfg.checkpoint is not None and cfg.checkpoint.dir == workdir / "ckpt" and cfg.checkpoint.interval == 2
    assert cfg.train.lr == pytest.approx(1e-3) and cfg.train.dtype == "float32"
    assert cfg.train.num_micro_batches(cfg.parallelism.dp) == 4
    model = cfg.model_config()
    assert model.exit_layers == [1, 2] and model.exit_loss_weights == [0.5, 0.5]
    assert cfg.parallelism.stage_layers(model) == [4]
    assert cfg.parallelism.timeout_s == 600.0 and cfg.train.time_budget_minutes is None
    # to_dict round-trips, and the fingerprint ignores what a resumed run may change
    again = load_config(cfg.to_dict(), world_size=1)
    assert again.to_dict() == cfg.to_dict() and again.fingerprint() == cfg.fingerprint()
    raw = _raw()
    raw["train"]["steps"] = 30
    raw["train"]["lr"] = 5e-4
    assert _load(workdir, raw).fingerprint() == cfg.fingerprint()
    raw["model"]["hidden_size"] = 128
    assert _load(workdir, raw).fingerprint() != cfg.fingerprint()


def test_optional_features(workdir: Path) -> None:
    raw = _raw()
    raw["parallelism"] = {"tp": 2, "pp": 2, "dp": 1, "layer_split": [3, 1]}
    raw["data"].update(validation_fraction=0.1, tokenizer={"train_bpe": {"vocab_size": 400, "out_dir": "newtok"}})
    raw["train"]["lr"] = "1e-3"  # a string (what plain PyYAML makes of `1e-3`) is rejected
    with pytest.raises(ValueError, match=r"train\.lr.*'1e-3'"):
        _load(workdir, raw, world_size=4)
    raw["train"].update(lr=1e-3, warmup_steps=1, min_lr=1e-4, val_interval=1, dtype="bfloat16",
                        exit_loss_weight_schedule={"init": 0.0, "warmup_steps": 2, "type": "cosine"})
    cfg = _load(workdir, raw, world_size=4)
    assert cfg.data.train_bpe is not None and cfg.data.tokenizer == workdir / "newtok"  # trained later
    model = cfg.model_config()
    assert cfg.parallelism.stage_layers(model) == [3, 1] and cfg.parallelism.stage_of_layer(4, model) == 1
    assert [round(cfg.train.lr_at(s), 6) for s in range(3)] == [1e-3, 1e-3, 1e-4]
    assert cfg.train.exit_loss_weights_at(0, [0.5]) == [0.0]
    assert cfg.train.exit_loss_weights_at(1, [0.5]) == pytest.approx([0.25])
    assert cfg.train.exit_loss_weights_at(5, [0.5]) == [0.5]


def test_exit_weight_schedule_init_is_absolute_and_may_cool_down(workdir: Path) -> None:
    """`init` is the starting weight of every exit (not a factor of its target); each exit moves to its own
    target over warmup_steps; init above a target is a cool-down (EE-LLM's --exit-layer-weight-init)."""
    raw = _raw()
    raw["train"]["exit_loss_weight_schedule"] = {"init": 1.0, "warmup_steps": 4, "type": "linear"}
    raw["model"]["exit_loss_weights"] = [0.2, 1.5]
    train = _load(workdir, raw).train
    weights = [train.exit_loss_weights_at(s, [0.2, 1.5]) for s in range(6)]
    assert weights[0] == [1.0, 1.0]  # the same absolute start for every exit
    assert weights[2] == pytest.approx([0.6, 1.25])  # halfway: exit 1 cooling down, exit 2 warming up
    assert weights[4] == weights[5] == [0.2, 1.5]  # the targets from warmup_steps on
    assert all(a[0] > b[0] and a[1] < b[1] for a, b in zip(weights[:4], weights[1:5], strict=True))
    raw["train"]["exit_loss_weight_schedule"] = {"init": 2.0, "warmup_steps": 4, "type": "cosine"}
    train = _load(workdir, raw).train
    cosine = [train.exit_loss_weights_at(s, [0.5])[0] for s in range(5)]
    assert cosine[0] == 2.0 and cosine[2] == pytest.approx(1.25) and cosine[4] == 0.5
    assert cosine[1] == pytest.approx(2.0 - 1.5 * 0.5 * (1 - math.cos(math.pi / 4)))  # slow start
    raw["train"]["exit_loss_weight_schedule"] = {"init": 0.0, "warmup_steps": 0}  # no warmup: the targets
    assert _load(workdir, raw).train.exit_loss_weights_at(0, [0.2, 1.5]) == [0.2, 1.5]


def test_layer_dropout_rates_follow_layerskip(workdir: Path) -> None:
    """p_l = S(t) * D(l) * max_rate: D rises exponentially from 0 (first layer) to 1 (last layer); S is 1, or 0 at the
    first step rising exponentially to 1 at the last step of the curriculum (the total it is given)."""
    raw = _raw()
    raw["train"]["steps"] = 5
    assert _load(workdir, raw).train.layer_skip_rates_at(0, 4) == [0.0] * 4  # off by default
    raw["train"]["layer_dropout"] = {"max_rate": 0.2}
    train = _load(workdir, raw).train
    expected = [0.2 * (2 ** (i / 3) - 1) for i in range(4)]
    assert train.layer_skip_rates_at(0, 4) == pytest.approx(expected) == train.layer_skip_rates_at(4, 4)
    assert expected[0] == 0.0 and expected[-1] == pytest.approx(0.2)
    raw["train"]["layer_dropout"] = {"max_rate": 0.2, "curriculum": "exponential"}
    train = _load(workdir, raw).train
    assert train.layer_skip_rates_at(0, 4) == [0.0] * 4
    assert train.layer_skip_rates_at(2, 4) == pytest.approx([(2 ** 0.5 - 1) * r for r in expected])
    assert train.layer_skip_rates_at(4, 4) == pytest.approx(expected)
    assert train.layer_skip_rates_at(5, 4, total_steps=11) == pytest.approx([(2 ** 0.5 - 1) * r for r in expected])


def test_layer_keep_mask_is_deterministic_and_matches_the_rates() -> None:
    from eellm_hf.trainer.layer_dropout import layer_keep_mask

    rates = [0.0, 0.1, 0.5, 0.9]
    mask = layer_keep_mask(seed=3, step=7, batch_size=4000, rates=rates)
    assert mask.shape == (4000, 4) and mask.dtype.is_floating_point is False
    assert mask[:, 0].all()  # rate 0: never skipped
    skipped = 1.0 - mask.double().mean(dim=0)
    assert skipped.tolist() == pytest.approx(rates, abs=0.03)
    assert (layer_keep_mask(3, 7, 4000, rates) == mask).all()  # the same on every rank
    assert (layer_keep_mask(3, 7, 8, rates) == mask[:8]).all()  # a row depends on its position only
    assert not (layer_keep_mask(3, 8, 4000, rates) == mask).all()  # a fresh draw each step
    assert not (layer_keep_mask(4, 7, 4000, rates) == mask).all()  # and each seed


def test_time_budget_total_steps(workdir: Path) -> None:
    """steps is an upper bound; the total is what fits in the rest of the budget, at least one more step; the
    learning-rate decay follows the total it is given."""
    raw = _raw()
    raw["train"].update(steps=1000, time_budget_minutes=1.0, warmup_steps=4, min_lr=1e-4)
    train = _load(workdir, raw).train
    assert train.budgeted_total_steps(done=4, elapsed_s=2.0, step_time_s=0.5) == 4 + 116  # (60 - 2) / 0.5
    assert train.budgeted_total_steps(done=4, elapsed_s=2.0, step_time_s=0.01) == 1000  # capped by steps
    assert train.budgeted_total_steps(done=4, elapsed_s=70.0, step_time_s=0.5) == 5  # over budget: one more
    assert train.lr_at(119, 120) == pytest.approx(1e-4) and train.lr_at(119) > 9e-4
    assert [train.lr_at(s, 120) for s in range(4)] == [train.lr_at(s) for s in range(4)]  # warmup: no total


def test_odd_vocab_with_tensor_parallelism_validates(workdir: Path) -> None:
    """The parallel model pads the vocabulary to a multiple of tp, so vocab_size need not divide by tp."""
    raw = _raw()
    raw["model"]["vocab_size"] = 511
    raw["parallelism"] = {"tp": 2}
    cfg = _load(workdir, raw, world_size=2)
    assert cfg.model_config().vocab_size == 511 and cfg.parallelism.tp == 2
    raw["model"]["intermediate_size"] = 129  # what tensor parallelism does need still fails
    with pytest.raises(ValueError, match=r"intermediate_size=129 is not divisible by parallelism\.tp=2"):
        _load(workdir, raw, world_size=2)


def test_stage_layers_default_is_the_trainers_cost_balanced_split(workdir: Path) -> None:
    """Without layer_split, config reports the split the trainer uses (balanced_layer_split), not an even one."""
    from eellm_hf.trainer.parallel_model import balanced_layer_split, make_layout

    raw = _raw()
    raw["model"].update(num_hidden_layers=8, vocab_size=4096, exit_layers=[1, 2])
    raw["parallelism"] = {"pp": 2}
    cfg = _load(workdir, raw, world_size=2)
    model = cfg.model_config()
    split = cfg.parallelism.stage_layers(model)
    assert split == balanced_layer_split(model, 2) == list(make_layout(model, 2).layer_split)
    assert split != [4, 4] and sum(split) == 8  # the two exit heads weigh on stage 0
    assert cfg.parallelism.stage_of_layer(split[0], model) == 0
    assert cfg.parallelism.stage_of_layer(split[0] + 1, model) == 1


def test_yaml_float_exponent(tmp_path: Path, workdir: Path) -> None:
    text = EXAMPLE.replace("lr: 1.0e-3", "lr: 1e-3").replace("max_position_embeddings: 128",
                                                              "max_position_embeddings: 128\n  rms_norm_eps: 1e-5")
    (workdir / "config.yaml").write_text(text)
    cfg = load_config(workdir / "config.yaml")
    assert cfg.train.lr == 1e-3 and cfg.model_config().rms_norm_eps == 1e-5


def test_init_from(workdir: Path) -> None:
    from eellm_hf.modeling.configuration_early_exit_gpt import EarlyExitGPTConfig

    base = _raw()["model"]
    EarlyExitGPTConfig(**base).save_pretrained(workdir / "hf")
    raw = _raw()
    raw["model"] = {"init_from": "hf", "exit_loss_weights": [0.1, 0.2]}
    cfg = _load(workdir, raw)
    model = cfg.model_config()
    assert model.exit_layers == [1, 2] and model.exit_loss_weights == [0.1, 0.2] and model.hidden_size == 64
    raw["model"] = {"init_from": "hf", "exit_layers": [1, 3]}
    with pytest.raises(ValueError, match=r"model\.exit_layers.*\[1, 3\]"):
        _load(workdir, raw)
    raw["model"] = {"init_from": "missing"}
    with pytest.raises(FileNotFoundError, match="missing"):
        _load(workdir, raw)


def _set(raw: dict[str, Any], dotted: str, value: Any) -> None:
    *parents, last = dotted.split(".")
    node = raw
    for p in parents:
        node = node.setdefault(p, {})
    if value is _DELETE:
        del node[last]
    else:
        node[last] = value


_DELETE = object()

INVALID = [
    # (dotted key, value, world_size, error type, regex the message must match)
    ("train.lrr", 0.1, None, ValueError, r"train\.lrr.*did you mean `lr`"),
    ("model.hiden_size", 64, None, ValueError, r"model\.hiden_size.*hidden_size"),
    ("parallelism.tpp", 1, None, ValueError, r"parallelism\.tpp"),
    ("data.seqlen", 64, None, ValueError, r"data\.seqlen"),
    ("checkpoint.intervall", 1, None, ValueError, r"checkpoint\.intervall"),
    ("train.exit_loss_weight_schedule", {"init": 0, "warmup": 2}, None, ValueError, r"schedule\.warmup"),
    ("optimizer", {}, None, ValueError, r"unknown key `config\.optimizer`"),
    ("parallelism.dp", 2, 1, ValueError, r"= 2 does not match the world size 1"),
    ("parallelism", {"pp": 2}, 4, ValueError, r"1\*2\*1 = 2 does not match the world size 4"),
    ("parallelism", {"pp": 8}, 8, ValueError, r"num_hidden_layers=4 cannot be split over pp=8"),
    ("parallelism", {"pp": 2, "layer_split": [2, 1]}, 2, ValueError, r"\[2, 1\] sums to 3"),
    ("parallelism", {"pp": 2, "layer_split": [4]}, 2, ValueError, r"\[4\] must have pp=2 entries"),
    ("parallelism", {"pp": 2, "layer_split": [4, 0]}, 2, ValueError, r"\[4, 0\] has an entry < 1"),
    ("parallelism", {"tp": 3}, 3, ValueError, r"num_attention_heads=4 is not divisible by parallelism\.tp=3"),
    ("parallelism", {"tp": 0}, None, ValueError, r"parallelism\.tp` must be >= 1, got 0"),
    ("parallelism.pp_engine", "gpipe", None, ValueError, r"pp_engine.*'gpipe'"),
    ("model.num_key_value_heads", 2, None, None, None),  # valid
    ("train.global_batch_size", 7, None, ValueError,
     r"global_batch_size`=7 is not divisible by dp\*micro_batch_size=1\*2=2"),
    ("train.micro_batch_size", 0, None, ValueError, r"micro_batch_size` must be a positive integer, got 0"),
    ("model.exit_layers", [1, 4], None, ValueError, r"exit_layers entry 4"),
    ("model.exit_loss_weights", [0.5], None, ValueError, r"exit_loss_weights.*\[0\.5\]"),
    ("data.files", ["nope.txt"], None, FileNotFoundError, r"nope\.txt"),
    ("data.files", [], None, ValueError, r"data\.files"),
    ("data.tokenizer", "no_tok", None, FileNotFoundError, r"no_tok"),
    ("data.tokenizer", {"train_bpe": {"vocab_size": 1000, "out_dir": "t"}}, None, ValueError,
     r"vocab_size`=1000 exceeds model\.vocab_size=512"),
    ("model.vocab_size", 200, None, ValueError, r"300 tokens, more than model\.vocab_size=200"),
    ("data.seq_len", 256, None, ValueError, r"seq_len`=256 exceeds model\.max_position_embeddings=128"),
    ("data.validation_fraction", 1.5, None, ValueError, r"validation_fraction` must be in \[0, 1\), got 1\.5"),
    ("train.steps", 0, None, ValueError, r"train\.steps` must be a positive integer, got 0"),
    ("train.steps", 2.5, None, ValueError, r"train\.steps` must be an integer, got 2\.5"),
    ("train.lr", -1.0, None, ValueError, r"train\.lr` must be > 0, got -1\.0"),
    ("train.lr", _DELETE, None, ValueError, r"missing required key `train\.lr`"),
    ("train.min_lr", 1.0, None, ValueError, r"min_lr` must be in .* got 1\.0"),
    ("train.warmup_steps", 10, None, ValueError, r"warmup_steps` must be in \[0, train\.steps=3\], got 10"),
    ("train.exit_loss_weight_schedule", {"type": "step"}, None, ValueError, r"type` must be one of .*'step'"),
    ("train.exit_loss_weight_schedule", {"init": -0.5}, None, ValueError, r"init` must be >= 0, got -0\.5"),
    ("train.exit_loss_weight_schedule", {"init": 2.0, "warmup_steps": 3}, None, None, None),  # valid: cool-down
    ("train.layer_dropout", {"max_rate": 1.0}, None, ValueError, r"max_rate` must be in \[0, 1\), got 1\.0"),
    ("train.layer_dropout", {"curriculum": "linear"}, None, ValueError, r"curriculum` must be one of .*'linear'"),
    ("train.layer_dropout", {"max_rate": 0.2, "rate": 1}, None, ValueError, r"layer_dropout\.rate"),
    ("train.layer_dropout", {"max_rate": 0.2, "curriculum": "exponential"}, None, None, None),  # valid
    ("train.time_budget_minutes", 0, None, ValueError, r"time_budget_minutes` must be > 0 .*got 0"),
    ("train.time_budget_minutes", "1h", None, ValueError, r"time_budget_minutes` must be a finite number"),
    ("train.time_budget_minutes", 0.5, None, None, None),  # valid
    ("parallelism.timeout_s", 0, None, ValueError, r"parallelism\.timeout_s` must be > 0, got 0"),
    ("parallelism.timeout_s", 30, None, None, None),  # valid
    ("train.dtype", "float16", None, ValueError, r"dtype` must be one of float32, bfloat16; got 'float16'"),
    ("train.freeze_backbone", "yes", None, ValueError, r"freeze_backbone` must be true or false, got 'yes'"),
    ("train.prefetch_next_step", "no", None, ValueError, r"prefetch_next_step` must be true or false, got 'no'"),
    ("train.autocast", "float16", None, ValueError, r"autocast` must be .*bfloat16.*'float16'"),
    ("train.autocast", "bfloat16", None, ValueError, r"autocast`=bfloat16 needs `train\.freeze_backbone: true`"),
    ("export_generation", {"threshold": 0.5}, None, ValueError, r"unknown key `export_generation\.threshold`"),
    ("export_generation", {"early_exit_threshold": 2}, None, ValueError,
     r"export_generation`: `early_exit_threshold` must be None .* got 2"),
    ("export_generation", {"early_exit_threshold": 0.5, "exit_confidence": "gate"}, None, ValueError,
     r"export_generation`: `exit_confidence='gate'` needs exits with confidence gates"),
    ("model.exit_gate", True, None, ValueError, r"exit_gate` needs `train\.freeze_backbone: true`"),
    ("train.exit_distillation", 1.5, None, ValueError, r"exit_distillation` must be in \[0, 1\], got 1\.5"),
    ("train.exit_distillation", 0.5, None, ValueError, r"exit_distillation`=0\.5 needs `train\.freeze_backbone"),
    ("train.val_interval", 5, None, ValueError, r"val_interval`=5 needs a validation set"),
    ("checkpoint.keep_last", 0, None, ValueError, r"keep_last` must be >= 1.*got 0"),
    ("run_dir", _DELETE, None, ValueError, r"missing required section `run_dir`"),
]


@pytest.mark.parametrize(("key", "value", "world_size", "error", "message"), INVALID,
                         ids=[f"{c[0]}={c[1]!r}" for c in INVALID])
def test_invalid(workdir: Path, key: str, value: Any, world_size: int | None, error: type | None,
                 message: str | None) -> None:
    raw = copy.deepcopy(_raw())
    _set(raw, key, value)
    if error is None:
        _load(workdir, raw, world_size=world_size)
        return
    with pytest.raises(error, match=message):
        _load(workdir, raw, world_size=world_size)


def test_pipeline_micro_batch_requirement(workdir: Path) -> None:
    raw = _raw()
    raw["model"]["num_hidden_layers"] = 8
    raw["parallelism"] = {"pp": 4}
    raw["train"].update(global_batch_size=4, micro_batch_size=2)  # 2 micro-batches < pp-1 = 3
    with pytest.raises(ValueError, match=r"2 micro-batches per step .* fewer than pp-1=3"):
        _load(workdir, raw, world_size=4)
    raw["parallelism"]["pp_engine"] = "afab"  # no constraint
    _load(workdir, raw, world_size=4)
    raw["parallelism"]["pp_engine"] = "1f1b"
    raw["train"].update(global_batch_size=6)  # 3 micro-batches = pp-1: what nanotron accepts
    _load(workdir, raw, world_size=4)


def test_missing_config_file(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="nope.yaml"):
        load_config(tmp_path / "nope.yaml")


SHIPPED = [("tiny_cpu.yaml", 2, True), ("smollm2_ee_tune.yaml", 2, True), ("smollm2_layerskip.yaml", 2, True),
           ("ee_llm_1.3b_gpu.yaml", 8, False), ("ee_llm_7b_gpu.yaml", 8, False)]


@pytest.mark.parametrize(("name", "world_size", "is_cpu"), SHIPPED)
def test_shipped_configs_validate(name: str, world_size: int, is_cpu: bool) -> None:
    cfg = load_config(REPO_ROOT / "configs" / name, world_size=world_size, check_files=False)
    model = cfg.model_config()
    if name == "smollm2_ee_tune.yaml":  # the bundled checkpoint, converted with gated exits, tuned frozen
        assert (model.num_hidden_layers, model.vocab_size, model.exit_gate) == (30, 49152, True)
        assert cfg.train.freeze_backbone and cfg.export_generation["exit_confidence"] == "gate"
        assert cfg.train.autocast == "bfloat16"  # bf16 matmuls over fp32 weights: the export stays fp32
    if name == "smollm2_layerskip.yaml":  # the comparison: the whole model trained, with layer dropout
        assert not cfg.train.freeze_backbone and cfg.train.layer_dropout is not None and model.tie_exit_heads
    if is_cpu:
        assert cfg.parallelism.pp == 2 and cfg.train.dtype == "float32"
    else:
        assert cfg.train.dtype == "bfloat16" and cfg.data.seq_len == 2048
        # every exit sits on a stage boundary here, as in EE-LLM's released runs
        ends = [sum(cfg.parallelism.stage_layers(model)[: i + 1]) for i in range(cfg.parallelism.pp)]
        assert set(model.exit_layers) <= set(ends)


def test_sections_built_in_python_validate_themselves(workdir: Path) -> None:
    """A config built in Python is checked like one read from YAML: each section in its __post_init__, the
    sections against each other and the model in TrainerConfig's."""
    import dataclasses

    from eellm_hf.trainer.config import (
        CheckpointConfig,
        DataConfig,
        ExitLossWeightSchedule,
        LayerDropout,
        ParallelismConfig,
        TrainConfig,
    )

    with pytest.raises(ValueError, match=r"`parallelism\.tp` must be >= 1, got 0"):
        ParallelismConfig(tp=0)
    with pytest.raises(ValueError, match=r"`parallelism\.pp_engine` must be one of 1f1b, afab; got 'gpipe'"):
        ParallelismConfig(pp_engine="gpipe")
    with pytest.raises(ValueError, match=r"`train\.micro_batch_size` must be a positive integer, got 0"):
        TrainConfig(steps=3, global_batch_size=8, micro_batch_size=0, lr=1e-3)
    with pytest.raises(ValueError, match=r"`train\.lr` must be > 0, got -1\.0"):
        TrainConfig(steps=3, global_batch_size=8, micro_batch_size=2, lr=-1.0)
    with pytest.raises(ValueError, match=r"`train\.autocast`=bfloat16 needs `train\.dtype: float32`.*'bfloat16'"):
        TrainConfig(steps=3, global_batch_size=8, micro_batch_size=2, lr=1e-3, freeze_backbone=True,
                    dtype="bfloat16", autocast="bfloat16")
    with pytest.raises(ValueError, match=r"layer_dropout\.max_rate` must be in \[0, 1\), got 1\.0"):
        LayerDropout(max_rate=1.0)
    with pytest.raises(ValueError, match=r"exit_loss_weight_schedule\.init` must be >= 0, got -1"):
        ExitLossWeightSchedule(init=-1)
    with pytest.raises(ValueError, match=r"`checkpoint\.keep_last` must be >= 1.*got 0"):
        CheckpointConfig(dir=workdir / "ckpt", keep_last=0)
    with pytest.raises(ValueError, match=r"`data\.files` must list at least one file"):
        DataConfig(files=[], tokenizer=workdir / "tok", seq_len=64)
    cfg = load_config(workdir / "config.yaml", world_size=1)
    with pytest.raises(ValueError, match=r"global_batch_size`=7 is not divisible by dp\*micro_batch_size=1\*2=2"):
        dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, global_batch_size=7))
    with pytest.raises(ValueError, match=r"num_attention_heads=4 is not divisible by parallelism\.tp=3"):
        dataclasses.replace(cfg, parallelism=ParallelismConfig(tp=3))
    assert dataclasses.replace(cfg, parallelism=ParallelismConfig(tp=2)).parallelism.world_size == 2
