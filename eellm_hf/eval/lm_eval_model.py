"""The lm-eval model ``eellm``: lm-eval's ``HFLM`` with early-exit generation, per-exit scoring and cost accounting.

Usage (model_args are lm-eval's usual comma-separated ``key=value`` list)::

    eellm-eval --model eellm --include_path eellm_hf/eval/tasks --tasks kjv_pack --device cpu \\
        --model_args 'pretrained=DIR,early_exit_threshold=0.8,exit_confidence=max_prob,active_exits=4|8'

Early-exit model_args (everything else is ``HFLM``'s, e.g. ``dtype``, ``batch_size``, ``max_length``):

* ``early_exit_threshold``: confidence an exit needs to produce a generated token, in ``[0, 1]``; ``None`` (the
  default, also ``none``/``off``) decodes at full depth, so ``--model eellm`` then gives ``--model hf``'s results
  (even where the export's ``generation_config.json`` recommends early exit, which ``--model hf`` would follow).
* ``exit_confidence``: ``max_prob`` (default), ``top2_margin``, ``gate`` (exits with learned gates) or
  ``gate_max_prob`` (the gate screens at ``exit_gate_threshold``, the largest probability decides).
* ``active_exits``: the exit layers allowed to fire (default: all). lm-eval splits model_args on commas, so
  separate layers with ``|`` or ``;`` (``active_exits=4|8``; quote the model_args in a shell); a list also
  works (``simple_evaluate(model_args={..., "active_exits": [4, 8]})``, or JSON model_args on the command line).
* ``max_recompute_tokens``: cap on the KV-recomputation backlog (see ``generation_early_exit``).
  With a threshold set, every batch lm-eval forms exits early, whatever ``early_exit_max_batch_size`` the export's
  generation config recommends (that cap is for serving; an evaluation asks for early exit explicitly).
* ``early_exit_mode``: ``lossy`` (default) or ``speculative`` (exits draft, the full model verifies: generated text
  identical to full depth, see ``speculative_early_exit``); ``num_speculative_tokens`` (default 4) and
  ``stop_draft_when_unsure`` (``true``/``false``) tune it.
* ``exit_layer``: evaluate the model as if it ended at that exit: loglikelihood requests are scored with that
  exit's head, and generation leaves at that exit for every token. Must be one of ``config.exit_layers``, or
  ``num_hidden_layers`` for the final head (same as leaving it unset). Not combinable with ``early_exit_threshold``
  or ``active_exits``.

Generation tasks accumulate cost statistics (:meth:`EarlyExitLM.cost`): generated tokens, tokens per exit, mean
exit layer, recomputed tokens, and wall time per request type. ``get_model_info`` hands them to lm-eval, which
stores them under ``results["config"]["eellm_cost"]``; :func:`simple_evaluate` (used by ``eellm-eval``) moves them
to ``results["eellm_cost"]`` and adds the total wall time.
"""

from __future__ import annotations

import contextlib
import os
import re
import time
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
import transformers
from lm_eval.api.registry import register_model
from lm_eval.models.huggingface import HFLM
from lm_eval.models.utils_hf import stop_sequences_criteria

import eellm_hf  # noqa: F401  (registers EarlyExitGPT with the Auto classes)
from eellm_hf.eval.sweep import eos_token_ids, real_token_layers
from eellm_hf.modeling.early_exit_settings import EarlyExitSettings, mean_exit_layer
from eellm_hf.modeling.speculative_early_exit import EARLY_EXIT_MODES

COST_KEY = "eellm_cost"
_OFF = ("", "none", "off", "null")
_SEPARATORS = re.compile(r"[|;\s]+")


def parse_threshold(value: Any, name: str = "early_exit_threshold") -> float | None:
    """A threshold model_arg (``name``) as a float in ``[0, 1]``, or ``None`` (for ``early_exit_threshold``:
    full depth)."""
    if value is None or (isinstance(value, str) and value.strip().lower() in _OFF):
        return None
    try:
        if isinstance(value, bool):
            raise TypeError
        threshold = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be a number in [0, 1] or None, got {value!r}.") from None
    if not 0.0 <= threshold <= 1.0:
        raise ValueError(f"{name} must be a number in [0, 1] or None, got {value!r}.")
    return threshold


def parse_bool(value: Any, name: str) -> bool | None:
    """A boolean model_arg (``true``/``false``, ``1``/``0``); ``None`` when unset."""
    if value is None or isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in ("true", "1", "yes"):
        return True
    if text in ("false", "0", "no"):
        return False
    raise ValueError(f"{name} must be true or false, got {value!r}.")


def parse_layers(value: Any, name: str = "active_exits") -> list[int] | None:
    """Layers given as an int, a ``4|8`` / ``4;8`` string or a list; ``None`` when unset."""
    if value is None or (isinstance(value, str) and value.strip().lower() in _OFF):
        return None
    if isinstance(value, str):
        if "," in value:
            raise ValueError(f"{name}: separate layers with '|' or ';' (lm-eval splits model_args on ','), "
                             f"got {value!r}.")
        items: list[Any] = [item for item in _SEPARATORS.split(value.strip().strip("[]()")) if item]
    elif isinstance(value, (list, tuple)):
        items = list(value)
    else:
        items = [value]
    layers = []
    for item in items:
        try:
            if isinstance(item, bool) or (isinstance(item, float) and not item.is_integer()):
                raise ValueError
            layers.append(int(item))
        except (TypeError, ValueError):
            raise ValueError(f"{name} must be integers (layers as 4|8), got {value!r}.") from None
    if not layers:
        raise ValueError(f"{name} is empty; leave it unset to use every exit.")
    return layers


def parse_speculative(early_exit_mode: Any, num_speculative_tokens: Any, stop_draft_when_unsure: Any,
                      threshold: float | None) -> tuple[str | None, list[int] | None, bool | None]:
    """The self-speculative model_args: mode (None when unset), drafted tokens per round, stop-draft flag."""
    mode = None if early_exit_mode is None else str(early_exit_mode).strip().lower()
    if mode is not None and mode not in EARLY_EXIT_MODES:
        raise ValueError(f"early_exit_mode must be one of {EARLY_EXIT_MODES}, got {early_exit_mode!r}.")
    speculative_tokens = parse_layers(num_speculative_tokens, "num_speculative_tokens")
    if speculative_tokens is not None and (len(speculative_tokens) != 1 or speculative_tokens[0] < 1):
        raise ValueError(f"num_speculative_tokens must be an integer >= 1, got {num_speculative_tokens!r}.")
    stop_draft = parse_bool(stop_draft_when_unsure, "stop_draft_when_unsure")
    if mode == "speculative" and threshold is None:
        raise ValueError("early_exit_mode=speculative needs early_exit_threshold (the confidence at which an "
                         "exit drafts a token).")
    return mode, speculative_tokens, stop_draft


class CostTracker:
    """Accumulates what early-exit generation and scoring cost, across requests and ``generate`` calls."""

    def __init__(self, num_hidden_layers: int, exit_layers: list[int], settings: dict[str, Any]):
        self.num_hidden_layers = num_hidden_layers
        self.exit_layers = exit_layers
        self.settings = settings
        self.generate_calls = 0
        self.tokens_per_exit: Counter[int] = Counter()
        self.recomputed_tokens = 0
        self.draft_tokens = 0
        self.accepted_draft_tokens = 0
        self.wall_time_s: Counter[str] = Counter()

    def add_generation(self, exit_layers: torch.Tensor, recomputed_tokens: int, seconds: float) -> None:
        """Record one ``generate`` call: ``exit_layers`` is ``(batch, new_tokens)``, -1 for padding."""
        self.generate_calls += 1
        layers, counts = torch.unique(exit_layers[exit_layers >= 0], return_counts=True)
        self.tokens_per_exit.update(dict(zip(layers.tolist(), counts.tolist())))
        self.recomputed_tokens += int(recomputed_tokens)
        self.wall_time_s["generate"] += seconds

    @contextlib.contextmanager
    def timed(self, request_type: str) -> Iterator[None]:
        """Add the wall time of the block to ``wall_time_s[request_type]``."""
        start = time.perf_counter()
        try:
            yield
        finally:
            self.wall_time_s[request_type] += time.perf_counter() - start

    def summary(self) -> dict[str, Any]:
        """JSON-ready cost: settings, tokens per exit (layer -> count), mean exit layer, wall times."""
        tokens = sum(self.tokens_per_exit.values())
        mean = mean_exit_layer(self.tokens_per_exit)
        return {
            "num_hidden_layers": self.num_hidden_layers,
            "exit_layers": list(self.exit_layers),
            **self.settings,
            "generate_calls": self.generate_calls,
            "generated_tokens": tokens,
            "tokens_per_exit": {str(layer): self.tokens_per_exit[layer] for layer in sorted(self.tokens_per_exit)},
            "mean_exit_layer": mean,
            "mean_depth_fraction": mean / self.num_hidden_layers if mean is not None else None,
            "recomputed_tokens": self.recomputed_tokens,
            "draft_tokens": self.draft_tokens,
            "accepted_draft_tokens": self.accepted_draft_tokens,
            "wall_time_s": {key: round(value, 4) for key, value in sorted(self.wall_time_s.items())},
        }


def _check_model_folder(pretrained: Any) -> None:
    """A ``pretrained`` that can only be a local path (absolute, relative with ``.``/``~``, or more than one
    ``/``, which no Hub repo id has) must exist, else transformers' "Repo id must be in the form ..." hides it."""
    if not isinstance(pretrained, (str, os.PathLike)):
        return
    name = os.fspath(pretrained)
    path_like = os.path.isabs(name) or name.startswith((".", "~")) or name.count("/") > 1
    if path_like and not Path(name).expanduser().exists():
        raise FileNotFoundError(f"model folder {name} does not exist (model_args pretrained={name})")


@register_model("eellm")
class EarlyExitLM(HFLM):
    """``HFLM`` for ``EarlyExitGPTForCausalLM``: early-exit generation, per-exit scoring, cost statistics.

    With no early-exit option set it computes exactly what ``HFLM`` computes (any causal LM is accepted then).
    """

    def __init__(
        self,
        pretrained: str | transformers.PreTrainedModel,
        early_exit_threshold: float | str | None = None,
        exit_confidence: str = "max_prob",
        exit_gate_threshold: float | str | None = None,
        active_exits: int | str | list[int] | None = None,
        max_recompute_tokens: int | str | None = None,
        exit_layer: int | str | None = None,
        early_exit_mode: str | None = None,
        num_speculative_tokens: int | str | None = None,
        stop_draft_when_unsure: bool | str | None = None,
        **kwargs: Any,
    ) -> None:
        stray = [key for key in kwargs if key.strip().isdigit()]
        if stray:
            raise ValueError(
                f"Unexpected model_args {stray}: lm-eval splits model_args on ',', so give active_exits as "
                "e.g. active_exits=4|8 or active_exits=4;8."
            )
        threshold = parse_threshold(early_exit_threshold)
        gate_threshold = parse_threshold(exit_gate_threshold, "exit_gate_threshold")
        active = parse_layers(active_exits)
        cap = parse_layers(max_recompute_tokens, "max_recompute_tokens")
        if cap is not None and len(cap) != 1:
            raise ValueError(f"max_recompute_tokens must be an integer >= 1 or None, got {max_recompute_tokens!r}.")
        mode, speculative_tokens, stop_draft = parse_speculative(early_exit_mode, num_speculative_tokens,
                                                                 stop_draft_when_unsure, threshold)
        score_layers = parse_layers(exit_layer, "exit_layer")
        if score_layers is not None and len(score_layers) != 1:
            raise ValueError(f"exit_layer must be a single layer, got {exit_layer!r}.")
        if score_layers is not None and (threshold is not None or active is not None):
            raise ValueError("exit_layer evaluates a single exit: do not combine it with early_exit_threshold "
                             "or active_exits.")

        _check_model_folder(pretrained)
        kwargs.setdefault("backend", "causal")  # lm-eval cannot tell from the (custom) model type
        super().__init__(pretrained=pretrained, **kwargs)

        config = self.model.config
        num_layers = int(config.num_hidden_layers)
        exits = [int(layer) for layer in getattr(config, "exit_layers", None) or []]
        early_exit_requested = threshold is not None or active is not None or cap is not None
        if not exits and (early_exit_requested or (score_layers is not None and score_layers[0] != num_layers)):
            raise ValueError(f"{type(self.model).__name__} has no early exits; early-exit model_args need an "
                             "EarlyExitGPT model.")
        EarlyExitSettings.resolve(config, {"early_exit_threshold": threshold, "exit_confidence": exit_confidence,
                                           "exit_gate_threshold": gate_threshold, "active_exits": active,
                                           "max_recompute_tokens": cap[0] if cap else None})
        self._exit_index: int | None = None
        if score_layers is not None:
            layer = score_layers[0]
            if layer != num_layers and layer not in exits:
                raise ValueError(f"exit_layer must be one of the exit layers {exits} or {num_layers} (final head), "
                                 f"got {layer}.")
            if layer != num_layers:
                self._exit_index = exits.index(layer)
                threshold, active = 0.0, [layer]  # every generated token leaves at this exit

        self._is_early_exit_model = bool(exits)
        # full depth is asked for explicitly: an export's generation config may recommend early exit
        self._generate_kwargs: dict[str, Any] = {"early_exit_threshold": None} if exits else {}
        if threshold is not None:
            # lm-eval's batches exit early too, whatever batch cap (early_exit_max_batch_size) the export recommends
            self._generate_kwargs = {"early_exit_threshold": threshold, "exit_confidence": exit_confidence,
                                     "exit_gate_threshold": gate_threshold, "early_exit_max_batch_size": None}
            if active is not None:
                self._generate_kwargs["active_exits"] = sorted(set(active))
            if cap is not None:
                self._generate_kwargs["max_recompute_tokens"] = cap[0]
            speculative = {"early_exit_mode": mode, "stop_draft_when_unsure": stop_draft,
                           "num_speculative_tokens": speculative_tokens[0] if speculative_tokens else None}
            self._generate_kwargs.update({key: value for key, value in speculative.items() if value is not None})
        settings = {
            "early_exit_threshold": None if score_layers else threshold,
            "exit_confidence": exit_confidence,
            "exit_gate_threshold": gate_threshold,
            "active_exits": sorted(set(active)) if active is not None and not score_layers else None,
            "max_recompute_tokens": cap[0] if cap else None,
            "exit_layer": score_layers[0] if score_layers else None,
            "early_exit_mode": mode or "lossy",
            "num_speculative_tokens": speculative_tokens[0] if speculative_tokens else None,
        }
        self.cost_tracker = CostTracker(num_layers, exits, settings)

    @property
    def scoring_layer(self) -> int:
        """The layer whose head scores loglikelihood requests (``num_hidden_layers`` for the final head)."""
        if self._exit_index is None:
            return int(self.model.config.num_hidden_layers)
        return int(self.model.config.exit_layers[self._exit_index])

    def cost(self) -> dict[str, Any]:
        """Cost statistics accumulated so far (see :meth:`CostTracker.summary`)."""
        return {**self.cost_tracker.summary(), "scoring_layer": self.scoring_layer}

    def _model_call(
        self, inps: torch.Tensor, attn_mask: torch.Tensor | None = None, labels: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Logits of the final head, or of the ``exit_layer`` exit's head."""
        if not self._is_early_exit_model or attn_mask is not None or labels is not None:
            return super()._model_call(inps, attn_mask=attn_mask, labels=labels)
        with (
            torch.no_grad(),
            torch.autocast(
                device_type=self.device.type,
                dtype=self.mixed_precision_dtype,
                enabled=self.mixed_precision_dtype is not None,
            ),
        ):
            if self._exit_index is None:
                return self.model(inps, compute_exits=False).logits
            return self.model(inps).exit_logits[self._exit_index]

    def _model_generate(
        self, context: torch.Tensor, max_length: int, stop: list[str], **generation_kwargs: Any
    ) -> torch.Tensor:
        """``HFLM._model_generate`` plus the early-exit settings; records the layer of every generated token."""
        # Same greedy/temperature handling as HFLM, so full-depth results are identical to `--model hf`.
        generation_kwargs["temperature"] = generation_kwargs.get("temperature", 0.0)
        do_sample = generation_kwargs.get("do_sample")
        if (temp := generation_kwargs.get("temperature")) == 0.0 and do_sample is None:
            generation_kwargs["do_sample"] = do_sample = False
        if do_sample is False and temp == 0.0:
            generation_kwargs.pop("temperature", None)
        stopping_criteria = stop_sequences_criteria(self.tokenizer, stop, context.shape[1], context.shape[0])
        start = time.perf_counter()
        with torch.autocast(
            device_type=self.device.type,
            dtype=self.mixed_precision_dtype,
            enabled=self.mixed_precision_dtype is not None,
        ):
            output = self.model.generate(
                input_ids=context,
                max_length=max_length,
                stopping_criteria=stopping_criteria,
                pad_token_id=self.tokenizer.pad_token_id,
                use_cache=True,
                return_dict_in_generate=True,
                **self._generate_kwargs,
                **generation_kwargs,
            )
        seconds = time.perf_counter() - start
        sequences = output.sequences
        layers = getattr(output, "exit_layers", None)
        if layers is None:
            layers = real_token_layers(
                sequences[:, context.shape[1]:], eos_token_ids(self.model.generation_config), self.scoring_layer
            )
        stats = getattr(output, "early_exit_stats", None)
        self.cost_tracker.add_generation(layers, getattr(stats, "recomputed_tokens", 0), seconds)
        self.cost_tracker.draft_tokens += getattr(stats, "draft_tokens", 0)
        self.cost_tracker.accepted_draft_tokens += getattr(stats, "accepted_draft_tokens", 0)
        return sequences

    def generate_until(self, requests: list[Any], disable_tqdm: bool = False) -> list[str]:
        """``HFLM.generate_until``, timed."""
        with self.cost_tracker.timed("generate_until"):
            return super().generate_until(requests, disable_tqdm=disable_tqdm)

    def loglikelihood(self, requests: list[Any], disable_tqdm: bool = False) -> list[tuple[float, bool]]:
        """``HFLM.loglikelihood``, timed."""
        with self.cost_tracker.timed("loglikelihood"):
            return super().loglikelihood(requests, disable_tqdm=disable_tqdm)

    def loglikelihood_rolling(self, requests: list[Any], disable_tqdm: bool = False) -> list[float]:
        """``HFLM.loglikelihood_rolling``, timed."""
        with self.cost_tracker.timed("loglikelihood_rolling"):
            return super().loglikelihood_rolling(requests, disable_tqdm=disable_tqdm)

    def get_model_info(self) -> dict:
        """``HFLM``'s model info plus the accumulated cost (lm-eval calls this once evaluation is done)."""
        return {**super().get_model_info(), COST_KEY: self.cost()}


def _lm_eval_simple_evaluate() -> Callable[..., Any]:
    from lm_eval.evaluator import simple_evaluate as original

    return original


def simple_evaluate(*args: Any, **kwargs: Any) -> dict[str, Any] | None:
    """``lm_eval.simple_evaluate`` that also records the cost under ``results["eellm_cost"]``.

    The cost is the ``eellm`` model's statistics (moved out of ``results["config"]``) plus ``wall_time_s.total``,
    the whole call's wall time; for other models only the wall time is recorded.
    """
    start = time.perf_counter()
    results = _lm_eval_simple_evaluate()(*args, **kwargs)
    total = time.perf_counter() - start
    if results is not None:
        cost = dict(results.get("config", {}).pop(COST_KEY, None) or {})
        cost["wall_time_s"] = {**cost.get("wall_time_s", {}), "total": round(total, 4)}
        results[COST_KEY] = cost
    return results


@contextlib.contextmanager
def recording_cost(sink: list[dict[str, Any]] | None = None) -> Iterator[list[dict[str, Any]]]:
    """Route ``lm_eval.simple_evaluate`` (as lm-eval's CLI calls it) through :func:`simple_evaluate`.

    Yields a list that receives each run's ``results["eellm_cost"]``.
    """
    import lm_eval

    costs: list[dict[str, Any]] = [] if sink is None else sink

    def patched(*args: Any, **kwargs: Any) -> dict[str, Any] | None:
        results = simple_evaluate(*args, **kwargs)
        if results is not None:
            costs.append(results[COST_KEY])
        return results

    missing = object()
    previous = lm_eval.__dict__.get("simple_evaluate", missing)
    lm_eval.simple_evaluate = patched  # type: ignore[attr-defined]
    try:
        yield costs
    finally:
        if previous is missing:
            del lm_eval.simple_evaluate
        else:
            lm_eval.simple_evaluate = previous  # type: ignore[attr-defined]


__all__ = [
    "COST_KEY",
    "CostTracker",
    "EarlyExitLM",
    "parse_layers",
    "parse_threshold",
    "recording_cost",
    "simple_evaluate",
]
