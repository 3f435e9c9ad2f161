"""The settings of an early-exit `generate` call, validated once, and what the call computed.

`EarlyExitSettings.resolve` is the one place the early-exit settings are checked: `generate`, the command line,
lm-eval, the sweep and the trainer's `export_generation` all go through it. `mean_exit_layer` is the one
definition of the mean exit layer of a count of tokens per exit.

This file is shipped next to the weights as remote code: it imports only the standard library.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

EXIT_CONFIDENCE_MEASURES = ("max_prob", "top2_margin", "gate", "gate_max_prob")
GATED_MEASURES = ("gate", "gate_max_prob")  # measures that read the exits' confidence gates (`config.exit_gate`)
EARLY_EXIT_GENERATION_KEYS = ("early_exit_threshold", "exit_confidence", "exit_gate_threshold", "active_exits",
                              "max_recompute_tokens", "early_exit_max_batch_size")


def mean_exit_layer(tokens_per_exit: Mapping[int, int]) -> float | None:
    """Mean layer that produced the tokens counted in `tokens_per_exit` (`{layer: tokens}`); None for no tokens."""
    total = sum(tokens_per_exit.values())
    if not total:
        return None
    return sum(layer * count for layer, count in tokens_per_exit.items()) / total


@dataclass(frozen=True)
class EarlyExitSettings:
    """Validated early-exit settings of one `generate` call.

    Args:
        threshold (`float` or `None`): confidence an exit needs to produce the token; `None` decodes at full depth.
        confidence (`str`): `"max_prob"` (largest probability, as EE-LLM), `"top2_margin"` (p1 - p2), `"gate"`
            (the exit's learned confidence gate, `config.exit_gate`: evaluated before the vocabulary projection,
            which then runs only for the tokens that leave), or `"gate_max_prob"` (the gate screens, the largest
            probability decides: the projection runs for the tokens whose gate reaches `gate_threshold`, and
            those of them leave whose largest probability reaches `threshold`).
        gate_threshold (`float` or `None`, `exit_gate_threshold`): the gate probability that `"gate_max_prob"`
            screens with (needed by it; other measures ignore it).
        active_exits (`tuple[int]`): indices into `config.exit_layers` of the exits allowed to fire.
        max_recompute_tokens (`int` or `None`): cap on a row's backlog of tokens whose deep KV is missing (the
            current token included); reaching it fills the backlog's deep KV in the same forward pass.
        max_batch_size (`int` or `None`, `early_exit_max_batch_size`): the largest batch (sequences decoded together)
            that exits early; a larger one decodes at full depth. Where a decoder layer's cost is mostly reading
            its weights (CPUs, and GPUs at small batches), a row that leaves early saves almost nothing while the
            other rows go on, and its deep KV must still be recomputed: such batches are faster at full depth.
    """

    threshold: float | None = None
    confidence: str = "max_prob"
    gate_threshold: float | None = None
    active_exits: tuple[int, ...] = ()
    max_recompute_tokens: int | None = None
    max_batch_size: int | None = None

    @classmethod
    def resolve(
        cls, model_config: Any, overrides: Mapping[str, Any], generation_configs: Iterable[Any] = ()
    ) -> EarlyExitSettings:
        """Settings from `overrides` (`generate` kwargs) first, then the first generation config that defines them,
        then defaults; every value checked against `model_config` (its `exit_layers`, `exit_gate`)."""
        configs = [config for config in generation_configs if config is not None]

        def setting(name: str) -> Any:
            if name in overrides:
                return overrides[name]
            for config in configs:
                if hasattr(config, name):
                    return getattr(config, name)
            return None

        confidence = _confidence(setting("exit_confidence"), model_config)
        return cls(
            threshold=_threshold(setting("early_exit_threshold"), model_config),
            confidence=confidence,
            gate_threshold=_gate_threshold(setting("exit_gate_threshold"), confidence),
            active_exits=_active_exits(setting("active_exits"), list(getattr(model_config, "exit_layers", ()))),
            max_recompute_tokens=_recompute_cap(setting("max_recompute_tokens")),
            max_batch_size=_batch_cap(setting("early_exit_max_batch_size")),
        )

    def exits_at_batch_size(self, batch_size: int) -> bool:
        """Whether a batch of `batch_size` sequences decodes with early exit (a threshold set, the batch within
        `max_batch_size`)."""
        return self.threshold is not None and (self.max_batch_size is None or batch_size <= self.max_batch_size)


def check_threshold(threshold: Any) -> float | None:
    """`early_exit_threshold` as a float in [0, 1], or None (full depth); a `ValueError` naming it otherwise."""
    if threshold is None:
        return None
    if isinstance(threshold, bool) or not isinstance(threshold, (int, float)) or not 0.0 <= threshold <= 1.0:
        raise ValueError(f"`early_exit_threshold` must be None (full depth) or a number in [0, 1], got {threshold!r}.")
    return float(threshold)


def _threshold(threshold: Any, model_config: Any) -> float | None:
    threshold = check_threshold(threshold)
    if threshold is not None and not getattr(model_config, "exit_layers", None):
        raise ValueError(
            f"`early_exit_threshold`={threshold} needs early exits, but this model has none (`exit_layers` "
            "is empty, e.g. a Llama folder loaded as EarlyExitGPTForCausalLM): add exits with "
            "`eellm-convert SRC DST --exit-layers ...`, or leave the threshold unset for full depth."
        )
    return threshold


def _confidence(confidence: Any, model_config: Any) -> str:
    confidence = confidence or "max_prob"
    if confidence not in EXIT_CONFIDENCE_MEASURES:
        raise ValueError(f"`exit_confidence` must be one of {EXIT_CONFIDENCE_MEASURES}, got {confidence!r}.")
    if confidence in GATED_MEASURES and not getattr(model_config, "exit_gate", False):
        raise ValueError(f"`exit_confidence={confidence!r}` needs exits with confidence gates (`config.exit_gate`); "
                         "this model has none: use 'max_prob' or 'top2_margin'.")
    return confidence


def _gate_threshold(threshold: Any, confidence: str) -> float | None:
    if threshold is not None and (isinstance(threshold, bool) or not isinstance(threshold, (int, float))
                                  or not 0.0 <= threshold <= 1.0):
        raise ValueError(f"`exit_gate_threshold` must be None or a number in [0, 1], got {threshold!r}.")
    if confidence == "gate_max_prob" and threshold is None:
        raise ValueError("`exit_confidence='gate_max_prob'` needs `exit_gate_threshold` (the gate probability that "
                         "lets a token's exit compute its distribution), got None.")
    return None if threshold is None else float(threshold)


def _active_exits(requested: Any, exit_layers: list[int]) -> tuple[int, ...]:
    """Indices into `exit_layers` of the requested exit layers (all exits when None)."""
    if requested is None:
        return tuple(range(len(exit_layers)))
    if isinstance(requested, (int, str)) or not isinstance(requested, Iterable):
        raise ValueError(f"`active_exits` must be a list of exit layers, got {requested!r}.")
    requested = list(requested)
    wrong = [layer for layer in requested if isinstance(layer, bool) or layer not in exit_layers]
    if wrong:
        raise ValueError(
            f"active_exits {wrong} are not exits of this model: its exits sit after layers {exit_layers}."
        )
    return tuple(sorted({exit_layers.index(layer) for layer in requested}))


def _recompute_cap(cap: Any) -> int | None:
    if cap is not None and (isinstance(cap, bool) or not isinstance(cap, int) or cap < 1):
        raise ValueError(f"`max_recompute_tokens` must be None (no cap) or an integer >= 1, got {cap!r}.")
    return cap


def _batch_cap(cap: Any) -> int | None:
    if cap is not None and (isinstance(cap, bool) or not isinstance(cap, int) or cap < 1):
        raise ValueError(f"`early_exit_max_batch_size` must be None (any batch) or an integer >= 1, got {cap!r}.")
    return cap


@dataclass
class EarlyExitStats:
    """What an early-exit `generate` call computed, for speed and cost accounting.

    A "token-layer" is one token run through one decoder layer. Counts cover the whole batch and the prefill.

    Args:
        exit_layers (`tuple[int]`): the layers a token can leave at: the active exits', then `num_hidden_layers`.
        tokens_per_exit (`dict[int, int]`): generated tokens produced at each of `exit_layers` (padding excluded).
        recomputed_tokens (`int`): backlog tokens fed again to fill KV they were missing (once per refill).
        recomputed_token_layers (`int`): token-layers those refills computed (backbone and exit blocks).
        layer_tokens (`int`): token-layers computed in the backbone, refills and prefill included.
        exit_block_tokens (`list[int]`): token-layers computed by each exit's block (0 without exit blocks).
        padding_token_layers (`int`): token-layers computed only to align the rows of a batch (results unused).
        exit_head_tokens (`list[int]`): tokens whose vocabulary projection each exit evaluated (with the `"gate"`
            measure, only the tokens that left there).
        exit_gate_tokens (`list[int]`): tokens each exit's confidence gate (and norm) evaluated.
        exit_mlp_tokens (`list[int]`): tokens each exit's MLP evaluated (with a gate that reads before the MLP,
            only the tokens that left there).
        final_head_tokens (`int`): tokens the final norm and LM head evaluated.
        prefill_tokens (`int`): prompt tokens computed in the prefill (all rows).
        completion_token_layers (`int`): token-layers computed after decoding to complete the returned cache
            (not included in the counts above).
    """

    exit_layers: tuple[int, ...]
    tokens_per_exit: dict[int, int]
    recomputed_tokens: int = 0
    recomputed_token_layers: int = 0
    layer_tokens: int = 0
    exit_block_tokens: list[int] = field(default_factory=list)
    padding_token_layers: int = 0
    exit_head_tokens: list[int] = field(default_factory=list)
    exit_gate_tokens: list[int] = field(default_factory=list)
    exit_mlp_tokens: list[int] = field(default_factory=list)
    final_head_tokens: int = 0
    prefill_tokens: int = 0
    completion_token_layers: int = 0

    @property
    def num_tokens(self) -> int:
        """Generated tokens (padding after a sequence finished excluded)."""
        return sum(self.tokens_per_exit.values())

    @property
    def mean_exit_layer(self) -> float:
        """Mean layer that produced the generated tokens (`num_hidden_layers` for the final head); NaN for none."""
        mean = mean_exit_layer(self.tokens_per_exit)
        return float("nan") if mean is None else mean


__all__ = [
    "EARLY_EXIT_GENERATION_KEYS",
    "EXIT_CONFIDENCE_MEASURES",
    "GATED_MEASURES",
    "EarlyExitSettings",
    "EarlyExitStats",
    "check_threshold",
    "mean_exit_layer",
]
