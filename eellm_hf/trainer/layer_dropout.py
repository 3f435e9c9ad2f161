"""LayerSkip's layer dropout: which sequences of a global batch skip which decoder layers at a training step.

The draw depends only on the seed, the step and a sequence's position in the global batch, so every parallel
layout (and a single process) skips the same layers for the same sequences. The probabilities come from
:meth:`eellm_hf.trainer.config.TrainConfig.layer_skip_rates_at`.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

__all__ = ["layer_keep_mask"]

_STREAM = 0x4C415945  # keeps these draws apart from other uses of the same seed


def layer_keep_mask(seed: int, step: int, batch_size: int, rates: Sequence[float]) -> torch.Tensor:
    """``(batch_size, len(rates))`` bool on the CPU: True where sequence ``i`` runs decoder layer ``l + 1`` at
    optimizer step ``step``, False (probability ``rates[l]``) where it skips it."""
    generator = torch.Generator().manual_seed((seed * 1_000_003 + step * 7_919 + _STREAM) % 2**63)
    draws = torch.rand(batch_size, len(rates), generator=generator, dtype=torch.float64)
    return draws >= torch.tensor(list(rates), dtype=torch.float64)
