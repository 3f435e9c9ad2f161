"""Tests for eellm_hf.trainer.metrics: JSON lines, resume truncation, validation entries, events, plot, disabled
rank."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from eellm_hf.trainer.metrics import METRICS_FILE, MetricsLogger, head_losses, plot_metrics, read_metrics


def _run(run_dir: Path, steps: range, resume_step: int | None = None, plot: bool = False) -> MetricsLogger:
    logger = MetricsLogger(run_dir, total_steps=6, exit_layers=[1, 2], resume_step=resume_step, progress=True,
                           plot=plot)
    for step in steps:
        logger.log_train(step, torch.tensor(3.0 - 0.1 * step), exit_losses=[4.0, 3.5, 3.0 - 0.1 * step],
                         lr=1e-3, tokens=512, grad_norm=torch.tensor(0.5))
        if step % 2 == 0:
            logger.log_validation(step, 3.2, exit_losses=[4.1, 3.6, 3.1])
    return logger


def test_log_lines_and_resume(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    _run(tmp_path, range(1, 5)).close()
    lines = (tmp_path / METRICS_FILE).read_text().splitlines()
    assert len(lines) == 6  # 4 train + 2 validation
    first = json.loads(lines[0])
    assert first["step"] == 1 and first["split"] == "train" and first["loss"] == pytest.approx(2.9)
    # exit_losses: a list aligned with exit_layers, then the final head
    assert first["exit_layers"] == [1, 2] and first["exit_losses"] == [4.0, 3.5, pytest.approx(2.9)]
    assert head_losses(first) == {"exit_1": 4.0, "exit_2": 3.5, "final": pytest.approx(2.9)}
    assert first["lr"] == 1e-3 and first["grad_norm"] == 0.5 and first["tokens_per_s"] > 0
    val = read_metrics(tmp_path, "validation")
    assert [e["step"] for e in val] == [2, 4]
    assert val[0]["exit_losses"] == [4.1, 3.6, 3.1] and val[0]["exit_layers"] == [1, 2]
    assert "step 2 validation loss=3.2000 exit_1=4.1000" in capsys.readouterr().err

    # resumed from the checkpoint of step 2: steps 3-4 of the interrupted run are dropped, then re-logged
    _run(tmp_path, range(3, 7), resume_step=2, plot=True).close()
    steps = [(e["step"], e["split"]) for e in read_metrics(tmp_path)]
    assert steps == [(1, "train"), (2, "train"), (2, "validation"), (3, "train"), (4, "train"), (4, "validation"),
                     (5, "train"), (6, "train"), (6, "validation")]
    png = tmp_path / "metrics.png"
    assert png.is_file() and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    # a fresh run (no resume_step) replaces the file
    _run(tmp_path, range(1, 2)).close()
    assert [e["step"] for e in read_metrics(tmp_path)] == [1]


def test_non_finite_and_bad_exit_count(tmp_path: Path) -> None:
    logger = MetricsLogger(tmp_path, 2, exit_layers=[3], progress=False, plot=False)
    logger.log_train(1, math.nan, exit_losses=[float("inf"), 2.0])
    for bad in ([1.0], [1.0, 2.0, 3.0]):  # one per exit, then the final head: exactly 2 here
        with pytest.raises(ValueError, match=f"got {len(bad)} exit losses for exit_layers \\[3\\] \\(expected 2"):
            logger.log_train(2, 1.0, exit_losses=bad)
    with pytest.raises(TypeError, match="must be a list"):
        logger.log_validation(2, 1.0, exit_losses={3: 1.0, "final": 2.0})
    logger.close()
    (entry,) = read_metrics(tmp_path)
    assert entry["loss"] is None and entry["exit_losses"] == [None, 2.0] and entry["tokens_per_s"] is None
    assert head_losses(entry) == {"exit_3": None, "final": 2.0}
    assert plot_metrics(tmp_path, tmp_path / "p" / "plot.png") == tmp_path / "p" / "plot.png"


def test_events_and_total_steps(tmp_path: Path) -> None:
    """An event line (e.g. the time budget's chosen total) has no split, survives a resume from a later step,
    is dropped by a resume from an earlier one; the progress bar's total can change."""
    logger = MetricsLogger(tmp_path, total_steps=100, exit_layers=[1], progress=True, plot=False)
    for step in (1, 2, 3, 4):
        logger.log_train(step, 1.0, exit_losses=[2.0, 1.0])
    logger.set_total_steps(7)
    assert logger._bar is not None and logger._bar.total == 7
    logger.log_event("time_budget", 4, steps=7, step_time_s=0.25)
    logger.log_train(5, 1.0, exit_losses=[2.0, 1.0])
    logger.close()
    (event,) = [e for e in read_metrics(tmp_path) if "event" in e]
    assert event["event"] == "time_budget" and event["step"] == 4 and event["steps"] == 7
    assert event["step_time_s"] == 0.25 and "split" not in event
    assert [e["step"] for e in read_metrics(tmp_path, "train")] == [1, 2, 3, 4, 5]
    assert plot_metrics(tmp_path) is not None
    MetricsLogger(tmp_path, 7, exit_layers=[1], resume_step=4, progress=False, plot=False).close()
    assert [e.get("event") for e in read_metrics(tmp_path)] == [None, None, None, None, "time_budget"]
    MetricsLogger(tmp_path, 7, exit_layers=[1], resume_step=3, progress=False, plot=False).close()
    assert all("event" not in e for e in read_metrics(tmp_path))


def test_disabled_logger_does_nothing(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    with MetricsLogger(run_dir, 3, enabled=False) as logger:
        logger.log_train(1, 1.0)
        logger.log_validation(1, 1.0)
        logger.log_event("time_budget", 1, steps=2)
        logger.set_total_steps(2)
    assert not run_dir.exists()
    assert plot_metrics(run_dir) is None and read_metrics(run_dir) == []
