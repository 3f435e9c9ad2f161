"""Loading a saved model and its tokenizer for generation, and the dtype names the command lines accept.

Used by the command lines (`eellm-generate`, `eellm-sweep`, `eellm-calibrate`), the demo and the benchmarks, so
that every one of them loads a model folder the same way. Not shipped as remote code.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from ..dtypes import DTYPES, torch_dtype


def load_tokenizer(model_dir: str | Path, trust_remote_code: bool = False) -> Any:
    """The folder's tokenizer, ready for batched generation: left padding, EOS as padding when it has none."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(model_dir), trust_remote_code=trust_remote_code)
    tokenizer.padding_side = "left"
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_model(model_dir: str | Path, dtype: str = "float32", device: str | torch.device = "cpu",
               trust_remote_code: bool = False) -> Any:
    """The folder's causal LM (an EarlyExitGPT one included: this registers it with the Auto classes) in `dtype`
    on `device`, in eval mode."""
    from transformers import AutoModelForCausalLM

    import eellm_hf  # noqa: F401  (registers EarlyExitGPT with the Auto classes)

    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch_dtype(dtype),
                                                 trust_remote_code=trust_remote_code)
    return model.to(device).eval()


def load_model_and_tokenizer(model_dir: str | Path, dtype: str = "float32", device: str | torch.device = "cpu",
                             trust_remote_code: bool = False) -> tuple[Any, Any]:
    """`load_model` and `load_tokenizer` of one folder."""
    return (load_model(model_dir, dtype, device, trust_remote_code),
            load_tokenizer(model_dir, trust_remote_code))


__all__ = ["DTYPES", "load_model", "load_model_and_tokenizer", "load_tokenizer", "torch_dtype"]
