"""Python source code from the Python standard library installed with the interpreter, read without network.

Real code that nobody here wrote, the same on every machine with the same Python version, and the kind of text
code-trained models such as SmolLM2 saw. Files are split deterministically by a hash of their path relative to
the standard library: one in :data:`HELD_OUT_BUCKETS` buckets of ten is held out for evaluation and never trained
on. Test suites, vendored code and files outside ``[MIN_BYTES, MAX_BYTES]`` are skipped.
"""

from __future__ import annotations

import hashlib
import json
import sysconfig
from pathlib import Path

HELD_OUT_BUCKETS = frozenset({0})  # of the ten buckets 0-9 given by a path's hash
MIN_BYTES, MAX_BYTES = 2_000, 60_000
_SKIPPED_PARTS = frozenset({"test", "tests", "idlelib", "lib2to3", "site-packages", "dist-packages", "turtledemo",
                            "__pycache__", "ensurepip", "pydoc_data", "encodings"})


def stdlib_root() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def _bucket(relative: str) -> int:
    return int(hashlib.sha256(relative.encode()).hexdigest(), 16) % 10


def python_source_files(held_out: bool = False) -> list[Path]:
    """The standard library's ``.py`` files of the training split (or the held-out split), sorted by path."""
    root = stdlib_root()
    files = []
    for path in sorted(root.rglob("*.py")):
        relative = path.relative_to(root).as_posix()
        if _SKIPPED_PARTS.intersection(path.relative_to(root).parts[:-1]) or path.name.startswith("test_"):
            continue
        if not MIN_BYTES <= path.stat().st_size <= MAX_BYTES:
            continue
        if (_bucket(relative) in HELD_OUT_BUCKETS) == held_out:
            files.append(path)
    return files


def python_source_documents(held_out: bool = False) -> list[dict[str, str]]:
    """``{"path", "text"}`` per file of the split (UTF-8 files only)."""
    root = stdlib_root()
    documents = []
    for path in python_source_files(held_out):
        try:
            text = path.read_text(encoding="utf-8")
        except UnicodeDecodeError:
            continue
        documents.append({"path": path.relative_to(root).as_posix(), "text": text})
    return documents


def write_python_corpus(out: str | Path, held_out: bool = False, max_bytes: int | None = None) -> Path:
    """Write the split as JSON lines (``text`` per file, for ``data.files`` with ``sample_by: document``), at most
    ``max_bytes`` of source (whole files, in path order)."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    total = 0
    with out.open("w", encoding="utf-8") as fh:
        for document in python_source_documents(held_out):
            if max_bytes is not None and total + len(document["text"]) > max_bytes and total > 0:
                break
            fh.write(json.dumps({"text": document["text"]}) + "\n")
            total += len(document["text"])
    return out


def completion_prompts(count: int = 64, context_lines: int = 24, reference_lines: int = 6, seed: int = 0
                       ) -> list[dict[str, str]]:
    """Held-out code completion: ``{"prompt", "reference", "path"}`` where the prompt is ``context_lines`` lines of
    a held-out file ending just before a line that opens a function body or a statement, and the reference the
    ``reference_lines`` lines that follow. Deterministic for a given Python version and ``seed``."""
    import random

    candidates = []
    for document in python_source_documents(held_out=True):
        lines = document["text"].splitlines(keepends=True)
        for index in range(context_lines, len(lines) - reference_lines):
            if lines[index].strip() and lines[index - 1].rstrip().endswith(":"):
                candidates.append((document["path"], lines, index))
    chosen = random.Random(seed).sample(candidates, min(count, len(candidates)))
    return [{"prompt": "".join(lines[index - context_lines:index]),
             "reference": "".join(lines[index:index + reference_lines]), "path": path}
            for path, lines, index in sorted(chosen, key=lambda item: (item[0], item[2]))]


def main(argv: list[str] | None = None) -> None:
    import argparse

    parser = argparse.ArgumentParser(description="Write the Python standard library corpus (train / held out) "
                                     "or held-out completion prompts as JSON lines.")
    parser.add_argument("out", type=Path)
    parser.add_argument("--split", choices=("train", "held_out", "prompts"), default="train")
    parser.add_argument("--count", type=int, default=64, help="prompts: how many")
    args = parser.parse_args(argv)
    if args.split == "prompts":
        args.out.parent.mkdir(parents=True, exist_ok=True)
        with args.out.open("w", encoding="utf-8") as fh:
            for prompt in completion_prompts(args.count):
                fh.write(json.dumps(prompt) + "\n")
    else:
        write_python_corpus(args.out, held_out=args.split == "held_out")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()


__all__ = ["completion_prompts", "python_source_documents", "python_source_files", "stdlib_root",
           "write_python_corpus"]
