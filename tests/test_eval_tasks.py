"""The offline ``kjv_pack`` lm-eval tasks: data is reproducible and the pack runs end to end."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from eellm_hf import corpus
from eellm_hf.eval import build_tasks
from eellm_hf.eval.tasks import TASKS_DIR

DATA_DIR = TASKS_DIR / "data"
LIMIT = 4  # docs per task in the end-to-end run


def _read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def test_build_is_deterministic_and_matches_committed_data(tmp_path: Path) -> None:
    first = build_tasks.build(tmp_path / "a")
    second = build_tasks.build(tmp_path / "b")
    assert [p.name for p in first] == list(build_tasks.TASK_FILES)
    for a, b in zip(first, second):
        assert a.read_bytes() == b.read_bytes(), f"{a.name} differs between two builds"
        committed = DATA_DIR / a.name
        assert committed.is_file(), f"{committed} missing: run `python -m eellm_hf.eval.build_tasks`"
        assert committed.read_bytes() == a.read_bytes(), (
            f"{committed} is stale: rerun `python -m eellm_hf.eval.build_tasks`"
        )


def test_data_is_held_out_and_well_formed() -> None:
    held_out = set(corpus.HELD_OUT_BOOKS)
    all_books = corpus.book_names()
    assert len(all_books) == 66 and held_out <= set(all_books)
    assert all(v["book"] not in held_out for v in corpus.training_verses())
    text = corpus.training_text()
    assert "In the beginning God created the heaven and the earth." in text
    assert "Alpha and Omega" not in text  # Revelation is held out

    seen: set[str] = set()
    for name in build_tasks.TASK_FILES:
        rows = _read_jsonl(DATA_DIR / name)
        assert 50 <= len(rows) <= 200
        for row in rows:
            book = row["citation"].rsplit(" ", 1)[0]
            assert book in held_out
            assert row["citation"] not in seen  # tasks use disjoint verses
            seen.add(row["citation"])

    for row in _read_jsonl(DATA_DIR / "kjv_cloze.jsonl"):
        assert len(row["choices"]) == 4 and len({c.lower() for c in row["choices"]}) == 4
        assert 0 <= row["label"] < 4
    for row in _read_jsonl(DATA_DIR / "kjv_completion.jsonl"):
        assert row["prompt"] and row["continuation"]


def test_rouge_l_helper() -> None:
    from eellm_hf.eval.tasks import utils

    assert utils.rouge_l("the word of God", "the word of God") == pytest.approx(1.0)
    assert utils.rouge_l("", "the word of God") == 0.0
    scores = utils.process_results_completion({"continuation": "ye may be perfect"}, [" ye may be perfect\n"])
    assert scores == {"exact_match": 1.0, "rougeL": pytest.approx(1.0)}


def test_kjv_pack_end_to_end(tiny_llama_dir: Path) -> None:
    import lm_eval
    from lm_eval.tasks import TaskManager

    task_manager = TaskManager(include_path=str(TASKS_DIR), include_defaults=False)
    results = lm_eval.simple_evaluate(
        model="hf",
        model_args=f"pretrained={tiny_llama_dir},dtype=float32",
        tasks=["kjv_pack"],
        task_manager=task_manager,
        limit=LIMIT,
        device="cpu",
        batch_size=4,
        log_samples=False,
        bootstrap_iters=0,
    )
    assert results is not None
    res = results["results"]

    def metric(task: str, name: str) -> float:
        value = res[task][f"{name},none"]
        assert isinstance(value, float) and math.isfinite(value), (task, name, value)
        return value

    for name in ("word_perplexity", "byte_perplexity", "bits_per_byte"):
        assert metric("kjv_perplexity", name) > 0
    for name in ("acc", "acc_norm"):
        assert 0.0 <= metric("kjv_cloze", name) <= 1.0
    assert 0.0 <= metric("kjv_completion", "exact_match") <= 1.0
    assert 0.0 <= metric("kjv_completion", "rougeL") <= 1.0
    assert set(results["group_subtasks"]["kjv_pack"]) == {"kjv_perplexity", "kjv_cloze", "kjv_completion"}
