"""Smoke tests of the demos: `python -m eellm_hf.demo --smoke --source TINY` (EE-Tuning a pretrained checkpoint,
the main job) and `python -m eellm_hf.demo.pretrain --smoke` run every phase end to end, then reuse them."""

import json
import subprocess
import sys

from transformers import AutoModelForCausalLM

from eellm_hf.trainer.metrics import read_metrics

PHASES = ("data", "train", "generate", "evaluate", "sweep", "report")
EE_TUNE_PHASES = ("convert", "train", "exits", "generate", "evaluate", "sweep", "report")


def run_demo(out, *args: str, module: str = "eellm_hf.demo.pretrain") -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", module, *(args or ("--smoke",)), "--out", str(out)],
                          capture_output=True, text=True, timeout=600)


def test_ee_tune_demo_runs_end_to_end_and_reuses_phases(tmp_path, tiny_llama_dir):
    out = tmp_path / "demo"
    first = run_demo(out, "--smoke", "--source", str(tiny_llama_dir), module="eellm_hf.demo")
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    for phase in EE_TUNE_PHASES:
        assert (out / f"{phase}.json").exists(), phase
    convert = json.loads((out / "convert.json").read_text())
    assert convert["num_hidden_layers"] == 2 and convert["exit_layers"] == [1]  # the recipe's exits, scaled
    assert 0.0 <= convert["untuned_agreement"][0] <= 1.0 and convert["agreement_tokens"] == 64
    train = json.loads((out / "train.json").read_text())
    assert train["steps"] == 2 and [row["step"] for row in read_metrics(out / "train", split="train")] == [1, 2]

    model = AutoModelForCausalLM.from_pretrained(out / "model", trust_remote_code=True)
    assert model.config.exit_gate and model.config.exit_gate_before_mlp and model.config.tie_exit_heads
    # the recipe's shortlist at the same share of the vocabulary: 8,192 of 49,152 -> 85 of 512
    assert len(model.config.exit_vocab) == round(8192 * model.config.vocab_size / 49152) == 85
    assert model.generation_config.exit_confidence == "gate"  # the recipe's recommendation, exported
    exits = json.loads((out / "exits.json").read_text())
    assert {row["measure"] for row in exits["policies"]} == {"gate"}
    assert all(0.0 <= row["agreement"] <= 1.0 and row["ideal_speedup"] > 0 for row in exits["policies"])
    generate = json.loads((out / "generate.json").read_text())
    assert generate["settings"] == {"early_exit_threshold": 0.95, "exit_confidence": "gate"}
    assert all(len(sample["exit_layers"]) == 4 and set(sample["exit_layers"]) <= {1, 2}
               for sample in generate["samples"])

    evaluation = json.loads((out / "evaluate.json").read_text())
    # a shortlisted exit's perplexity of real text is infinite: no per-exit run, and the report says why
    assert set(evaluation["runs"]) == {"full depth", "early exit (gate 0.95)"} and evaluation["exit_vocab_size"] == 85
    full = evaluation["runs"]["full depth"]["metrics"]
    assert full["python_perplexity"]["bits_per_byte"] > 0 and 0.0 <= full["python_completion"]["rougeL"] <= 1.0
    assert evaluation["runs"]["full depth"]["cost"]["mean_exit_layer"] == 2.0  # full depth despite the export
    sweep = json.loads((out / "sweep.json").read_text())
    assert [row["threshold"] for row in sweep["runs"]] == [None, 0.9, 0.0]
    assert sweep["runs"][0]["mean_exit_layer"] == 2.0 and sweep["runs"][-1]["mean_exit_layer"] == 1.0

    report = (out / "report.md").read_text()
    assert "## What the gates could buy" in report and "| full depth |" in report and "speed_quality.png" in report
    assert "predict among 85 of the 512 tokens only" in report
    second = run_demo(out, "--smoke", "--source", str(tiny_llama_dir), module="eellm_hf.demo")
    assert second.returncode == 0, second.stderr[-3000:]
    assert all(f"[demo] {phase}: done before, reused" in second.stdout for phase in EE_TUNE_PHASES), second.stdout
    missing = run_demo(tmp_path / "other", "--smoke", module="eellm_hf.demo")
    assert missing.returncode != 0 and "--smoke needs --source" in missing.stderr


def test_pretrain_demo_runs_end_to_end_and_reuses_phases(tmp_path):
    out = tmp_path / "demo"
    first = run_demo(out)
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    for phase in PHASES:
        assert (out / f"{phase}.json").exists(), phase
    train = json.loads((out / "train.json").read_text())
    assert train["steps"] == 4 and train["final_train"]["loss"] > 0
    assert [row["step"] for row in read_metrics(out / "train", split="train")] == [1, 2, 3, 4]

    model = AutoModelForCausalLM.from_pretrained(out / "model", trust_remote_code=True)
    assert model.config.exit_layers == [1, 2]
    generate = json.loads((out / "generate.json").read_text())
    assert all(len(sample["exit_layers"]) == 4 for sample in generate["samples"])
    assert all(layer in (1, 2, 4) for sample in generate["samples"] for layer in sample["exit_layers"])

    evaluation = json.loads((out / "evaluate.json").read_text())
    assert set(evaluation["runs"]) == {"full depth", "early exit 0.8", "exit 1", "exit 2"}
    full = evaluation["runs"]["full depth"]["metrics"]
    assert 0.0 <= full["kjv_cloze"]["acc"] <= 1.0 and full["kjv_perplexity"]["bits_per_byte"] > 0

    for picture in ("train/metrics.png", "sweep/speed_quality.png", "sweep/exit_histogram.png"):
        assert (out / picture).stat().st_size > 1000, picture
    report = (out / "report.md").read_text()
    assert "## Early-exit generation" in report and "| full depth |" in report and "speed_quality.png" in report

    second = run_demo(out)
    assert second.returncode == 0, second.stderr[-3000:]
    assert all(f"[demo] {phase}: done before, reused" in second.stdout for phase in PHASES), second.stdout

    # the full demo's settings in a folder made by the smoke run: refused up front, nothing is reused or lost
    other = run_demo(out, "--minutes", "7")
    assert other.returncode != 0 and "other settings" in other.stderr and "minutes: 0.0 there, 7.0 now" in other.stderr
    assert json.loads((out / "train.json").read_text())["steps"] == 4
