"""``model.init_from``: the checkpoint a run starts from, converted to an EarlyExitGPT folder when needed.

``init_from`` is either an EarlyExitGPT folder (from ``eellm-convert`` or an earlier run), loaded as it is, or a
pretrained Llama / Mistral / Qwen2 checkpoint that :mod:`eellm_hf.modeling.convert` turns into one on the fly, as
``eellm-convert`` would: a Hugging Face folder, a ``.gguf`` file or a bundled model's name (``smollm2-135m``).
The early-exit fields (``exit_layers``, ``exit_loss_weights``, ``exit_norm``, ...) then come from the ``model``
section. Global rank 0 writes the converted folder (weights, tokenizer, chat template, generation config) to
``<run_dir>/init_model`` once; a later run with the same source and exits reuses it.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

__all__ = ["EXIT_FIELDS", "converted_dir", "is_early_exit_folder", "pretrained_config", "prepare_init_model"]

EXIT_FIELDS = ("exit_layers", "exit_loss_weights", "exit_norm", "exit_mlp", "exit_block", "exit_gate", "tie_exit_heads")
"""EarlyExitGPTConfig fields that say which exits a converted checkpoint gets."""

_MARKER = "eellm_init_from.json"


def is_early_exit_folder(init_from: str | Path) -> bool:
    """Whether ``init_from`` is a folder holding an EarlyExitGPT config (else a checkpoint to convert)."""
    path = Path(init_from)
    if not (path / "config.json").is_file():
        return False
    with open(path / "config.json", encoding="utf-8") as f:
        return json.load(f).get("model_type") == "early_exit_gpt"


def converted_dir(run_dir: str | Path) -> Path:
    """Where a run keeps the EarlyExitGPT conversion of its ``init_from`` checkpoint."""
    return Path(run_dir) / "init_model"


def pretrained_config(init_from: str | Path) -> Any:
    """The transformers config of a checkpoint to convert (``FileNotFoundError`` names a missing source)."""
    from eellm_hf.modeling.sources import resolve_source

    return resolve_source(init_from).load_config()


def _conversion_record(init_from: str | Path, model_config: Any) -> dict[str, Any]:
    return {"source": str(init_from), **{name: getattr(model_config, name) for name in EXIT_FIELDS}}


def prepare_init_model(init_from: str | Path, model_config: Any, run_dir: str | Path, *, is_writer: bool,
                       barrier: Any = None) -> Path:
    """The EarlyExitGPT folder to load weights from: ``init_from`` itself, or its conversion with
    ``model_config``'s exits, written by the rank with ``is_writer`` (all ranks then wait at ``barrier()``)."""
    if is_early_exit_folder(init_from):
        return Path(init_from)
    out = converted_dir(run_dir)
    record = _conversion_record(init_from, model_config)
    if is_writer and not _matches(out, record):
        _convert(init_from, model_config, out, record)
    if barrier is not None:
        barrier()
    return out


def _matches(out: Path, record: dict[str, Any]) -> bool:
    marker = out / _MARKER
    return marker.is_file() and json.loads(marker.read_text()) == json.loads(json.dumps(record))


def _convert(init_from: str | Path, model_config: Any, out: Path, record: dict[str, Any]) -> None:
    """Convert into a temporary sibling folder, then swap it in, so a crash never leaves a half folder."""
    import torch

    from eellm_hf.modeling.convert import llama_to_early_exit
    from eellm_hf.modeling.sources import resolve_source

    source = resolve_source(init_from)
    options = {name: getattr(model_config, name) for name in EXIT_FIELDS if name != "exit_layers"}
    model = llama_to_early_exit(source.load_model(torch.float32), list(model_config.exit_layers), **options)
    tmp = out.with_name(f".{out.name}.{os.getpid()}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    if source.has_tokenizer():
        source.load_tokenizer().save_pretrained(tmp)
    (tmp / _MARKER).write_text(json.dumps(record, indent=1))
    if out.exists():
        shutil.rmtree(out)
    os.replace(tmp, out)
