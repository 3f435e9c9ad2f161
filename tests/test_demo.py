"""Smoke test of the main job: `python -m eellm_hf.demo --smoke` runs every phase end to end, then reuses them."""

import json
import subprocess
import sys

from transformers import AutoModelForCausalLM

from eellm_hf.trainer.metrics import read_metrics

PHASES = ("data", "train", "generate", "evaluate", "sweep", "report")


def run_demo(out, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "eellm_hf.demo", *(args or ("--smoke",)), "--out", str(out)],
                          capture_output=True, text=True, timeout=600)


def test_demo_pipeline_runs_end_to_end_and_reuses_phases(tmp_path):
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
