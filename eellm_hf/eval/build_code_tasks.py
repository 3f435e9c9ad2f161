"""Build the offline ``python_pack`` lm-eval task data from held-out Python standard-library files
(see :mod:`eellm_hf.code_corpus`; training pipelines read ``builtin:python-stdlib``, which excludes them).

Rebuild the committed data with::

    python -m eellm_hf.eval.build_code_tasks            # writes eellm_hf/eval/tasks/data/python_*.jsonl
    python -m eellm_hf.eval.build_code_tasks --out DIR

The output is deterministic for a given Python version (fixed seed, files in path order, fixed JSON formatting).
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ..code_corpus import completion_prompts, python_source_documents
from .build_tasks import builder_main, write_task_files

SEED: int = 1991  # the year of Python's first release
N_PERPLEXITY: int = 48
N_COMPLETION: int = 64
CHUNK_CHARS: int = 1500  # perplexity chunks: consecutive blocks of a file, cut at blank lines
COMPLETION_CONTEXT_LINES, COMPLETION_REFERENCE_LINES = 16, 4

DEFAULT_OUT: Path = Path(__file__).resolve().parent / "tasks" / "data"
TASK_FILES: tuple[str, ...] = ("python_perplexity.jsonl", "python_completion.jsonl")


def _chunks(text: str) -> list[str]:
    """Consecutive blocks of ``text`` of at most about CHUNK_CHARS characters, cut where a blank line starts."""
    chunks, current = [], ""
    for block in text.split("\n\n"):
        if current and len(current) + len(block) + 2 > CHUNK_CHARS:
            chunks.append(current)
            current = block
        else:
            current = f"{current}\n\n{block}" if current else block
    if current:
        chunks.append(current)
    return [chunk for chunk in chunks if 200 <= len(chunk) <= 2 * CHUNK_CHARS]


def build_rows() -> dict[str, list[dict[str, Any]]]:
    """The rows of every task file, from the held-out split only (deterministic)."""
    candidates = [{"path": document["path"], "text": chunk}
                  for document in python_source_documents(held_out=True) for chunk in _chunks(document["text"])]
    chosen = sorted(random.Random(SEED).sample(range(len(candidates)), min(N_PERPLEXITY, len(candidates))))
    perplexity = [candidates[index] for index in chosen]
    completion = [{"path": row["path"], "prompt": row["prompt"], "continuation": row["reference"]}
                  for row in completion_prompts(N_COMPLETION, COMPLETION_CONTEXT_LINES, COMPLETION_REFERENCE_LINES,
                                                seed=SEED)]
    return {"python_perplexity.jsonl": perplexity, "python_completion.jsonl": completion}


def build(out_dir: str | Path = DEFAULT_OUT) -> list[Path]:
    """Write the task jsonl files into ``out_dir`` and return their paths."""
    return write_task_files(build_rows(), out_dir)


def main(argv: Sequence[str] | None = None) -> None:
    builder_main(argv, __doc__.splitlines()[0], DEFAULT_OUT, build)



if __name__ == "__main__":
    main()
