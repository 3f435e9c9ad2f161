"""The dtype names the command lines and the trainer config accept: one table for all of them.

A leaf module (it imports only torch), so the trainer's processes can use it without importing transformers.
"""

from __future__ import annotations

import torch

DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
    "float64": torch.float64,
}


def torch_dtype(name: str) -> torch.dtype:
    """The dtype named `name` (a key of `DTYPES`)."""
    if name not in DTYPES:
        raise ValueError(f"dtype must be one of {', '.join(DTYPES)}, got {name!r}")
    return DTYPES[name]


__all__ = ["DTYPES", "torch_dtype"]
