"""Fault injection on the real trainer: damaged checkpoints, non-finite steps, stale data, bad resumes, and the
GPU configs (bf16 + fp32 master weights, ZeRO-1, tp=2) shrunk to CPU size, with resume.

Two launches, each running several scenarios in the same processes (``run`` is called once per scenario):

* 2 processes (pp=2, a tiny model on a little KJV text): an uninterrupted reference run with a checkpoint every 2
  steps, then copies of its checkpoints with a flipped byte, truncated files, or everything damaged, resumed;
  a data file rewritten in place; ``resume: true`` and ``auto`` on an empty folder; a non-finite exit loss
  injected at one step (stopped, or skipped with ``train.skip_nonfinite_steps``; stopped in EE-Tuning too); EE-Tuning
  with validations and checkpoints, with and without ``train.prefetch_next_step``; last, a divergent learning
  rate through the CLI, which must end every rank with a non-zero exit code.
* 4 processes: ``configs/ee_llm_1.3b_gpu.yaml`` (pp x dp = 2 x 2, ZeRO-1, bf16) and ``ee_llm_7b_gpu.yaml`` (tp x
  pp = 2 x 2, bf16) with tiny model sizes: 4 steps, then a resume from step 2 that must log the same losses.

This file is also the worker script (``python tests/test_trainer_faults.py faults|gpu_configs TMP``).
"""

from __future__ import annotations

import copy
import json
import math
import os
import shutil
import sys
from pathlib import Path

import pytest

try:
    from tests.dist_utils import REPO_ROOT, launch
except ImportError:  # tests/ is not a package here: pytest put tests/ itself on sys.path
    from dist_utils import REPO_ROOT, launch

TINY_MODEL = {"vocab_size": 384, "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
              "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 64,
              "exit_layers": [1], "exit_loss_weights": [0.5], "tie_word_embeddings": True,
              "bos_token_id": 0, "eos_token_id": 0, "pad_token_id": 1}
POISONED_STEP = 3  # 1-based: the step whose exit loss the worker makes non-finite (exit temperature 0)


def _config(tmp: Path, name: str, **sections) -> dict:
    """The tiny pp=2 run ``name`` (its own run and checkpoint folders) with sections overridden."""
    cfg = {
        "model": dict(TINY_MODEL),
        "parallelism": {"tp": 1, "pp": 2, "dp": 1, "timeout_s": 60},
        "data": {"files": [str(tmp / "kjv.txt")],
                 "tokenizer": {"train_bpe": {"vocab_size": 384, "out_dir": str(tmp / "tokenizer")}},
                 "seq_len": 16},
        "train": {"steps": 6, "global_batch_size": 4, "micro_batch_size": 2, "lr": 1e-2, "warmup_steps": 1},
        "checkpoint": {"dir": str(tmp / name / "ckpt"), "interval": 2},
        "run_dir": str(tmp / name / "run"),
    }
    for key, value in sections.items():
        cfg[key] = {**cfg[key], **value} if isinstance(value, dict) and isinstance(cfg.get(key), dict) else value
    return cfg


def _gpu_config(tmp: Path, which: str, **parallelism) -> dict:
    """A shipped GPU config with the model, data and run lengths shrunk to CPU size; its precision (bf16),
    optimizer sharding (ZeRO-1 where set), schedule and checkpoint settings kept."""
    import yaml

    with open(REPO_ROOT / "configs" / f"ee_llm_{which}_gpu.yaml", encoding="utf-8") as f:
        cfg = yaml.safe_load(f)
    kept = {k: cfg["model"][k] for k in ("tie_word_embeddings", "tie_exit_heads", "exit_loss_weights")}
    cfg["model"].update(TINY_MODEL, num_hidden_layers=4, exit_layers=[1, 2], **kept)
    cfg["parallelism"].update(parallelism, layer_split=[2, 2], timeout_s=60)
    cfg["data"].update(files=[str(tmp / "kjv.txt")], tokenizer={"train_bpe": {"vocab_size": 384,
                       "out_dir": str(tmp / "tokenizer")}}, seq_len=16, validation_fraction=0.05)
    cfg["train"].update(steps=4, global_batch_size=8, micro_batch_size=2, warmup_steps=1, val_interval=2,
                        val_batches=1, log_interval=1)
    cfg["checkpoint"].update(dir=str(tmp / which / "ckpt"), interval=2)
    cfg["run_dir"] = str(tmp / which / "run")
    cfg["export_hf"] = str(tmp / which / "hf")
    return cfg


# ------------------------------------------------------------------------------------------------------------
# Worker side
# ------------------------------------------------------------------------------------------------------------


def _report(name: str, **fields) -> None:
    print(f"RESULT {name} {json.dumps(fields)}", flush=True)


def _run(name: str, raw: dict, expect_error: bool = False) -> list[float] | None:
    """``run(load_config(raw))``; the losses, or with ``expect_error`` the error (reported, not raised)."""
    from eellm_hf.trainer.config import load_config
    from eellm_hf.trainer.training_run import run

    try:
        results = run(load_config(raw, world_size=int(os.environ["WORLD_SIZE"])))
    except Exception as exc:  # noqa: BLE001 - reported to the test
        if not expect_error:
            raise
        _report(name, error=type(exc).__name__, message=str(exc))
        return None
    losses = [r.loss for r in results]
    _report(name, losses=losses, steps=[r.step + 1 for r in results])
    return losses


def _on_rank0(action) -> None:
    import torch.distributed as dist

    if int(os.environ["RANK"]) == 0:
        action()
    dist.barrier()


def _flip_byte(path: Path, from_end: int) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) - from_end] ^= 0x10
    path.write_bytes(bytes(data))


def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def _copy_reference(tmp: Path, name: str) -> None:
    shutil.copytree(tmp / "reference" / "ckpt", tmp / name / "ckpt")


def _poison_exit_loss_at(step: int):
    """Make the exit loss of 1-based ``step`` non-finite (exit temperature 0 for that step only); returns the
    function that undoes it."""
    from eellm_hf.trainer.train_loop import ParallelTrainer

    original = ParallelTrainer.train_step

    def train_step(self, index, *args, **kwargs):
        if index + 1 != step:
            return original(self, index, *args, **kwargs)
        saved = self.train_config
        self.train_config = copy.copy(saved)  # past TrainConfig's own check, which refuses a temperature of 0
        self.train_config.exit_temperature = 0.0
        try:
            return original(self, index, *args, **kwargs)
        finally:
            self.train_config = saved

    ParallelTrainer.train_step = train_step
    return lambda: setattr(ParallelTrainer, "train_step", original)


def _worker_faults(tmp_dir: str) -> None:
    import torch

    torch.set_num_threads(1)
    tmp = Path(tmp_dir)
    _run("reference", _config(tmp, "reference"))

    # a flipped byte in the tensors of the newest checkpoint: resume from step 4 instead
    def flip() -> None:
        _copy_reference(tmp, "flipped")
        _flip_byte(tmp / "flipped" / "ckpt" / "step_000006" / "rank_00001.safetensors", 64)
    _on_rank0(flip)
    _run("flipped", _config(tmp, "flipped", checkpoint={"resume": True}))

    # truncated files in the two newest checkpoints: resume from step 2
    def truncate() -> None:
        _copy_reference(tmp, "truncated")
        _truncate(tmp / "truncated" / "ckpt" / "step_000006" / "rank_00000.json")
        _truncate(tmp / "truncated" / "ckpt" / "step_000004" / "rank_00001.safetensors")
    _on_rank0(truncate)
    _run("truncated", _config(tmp, "truncated", checkpoint={"resume": True}))

    # every checkpoint damaged: a clear error
    def damage_all() -> None:
        _copy_reference(tmp, "all_damaged")
        for step in (2, 4, 6):
            _flip_byte(tmp / "all_damaged" / "ckpt" / f"step_{step:06d}" / "rank_00000.safetensors", 8)
    _on_rank0(damage_all)
    _run("all_damaged", _config(tmp, "all_damaged", checkpoint={"resume": True}), expect_error=True)

    # resume: true with nothing to resume (a mistyped folder) fails; auto starts from step 0 and says so
    _run("resume_missing", _config(tmp, "resume_missing", checkpoint={"dir": str(tmp / "no_such_dir"),
                                                                       "resume": True}), expect_error=True)
    _on_rank0(lambda: (tmp / "empty_dir").mkdir())
    _run("resume_empty", _config(tmp, "resume_empty", checkpoint={"dir": str(tmp / "empty_dir"), "resume": True}),
         expect_error=True)
    _run("resume_auto", _config(tmp, "resume_auto", checkpoint={"resume": "auto"}, train={"steps": 1}))

    # the data file rewritten in place (same path, other text): a new cache, other losses
    data_file = tmp / "rewritten.txt"
    _on_rank0(lambda: data_file.write_text((tmp / "kjv.txt").read_text()[:20000]))
    rewritten = _config(tmp, "rewritten", data={"files": [str(data_file)]}, train={"steps": 2})
    rewritten.pop("checkpoint")
    _run("data_before", rewritten)
    _on_rank0(lambda: data_file.write_text((tmp / "kjv.txt").read_text()[20000:40000]))
    _run("data_after", rewritten)

    # a non-finite exit loss at one step: stopped (no checkpoint of it; keep_last prunes nothing good) or skipped
    undo = _poison_exit_loss_at(POISONED_STEP)
    _run("nonfinite_stop", _config(tmp, "nonfinite_stop", checkpoint={"interval": 1, "keep_last": 1}),
         expect_error=True)
    _run("nonfinite_skip", _config(tmp, "nonfinite_skip", train={"skip_nonfinite_steps": 1}))
    # ... in EE-Tuning, whose first stage has already started the next step when the stop is decided
    for name, steps in (("nonfinite_ee_tuning", 6), ("after_nonfinite_ee_tuning", 2)):
        ee_tuning = _config(tmp, name, train={"freeze_backbone": True, "steps": steps})
        ee_tuning.pop("checkpoint")
        _run(name, ee_tuning, expect_error=steps > POISONED_STEP)
    undo()

    # EE-Tuning with validations and checkpoints between its steps, with and without train.prefetch_next_step
    for prefetch in (True, False):
        name = f"ee_tuning_prefetch_{str(prefetch).lower()}"
        _run(name, _config(tmp, name, data={"validation_sequences": 4}, checkpoint={"interval": 3},
                           train={"freeze_backbone": True, "val_interval": 2, "prefetch_next_step": prefetch}))

    # last: a divergent learning rate through the CLI ends every rank with a non-zero exit code
    import yaml

    from eellm_hf.trainer.__main__ import main

    config_path = tmp / "divergent.yaml"
    divergent = _config(tmp, "divergent", train={"lr": 1e4, "grad_clip": None, "warmup_steps": 0},
                        checkpoint={"interval": 1})
    _on_rank0(lambda: config_path.write_text(yaml.safe_dump(divergent)))
    _report("divergent_cli_starts")
    main(["--config", str(config_path)])
    _report("divergent_cli_returned")


def _worker_gpu_configs(tmp_dir: str) -> None:
    import torch

    torch.set_num_threads(1)
    tmp = Path(tmp_dir)
    for which, layout in (("1.3b", {"tp": 1, "pp": 2, "dp": 2}), ("7b", {"tp": 2, "pp": 2, "dp": 1})):
        cfg = _gpu_config(tmp, which, **layout)
        cfg["checkpoint"]["resume"] = False
        _run(f"{which}_full", cfg)

        def drop_last(which=which) -> None:
            ckpt = tmp / which / "ckpt"
            shutil.rmtree(ckpt / "step_000004")
            (ckpt / "latest").write_text("step_000002\n")
        _on_rank0(drop_last)
        resumed = copy.deepcopy(cfg)
        resumed["checkpoint"]["resume"] = True
        resumed.pop("export_hf")
        _run(f"{which}_resumed", resumed)


# ------------------------------------------------------------------------------------------------------------
# Pytest side
# ------------------------------------------------------------------------------------------------------------


def _results(rank_result) -> dict[str, dict]:
    out = {}
    for line in rank_result.lines_with("RESULT "):
        name, _, payload = line.partition(" ")
        out[name] = json.loads(payload)
    return out


def _write_kjv(tmp: Path) -> None:
    from eellm_hf.trainer.data import bible_chapters

    (tmp / "kjv.txt").write_text("\n\n".join(bible_chapters()[:30]) + "\n", encoding="utf-8")


@pytest.fixture(scope="module")
def faults(tmp_path_factory) -> dict:
    tmp = tmp_path_factory.mktemp("faults")
    _write_kjv(tmp)
    ranks = launch(Path(__file__), 2, ["faults", str(tmp)], timeout_s=300, check=False)
    return {"tmp": tmp, "ranks": ranks, "results": _results(ranks[0]), "stderr": ranks[0].stderr}


def _close(a: list[float], b: list[float]) -> bool:
    return len(a) == len(b) and all(math.isclose(x, y, rel_tol=1e-6) for x, y in zip(a, b))


def test_flipped_byte_falls_back_to_the_previous_checkpoint(faults):
    results, stderr = faults["results"], faults["stderr"]
    reference = results["reference"]["losses"]
    assert results["flipped"]["steps"] == [5, 6]
    assert _close(results["flipped"]["losses"], reference[4:])
    bad = faults["tmp"] / "flipped" / "ckpt" / "step_000006" / "rank_00001.safetensors"
    assert f"{bad} does not match the sha256" in stderr
    assert f"resuming from {bad.parents[1] / 'step_000004'} instead" in stderr


def test_truncated_files_fall_back_past_both(faults):
    results, stderr = faults["results"], faults["stderr"]
    assert results["truncated"]["steps"] == [3, 4, 5, 6]
    assert _close(results["truncated"]["losses"], results["reference"]["losses"][2:])
    ckpt = faults["tmp"] / "truncated" / "ckpt"
    assert f"{ckpt / 'step_000006' / 'rank_00000.json'} has " in stderr
    assert f"{ckpt / 'step_000004' / 'rank_00001.safetensors'} has " in stderr and "(truncated" in stderr


def test_no_verifying_checkpoint_is_a_clear_error(faults):
    error = faults["results"]["all_damaged"]
    assert error["error"] == "CheckpointCorruptError"
    assert error["message"].startswith(f"no checkpoint in {faults['tmp'] / 'all_damaged' / 'ckpt'} verifies")
    assert all(f"step_{s:06d}/rank_00000.safetensors does not match" in error["message"] for s in (2, 4, 6))


def test_resume_true_needs_a_checkpoint_and_auto_says_what_it_did(faults):
    error = faults["results"]["resume_missing"]
    assert error["error"] == "FileNotFoundError"
    assert f"checkpoint folder {faults['tmp'] / 'no_such_dir'} does not exist" in error["message"]
    error = faults["results"]["resume_empty"]
    assert error["error"] == "FileNotFoundError"
    assert f"checkpoint folder {faults['tmp'] / 'empty_dir'} holds no committed checkpoint" in error["message"]
    assert not (faults["tmp"] / "resume_empty" / "run").exists()  # no metrics.jsonl replaced
    assert faults["results"]["resume_auto"]["steps"] == [1]
    assert "checkpoint.resume auto: no checkpoint in" in faults["stderr"]


def test_rewritten_data_file_rebuilds_the_cache(faults):
    results = faults["results"]
    before, after = results["data_before"]["losses"], results["data_after"]["losses"]
    assert len(before) == len(after) == 2 and before[1] != after[1]
    assert len(list((faults["tmp"] / "rewritten" / "run" / "data_cache").glob("packed_*.npy"))) == 2


def test_nonfinite_loss_stops_naming_step_and_head_and_keeps_good_checkpoints(faults):
    from eellm_hf.trainer.checkpoint import latest_checkpoint, list_checkpoints, verify_checkpoint

    error = faults["results"]["nonfinite_stop"]
    assert error["error"] == "NonFiniteTrainingError"
    assert error["message"].startswith(f"step {POISONED_STEP}: the loss of head(s) exit_1 is not finite")
    ckpt = faults["tmp"] / "nonfinite_stop" / "ckpt"
    latest = latest_checkpoint(ckpt)
    assert latest.name == f"step_{POISONED_STEP - 1:06d}" and list_checkpoints(ckpt) == [latest]
    verify_checkpoint(latest)


def test_nonfinite_ee_tuning_step_stops_every_rank_cleanly(faults):
    """EE-Tuning at pp=2 starts each next step's first micro-batch early (`train.prefetch_next_step`): a stop at a
    non-finite step still ends both ranks with the error naming the step, and the same processes train again."""
    error = faults["results"]["nonfinite_ee_tuning"]
    assert error["error"] == "NonFiniteTrainingError"
    assert error["message"].startswith(f"step {POISONED_STEP}: the loss of head(s) exit_1"), error["message"]
    assert faults["results"]["after_nonfinite_ee_tuning"]["steps"] == [1, 2]


def test_ee_tuning_prefetch_changes_nothing_around_validation_and_checkpoints(faults):
    """EE-Tuning at pp=2 with a validation every 2 steps and a checkpoint every 3: the run that starts each next
    step early (`train.prefetch_next_step`, never across a validation or a checkpoint) logs the same training and
    validation losses as the run that does not, and writes the same checkpoints."""
    import torch

    from eellm_hf.trainer.checkpoint import list_checkpoints, load_checkpoint
    from eellm_hf.trainer.metrics import read_metrics

    runs = {prefetch: faults["tmp"] / f"ee_tuning_prefetch_{prefetch}" for prefetch in ("true", "false")}
    assert faults["results"]["ee_tuning_prefetch_true"] == faults["results"]["ee_tuning_prefetch_false"]
    assert faults["results"]["ee_tuning_prefetch_true"]["steps"] == [1, 2, 3, 4, 5, 6]
    validations = {key: [(e["step"], e["exit_losses"]) for e in read_metrics(run / "run", split="validation")]
                   for key, run in runs.items()}
    assert [step for step, _ in validations["true"]] == [2, 4, 6]
    assert validations["true"] == validations["false"]
    for rank in (0, 1):
        saved = [load_checkpoint(path, rank)[0] for path in list_checkpoints(runs["true"] / "ckpt")]
        assert [path.name for path in list_checkpoints(runs["true"] / "ckpt")] == ["step_000003", "step_000006"]
        plain = [load_checkpoint(path, rank)[0] for path in list_checkpoints(runs["false"] / "ckpt")]
        for a, b in zip(saved, plain, strict=True):
            assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_nonfinite_step_skipped_without_update(faults):
    from eellm_hf.trainer.checkpoint import latest_checkpoint, load_checkpoint
    from eellm_hf.trainer.metrics import read_metrics

    assert faults["results"]["nonfinite_skip"]["steps"] == [1, 2, 3, 4, 5, 6]
    run_dir = faults["tmp"] / "nonfinite_skip" / "run"
    (event,) = [e for e in read_metrics(run_dir) if "event" in e]
    assert event["event"] == "nonfinite_step_skipped" and event["step"] == POISONED_STEP
    assert "exit_1" in event["reason"] and event["skipped"] == 1
    assert POISONED_STEP not in [e["step"] for e in read_metrics(run_dir, split="train")]
    for rank in (0, 1):  # AdamW counted 5 updates in 6 steps
        tensors, _ = load_checkpoint(latest_checkpoint(run_dir.parent / "ckpt"), rank)
        counts = {float(v) for k, v in tensors.items() if k.endswith("/step")}
        assert counts == {5.0}, counts
    skipped = {step: load_checkpoint(run_dir.parent / "ckpt" / f"step_{step:06d}", 0)[1]["skipped_nonfinite_steps"]
               for step in (2, 4, 6)}
    assert skipped == {2: 0, 4: 1, 6: 1}  # a resumed run keeps counting against skip_nonfinite_steps


def test_divergent_lr_exits_nonzero_and_never_commits_nonfinite(faults):
    from eellm_hf.trainer.checkpoint import list_checkpoints, load_checkpoint, verify_checkpoint

    assert "divergent_cli_returned" not in faults["results"]
    assert all(r.returncode == 1 for r in faults["ranks"]), [r.returncode for r in faults["ranks"]]
    assert "NonFiniteTrainingError: step 2: the gradient norm is not finite" in faults["stderr"]
    committed = list_checkpoints(faults["tmp"] / "divergent" / "ckpt")
    assert [p.name for p in committed] == ["step_000001"]  # the step before, never the non-finite one
    for path in committed:
        verify_checkpoint(path)
        for rank in (0, 1):
            tensors, _ = load_checkpoint(path, rank)
            assert all(bool(v.isfinite().all()) for v in tensors.values() if v.is_floating_point()), path


@pytest.fixture(scope="module")
def gpu_configs(tmp_path_factory) -> dict:
    tmp = tmp_path_factory.mktemp("gpu_configs")
    _write_kjv(tmp)
    ranks = launch(Path(__file__), 4, ["gpu_configs", str(tmp)], timeout_s=300)
    return {"tmp": tmp, "results": _results(ranks[0])}


@pytest.mark.parametrize("which", ["1.3b", "7b"])
def test_gpu_config_trains_in_bf16_and_resumes_exactly(gpu_configs, which):
    """The shipped GPU config (bf16 with fp32 master weights; ZeRO-1 at pp x dp = 2 x 2 for 1.3B, tp x pp = 2 x 2
    for 7B) trains, exports, and resumes from step 2 with the same losses."""
    import torch
    from transformers import AutoModelForCausalLM

    import eellm_hf  # noqa: F401

    full, resumed = gpu_configs["results"][f"{which}_full"], gpu_configs["results"][f"{which}_resumed"]
    assert full["steps"] == [1, 2, 3, 4] and resumed["steps"] == [3, 4]
    assert all(math.isfinite(x) for x in full["losses"]) and full["losses"][-1] < full["losses"][0]
    assert resumed["losses"] == full["losses"][2:]
    model = AutoModelForCausalLM.from_pretrained(gpu_configs["tmp"] / which / "hf")
    assert model.dtype == torch.bfloat16 and model.config.exit_layers == [1, 2]


if __name__ == "__main__":
    {"faults": _worker_faults, "gpu_configs": _worker_gpu_configs}[sys.argv[1]](*sys.argv[2:])
