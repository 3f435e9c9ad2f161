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

__all__ = [
    "EXIT_FIELDS", "SHAPE_FIELDS", "check_init_from", "converted_dir", "is_early_exit_folder", "pretrained_config",
    "prepare_init_model",
]

SHAPE_FIELDS = (
    "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
    "num_key_value_heads", "head_dim", "hidden_act", "tie_word_embeddings", "attention_bias", "mlp_bias",
    "exit_layers", "exit_norm", "exit_mlp", "exit_block", "exit_gate", "tie_exit_heads",
)
"""Model fields that `init_from` configs may not change (they define the parameters to load)."""

EXIT_FIELDS = ("exit_layers", "exit_loss_weights", "exit_norm", "exit_mlp", "exit_block", "exit_gate",
               "exit_gate_before_mlp", "tie_exit_heads")
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


def check_init_from(init_from: str | Path, fields: dict[str, Any], converts: bool) -> None:
    """``model.init_from`` exists and the ``model`` section's other keys (``fields``) fit it: an EarlyExitGPT
    folder whose shapes they leave alone, or (``converts``) a checkpoint to convert, to which they only add exits."""
    if converts:
        _check_conversion(init_from, fields)
        return
    folder = Path(init_from)
    if not (folder / "config.json").is_file():
        raise FileNotFoundError(f"`model.init_from`: no config.json in {folder}")
    with open(folder / "config.json", encoding="utf-8") as f:
        saved = json.load(f)
    if saved.get("model_type") != "early_exit_gpt":
        raise ValueError(
            f"`model.init_from` {folder} has model_type {saved.get('model_type')!r}, not 'early_exit_gpt': "
            "convert it first with `eellm-convert SRC DST --exit-layers ...`"
        )
    for name in SHAPE_FIELDS:
        if name in fields and name in saved and fields[name] != saved[name]:
            raise ValueError(
                f"`model.{name}`={fields[name]!r} differs from {saved[name]!r} in `model.init_from` "
                f"({folder}); fields that change parameter shapes cannot be overridden"
            )


def _check_conversion(init_from: str | Path, fields: dict[str, Any]) -> None:
    """A pretrained checkpoint to convert: it exists, and the model keys only add exits (and non-shape keys)."""
    from eellm_hf.modeling.sources import resolve_source

    try:
        resolve_source(init_from)
    except FileNotFoundError as exc:
        raise FileNotFoundError(f"`model.init_from`: {exc}") from None
    _require("exit_layers" in fields,
             f"`model.init_from` {init_from} is not an EarlyExitGPT folder, so it is converted on the fly: "
             "`model.exit_layers` must say where the exits go")
    backbone = [name for name in SHAPE_FIELDS if name in fields and name not in EXIT_FIELDS]
    _require(not backbone, f"`model.{', model.'.join(backbone)}` cannot be set when converting `model.init_from` "
             f"{init_from}: the checkpoint defines the backbone's shapes")


def _require(condition: bool, message: str) -> None:
    if not condition:
        raise ValueError(message)
