"""The offline ``python_pack`` lm-eval tasks: held-out standard-library code, reproducible, runs end to end."""

from __future__ import annotations

import json
import math
from pathlib import Path

from eellm_hf.code_corpus import python_source_files, stdlib_root
from eellm_hf.eval import build_code_tasks
from eellm_hf.eval.tasks import TASKS_DIR

DATA_DIR = TASKS_DIR / "data"


def test_build_is_deterministic_and_matches_committed_data(tmp_path: Path) -> None:
    first = build_code_tasks.build(tmp_path / "a")
    second = build_code_tasks.build(tmp_path / "b")
    assert [path.name for path in first] == list(build_code_tasks.TASK_FILES)
    for a, b in zip(first, second):
        assert a.read_bytes() == b.read_bytes(), f"{a.name} differs between two builds"
        assert (DATA_DIR / a.name).read_bytes() == a.read_bytes(), (
            f"{DATA_DIR / a.name} is stale: rerun `python -m eellm_hf.eval.build_code_tasks`")


def test_tasks_use_held_out_files_only() -> None:
    root = stdlib_root()
    held_out = {path.relative_to(root).as_posix() for path in python_source_files(held_out=True)}
    trained = {path.relative_to(root).as_posix() for path in python_source_files()}
    assert held_out and trained and not held_out & trained
    for name in build_code_tasks.TASK_FILES:
        rows = [json.loads(line) for line in (DATA_DIR / name).read_text(encoding="utf-8").splitlines()]
        assert len(rows) >= 32
        assert {row["path"] for row in rows} <= held_out, name
    completion = [json.loads(line) for line in (DATA_DIR / "python_completion.jsonl").read_text().splitlines()]
    assert all(row["prompt"].count("\n") == 16 and row["continuation"].strip() for row in completion)


def test_python_pack_end_to_end(tiny_llama_dir: Path) -> None:
    import lm_eval
    from lm_eval.tasks import TaskManager

    results = lm_eval.simple_evaluate(
        model="hf", model_args=f"pretrained={tiny_llama_dir},dtype=float32", tasks=["python_pack"],
        task_manager=TaskManager(include_path=str(TASKS_DIR), include_defaults=False), limit=2, device="cpu",
        batch_size=2, log_samples=False, bootstrap_iters=0,
    )
    res = results["results"]
    assert math.isfinite(res["python_perplexity"]["bits_per_byte,none"]) and res["python_perplexity"][
        "bits_per_byte,none"] > 0
    assert 0.0 <= res["python_completion"]["rougeL,none"] <= 1.0
    assert set(results["group_subtasks"]["python_pack"]) == {"python_perplexity", "python_completion"}
