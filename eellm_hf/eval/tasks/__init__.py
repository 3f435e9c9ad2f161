"""Offline lm-eval task packs (``kjv_pack``, ``python_pack``).

Use with ``lm_eval --include_path eellm_hf/eval/tasks``."""

from pathlib import Path

#: Directory to pass as lm-eval ``include_path`` / ``TaskManager(include_path=...)``.
TASKS_DIR: Path = Path(__file__).resolve().parent
