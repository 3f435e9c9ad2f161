"""Per-step schedules of the ``train:`` section: the exits' loss-weight warm-up or cool-down (EE-LLM) and
LayerSkip's layer dropout rates."""

from __future__ import annotations

import dataclasses
import math
from typing import Literal

from .config_checks import need, need_choice

__all__ = ["ExitLossWeightSchedule", "LayerDropout"]


@dataclasses.dataclass
class ExitLossWeightSchedule:
    """``train.exit_loss_weight_schedule`` (EE-LLM's ``--exit-layer-weight-init``, ``--exit-layer-weight-warmup-
    iters``, ``--exit-layer-weight-warmup-style``): every exit's loss weight starts at ``init`` (an absolute
    weight, the same for every exit) at step 0 and moves to that exit's target ``model.exit_loss_weights[i]``
    over ``warmup_steps`` optimizer steps (``linear``, or ``cosine``: slow at both ends), then stays at the
    target. ``init`` above a target gives a cool-down, below it a warm-up."""

    init: float = 0.0
    warmup_steps: int = 0
    type: Literal["linear", "cosine"] = "linear"

    def __post_init__(self) -> None:
        where = "train.exit_loss_weight_schedule"
        need(self.init >= 0.0, f"`{where}.init` must be >= 0, got {self.init}")
        need(self.warmup_steps >= 0, f"`{where}.warmup_steps` must be >= 0, got {self.warmup_steps}")
        need_choice(f"{where}.type", self.type, ("linear", "cosine"))

    def progress(self, step: int) -> float:
        """How far along the schedule step ``step`` (0-based) is: 0 at step 0, 1 from ``warmup_steps`` on."""
        if self.warmup_steps <= 0 or step >= self.warmup_steps:
            return 1.0
        progress = max(step, 0) / self.warmup_steps
        if self.type == "cosine":
            progress = 0.5 * (1.0 - math.cos(math.pi * progress))
        return progress

    def weight_at(self, step: int, target: float) -> float:
        """The weight at ``step`` of an exit whose target weight is ``target``."""
        progress = self.progress(step)
        if progress >= 1.0:
            return float(target)
        return self.init + (float(target) - self.init) * progress



@dataclasses.dataclass
class LayerDropout:
    """``train.layer_dropout`` (LayerSkip's layer dropout, Elhoushi et al. 2024): while training, each sequence
    skips decoder layer ``l`` (1-based, of ``L``) with probability ``p_l(t) = S(t) * D(l) * max_rate``: the skipped
    layer passes its input through unchanged (no rescaling; exits after it still compute). ``D(l) = 2 ** ((l - 1)
    / (L - 1)) - 1`` rises from 0 (the first layer is never skipped) to 1 (the last layer). ``S(t)`` is 1
    (``curriculum: constant``) or ``2 ** (t / (T - 1)) - 1`` (``exponential``: 0 at the first of the ``T`` steps, 1
    at the last). Validation, evaluation and exported models run every layer."""

    max_rate: float = 0.1
    curriculum: Literal["constant", "exponential"] = "constant"

    def __post_init__(self) -> None:
        need(0.0 <= self.max_rate < 1.0, f"`train.layer_dropout.max_rate` must be in [0, 1), got {self.max_rate}")
        need_choice("train.layer_dropout.curriculum", self.curriculum, ("constant", "exponential"))

    def rates_at(self, step: int, total_steps: int, num_layers: int) -> list[float]:
        """Skip probability of each decoder layer (1..``num_layers``) at optimizer step ``step`` (0-based)."""
        if self.curriculum == "exponential":
            scale = 2.0 ** (min(max(step, 0), total_steps - 1) / (total_steps - 1)) - 1.0 if total_steps > 1 else 1.0
        else:
            scale = 1.0
        if num_layers == 1:
            return [0.0]
        return [scale * self.max_rate * (2.0 ** (layer / (num_layers - 1)) - 1.0) for layer in range(num_layers)]
