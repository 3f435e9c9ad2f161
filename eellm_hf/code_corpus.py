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


__all__ = ["python_source_documents", "python_source_files", "stdlib_root", "write_python_corpus"]
