"""The trainer's tokenizer folder: checked before training, trained (``data.tokenizer: {train_bpe: ...}``) once."""

from __future__ import annotations

import json
import typing
from pathlib import Path

if typing.TYPE_CHECKING:
    from .config_schema import DataConfig


def is_tokenizer_dir(folder: Path) -> bool:
    """Whether ``folder`` holds a Hugging Face tokenizer."""
    return folder.is_dir() and any((folder / n).is_file() for n in ("tokenizer.json", "tokenizer_config.json"))


def check_tokenizer(folder: Path, model_vocab_size: int) -> None:
    """``data.tokenizer`` exists, is a tokenizer, and has no more ids than the model's vocabulary."""
    if not folder.is_dir():
        raise FileNotFoundError(f"`data.tokenizer`: tokenizer folder not found: {folder}")
    if not is_tokenizer_dir(folder):
        raise FileNotFoundError(f"`data.tokenizer`: {folder} has no tokenizer.json or tokenizer_config.json")
    size = tokenizer_size(folder)
    if size is not None and size > model_vocab_size:
        raise ValueError(
            f"`data.tokenizer` {folder} has {size} tokens, more than model.vocab_size={model_vocab_size}"
        )


def tokenizer_size(folder: Path) -> int | None:
    """Number of ids of a fast tokenizer (read from tokenizer.json without loading transformers), or None."""
    try:
        with open(folder / "tokenizer.json", encoding="utf-8") as f:
            spec = json.load(f)
        vocab = spec["model"]["vocab"]
        ids = set(vocab.values()) if isinstance(vocab, dict) else set(range(len(vocab)))
        ids.update(tok["id"] for tok in spec.get("added_tokens", []))
        return max(ids) + 1 if ids else 0
    except (OSError, KeyError, TypeError, ValueError):
        return None


def ensure_tokenizer(data: DataConfig) -> Path:
    """The tokenizer folder, first training it (``data.train_bpe``) if it does not exist yet.

    Call it on one rank (e.g. global rank 0), then barrier, before every rank loads the tokenizer.
    """
    if data.train_bpe is not None and not is_tokenizer_dir(data.tokenizer):
        from eellm_hf.trainer.data import train_bpe_tokenizer

        spec = data.train_bpe
        train_bpe_tokenizer(
            [Path(f) for f in data.files], spec.vocab_size, spec.out_dir,
            min_frequency=spec.min_frequency, text_field=data.text_field,
        )
    return data.tokenizer


__all__ = ["check_tokenizer", "ensure_tokenizer", "is_tokenizer_dir", "tokenizer_size"]
