"""Offline lm-eval task pack (``kjv_pack``); use with ``lm_eval --include_path eellm_hf/eval/tasks``."""

from pathlib import Path

#: Directory to pass as lm-eval ``include_path`` / ``TaskManager(include_path=...)``.
TASKS_DIR: Path = Path(__file__).resolve().parent
