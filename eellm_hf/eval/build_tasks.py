"""Build the offline ``kjv_pack`` lm-eval task data from the King James Bible (see :mod:`eellm_hf.corpus`).

Evaluation data is drawn only from :data:`HELD_OUT_BOOKS` (the General Epistles and Revelation, the
last eight books). Training pipelines use :func:`eellm_hf.corpus.training_text`, which excludes them.

Rebuild the committed data with::

    python -m eellm_hf.eval.build_tasks            # writes eellm_hf/eval/tasks/data/*.jsonl
    python -m eellm_hf.eval.build_tasks --out DIR  # writes elsewhere

The output is deterministic (fixed seed, sorted pools, fixed JSON formatting): two runs produce
byte-identical files.
"""

from __future__ import annotations

import argparse
import json
import random
import re
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

from ..corpus import Verse, held_out_verses

SEED: int = 1611  # year of the first KJV printing
N_PERPLEXITY: int = 64
N_CLOZE: int = 200
N_COMPLETION: int = 150
PASSAGE_VERSES: int = 3  # consecutive verses per perplexity passage
N_DISTRACTORS: int = 3
COMPLETION_MAX_WORDS: int = 28  # keeps the reference continuation within max_gen_toks

DEFAULT_OUT: Path = Path(__file__).resolve().parent / "tasks" / "data"
TASK_FILES: tuple[str, ...] = ("kjv_perplexity.jsonl", "kjv_cloze.jsonl", "kjv_completion.jsonl")

_WORD_RE = re.compile(r"^[A-Za-z]+$")
_TRAILING_PUNCT = ".,;:!?'\"()[]"



def _split_last_word(text: str) -> tuple[str, str] | None:
    """Split a verse into (context, last word without trailing punctuation), or None if unusable."""
    head, _, last = text.rpartition(" ")
    word = last.rstrip(_TRAILING_PUNCT)
    if not head or not _WORD_RE.match(word):
        return None
    return head, word


def _passages(verses: Sequence[Verse]) -> list[list[Verse]]:
    """Chunk verses into non-overlapping runs of PASSAGE_VERSES consecutive verses within a chapter."""
    chapters: dict[tuple[str, int], list[Verse]] = {}
    for v in verses:
        chapters.setdefault((v["book"], v["chapter"]), []).append(v)
    out: list[list[Verse]] = []
    for chapter in chapters.values():
        for i in range(0, len(chapter) - PASSAGE_VERSES + 1, PASSAGE_VERSES):
            out.append(chapter[i : i + PASSAGE_VERSES])
    return out


def _citation_range(passage: Sequence[Verse]) -> str:
    first, last = passage[0], passage[-1]
    return f"{first['book']} {first['chapter']}:{first['verse']}-{last['verse']}"


def build_rows(verses: Sequence[Verse] | None = None) -> dict[str, list[dict[str, Any]]]:
    """Build the rows of every task file from the held-out verses (deterministic)."""
    verses = list(verses) if verses is not None else held_out_verses()
    rng = random.Random(SEED)

    # Perplexity: whole passages. Each task uses verses disjoint from the other tasks.
    passages = _passages(verses)
    chosen = sorted(rng.sample(range(len(passages)), N_PERPLEXITY))
    perplexity = [
        {"citation": _citation_range(p), "text": " ".join(v["text"] for v in p)}
        for p in (passages[i] for i in chosen)
    ]
    used = {v["citation"] for i in chosen for v in passages[i]}
    remaining = [v for v in verses if v["citation"] not in used]

    # Completion: short verses split in half by words (the reference fits in max_gen_toks).
    completion_candidates = [v for v in remaining if 8 <= len(v["text"].split()) <= COMPLETION_MAX_WORDS]
    completion: list[dict[str, Any]] = []
    completion_pick = sorted(rng.sample(range(len(completion_candidates)), N_COMPLETION))
    for i in completion_pick:
        v = completion_candidates[i]
        words = v["text"].split()
        k = len(words) // 2
        completion.append(
            {"citation": v["citation"], "prompt": " ".join(words[:k]), "continuation": " ".join(words[k:])}
        )

    used |= {completion_candidates[i]["citation"] for i in completion_pick}
    remaining = [v for v in verses if v["citation"] not in used]

    # Cloze: remaining verses ending in a plain word; distractors come from the pool of such words.
    cloze_candidates = [(v, split) for v in remaining if (split := _split_last_word(v["text"])) is not None]
    cloze_candidates = [(v, s) for v, s in cloze_candidates if len(s[0].split()) >= 5]
    pool = sorted({s[1] for _, s in cloze_candidates})
    cloze_pick = sorted(rng.sample(range(len(cloze_candidates)), N_CLOZE))
    cloze: list[dict[str, Any]] = []
    for i in cloze_pick:
        v, (context, answer) = cloze_candidates[i]
        distractors: list[str] = []
        while len(distractors) < N_DISTRACTORS:
            w = pool[rng.randrange(len(pool))]
            if w.lower() != answer.lower() and w.lower() not in {d.lower() for d in distractors}:
                distractors.append(w)
        choices = [answer, *distractors]
        rng.shuffle(choices)
        cloze.append(
            {
                "citation": v["citation"],
                "context": context,
                "choices": choices,
                "label": choices.index(answer),
            }
        )

    return {
        "kjv_perplexity.jsonl": perplexity,
        "kjv_cloze.jsonl": cloze,
        "kjv_completion.jsonl": completion,
    }


def dump_jsonl(rows: Iterable[dict[str, Any]]) -> bytes:
    """Task rows as JSON lines (fixed formatting, so that builds are byte-identical)."""
    return "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows).encode("utf-8")


def write_task_files(rows_by_file: dict[str, list[dict[str, Any]]], out_dir: str | Path) -> list[Path]:
    """Write each ``{file name: rows}`` entry as deterministic JSON lines into ``out_dir``; return the paths."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    written: list[Path] = []
    for name, rows in rows_by_file.items():
        path = out / name
        path.write_bytes(dump_jsonl(rows))
        written.append(path)
    return written


def builder_main(argv: Sequence[str] | None, description: str, default_out: Path,
                 build_files: Callable[[str | Path], list[Path]]) -> None:
    """The command line of a task-pack builder: ``--out DIR``, then one line per file written."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--out", default=str(default_out), help="output directory (default: %(default)s)")
    args = parser.parse_args(argv)
    for path in build_files(args.out):
        n = sum(1 for _ in path.open(encoding="utf-8"))
        print(f"wrote {path} ({n} docs)")


def build(out_dir: str | Path = DEFAULT_OUT) -> list[Path]:
    """Write the task jsonl files into ``out_dir`` and return their paths."""
    return write_task_files(build_rows(), out_dir)


def main(argv: Sequence[str] | None = None) -> None:
    """CLI entry point."""
    builder_main(argv, __doc__.splitlines()[0], DEFAULT_OUT, build)



if __name__ == "__main__":
    main()
