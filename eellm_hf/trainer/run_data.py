"""The run's data around the training loop: tokenized, packed rows cached under ``run_dir`` (built once by world
rank 0, keyed by content) and the fixed validation batch."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from .nanotron_compat import ParallelContext, dist

if TYPE_CHECKING:
    from .config import TrainConfig, TrainerConfig

__all__ = ["data_cache_key", "packed_rows", "validation_batch"]


def packed_rows(cfg: TrainerConfig, ctx: ParallelContext) -> np.ndarray:
    """Tokenized, packed rows of ``seq_len + 1`` tokens: built on world rank 0 (tokenizer trained first if the
    config asks for it) and cached under ``run_dir``, then memory-mapped by every rank. The cache is keyed by
    the contents of the data files and of the tokenizer folder (:func:`data_cache_key`), so a file rewritten
    in place or a retrained tokenizer builds a new one."""
    from .config import ensure_tokenizer
    from .data import PackedDataset, load_text_dataset

    data = cfg.data
    key = torch.zeros(16, dtype=torch.uint8, device=ctx.device)
    if dist.get_rank(ctx.world_pg) == 0:
        tokenizer_dir = ensure_tokenizer(data)
        text_key = data_cache_key(cfg, tokenizer_dir)
        cache = Path(cfg.run_dir) / "data_cache" / f"packed_{text_key}.npy"
        if not cache.is_file():
            from transformers import AutoTokenizer

            tokenizer = AutoTokenizer.from_pretrained(str(tokenizer_dir))
            texts = load_text_dataset(data.files, text_field=data.text_field, sample_by=data.sample_by,
                                      cache_dir=data.cache_dir)["text"]
            cache.parent.mkdir(parents=True, exist_ok=True)
            tmp = cache.with_name(cache.name + f".{os.getpid()}.tmp.npy")
            PackedDataset.from_texts(texts, tokenizer, data.seq_len).save(tmp)
            os.replace(tmp, cache)
        key.copy_(torch.tensor(list(text_key.encode()), dtype=torch.uint8))
    dist.broadcast(key, src=0, group=ctx.world_pg)  # also the barrier: the others wait for the cache here
    text_key = bytes(key.cpu().tolist()).decode()
    return PackedDataset.load(Path(cfg.run_dir) / "data_cache" / f"packed_{text_key}.npy").rows


def data_cache_key(cfg: TrainerConfig, tokenizer_dir: Path) -> str:
    """16 hex digits naming the packed-data cache: the size and sha256 of every data file and every tokenizer
    file, and the packing settings (never the paths alone)."""
    from .data import content_fingerprint

    data = cfg.data
    tokenizer_files = sorted(p for p in Path(tokenizer_dir).iterdir() if p.is_file())
    what = [content_fingerprint(data.files), content_fingerprint(tokenizer_files), data.seq_len, data.text_field,
            data.sample_by]
    return hashlib.sha256(json.dumps(what).encode()).hexdigest()[:16]


def validation_batch(val_set: Any, train: TrainConfig, dp: int) -> dict[str, torch.Tensor] | None:
    """The validation sequences used at each validation (the first ``val_batches`` global batches, whole
    multiples of ``dp * micro_batch_size``)."""
    if len(val_set) == 0:
        return None
    unit = dp * train.micro_batch_size
    count = len(val_set)
    if train.val_batches is not None:
        count = min(count, train.val_batches * train.global_batch_size)
    count -= count % unit
    if count == 0:
        raise ValueError(f"the validation set ({len(val_set)} sequences) is smaller than dp * micro_batch_size "
                         f"= {unit}")
    return val_set.batch(np.arange(count))
