"""Helpers referenced from the ``kjv_*`` and ``python_*`` task YAMLs via ``!function utils.<name>``.

lm-eval hands ``dataset_kwargs`` straight to ``datasets.load_dataset``, which resolves relative
``data_files`` against the current working directory. The loaders below are used as
``custom_dataset`` instead, so the jsonl files are always found next to this module.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import datasets
from rouge_score import rouge_scorer

DATA_DIR: Path = Path(__file__).resolve().parent / "data"

_SCORER: rouge_scorer.RougeScorer | None = None


def _load(name: str) -> datasets.DatasetDict:
    with (DATA_DIR / name).open(encoding="utf-8") as fh:
        rows = [json.loads(line) for line in fh if line.strip()]
    return datasets.DatasetDict({"test": datasets.Dataset.from_list(rows)})


def load_perplexity(**_: Any) -> datasets.DatasetDict:
    """Held-out passages for ``kjv_perplexity`` (extra metadata kwargs are ignored)."""
    return _load("kjv_perplexity.jsonl")


def load_cloze(**_: Any) -> datasets.DatasetDict:
    """Last-word cloze items for ``kjv_cloze``."""
    return _load("kjv_cloze.jsonl")


def load_completion(**_: Any) -> datasets.DatasetDict:
    """Half-verse prompts for ``kjv_completion``."""
    return _load("kjv_completion.jsonl")


def load_python_perplexity(**_: Any) -> datasets.DatasetDict:
    """Held-out standard-library code chunks for ``python_perplexity``."""
    return _load("python_perplexity.jsonl")


def load_python_completion(**_: Any) -> datasets.DatasetDict:
    """Held-out code prompts and the lines that follow them, for ``python_completion``."""
    return _load("python_completion.jsonl")


def _normalize(text: str) -> str:
    return " ".join(text.split())


def rouge_l(prediction: str, reference: str) -> float:
    """ROUGE-L F-measure between two strings (``rouge-score`` package, no stemming)."""
    global _SCORER
    if _SCORER is None:
        _SCORER = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=False)
    return float(_SCORER.score(reference, prediction)["rougeL"].fmeasure)


def process_results_completion(doc: dict[str, Any], results: list[str]) -> dict[str, float]:
    """Score one generated continuation: whitespace-normalised exact match and ROUGE-L F1."""
    prediction = _normalize(results[0])
    reference = _normalize(doc["continuation"])
    return {
        "exact_match": float(prediction == reference),
        "rougeL": rouge_l(prediction, reference),
    }
