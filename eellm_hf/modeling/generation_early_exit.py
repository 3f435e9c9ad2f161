"""Token-wise early-exit generation with exact KV recomputation, per sequence in a batch (EE-LLM, section 4).

`EarlyExitGPTForCausalLM.generate(..., early_exit_threshold=0.9)` lets every sequence of a batch leave the model
at the first exit confident enough about its next token. Everything else `generate` does (inputs, special tokens,
lengths, logits processors, stopping criteria) is transformers' own: this module plugs a decoding loop into it as
a `custom_generate` callable.

Decision, per token and per sequence: walk the active exits in depth order; the first one whose confidence
(computed from its raw logits in float32, or the model's dtype if wider) is `>= early_exit_threshold` produces the
token, through the usual logits processors and sampling; otherwise the final head does. A threshold of 0 always
leaves at the first active exit; `None` decodes at full depth with transformers' own loop.

KV recomputation: a token that left after layer k has no keys/values in the deeper layers (nor in the blocks of
deeper exits). Each row keeps, per cache layer, how many of its columns are filled. Whenever a row runs a layer,
the layer computes all of the row's missing columns there together with the new token ("backlog"), resuming each
from the hidden state where its computation stopped, so later tokens attend exactly to what a full forward pass
would give them. Only the rows that go deeper run a deeper layer. `max_recompute_tokens` bounds the backlog: a
row whose backlog reaches it fills its deep KV in the same forward pass, so no layer ever processes more than
that many tokens of a row in one decoding step. None of this changes which tokens are generated.

Cost: with `exit_confidence="max_prob"` (or `"top2_margin"`) an exit evaluates its vocabulary projection (and
softmax) for every token that reaches it. With a large vocabulary this costs about as much as a whole decoder layer
or more (hidden_size x vocab_size multiply-adds against about 12 x hidden_size^2 for a layer), so place few exits,
and turn off with `active_exits` the ones you do not want: nothing is computed for them. Exits with learned gates
(`config.exit_gate`) avoid most of it: `"gate"` runs the projection only for the tokens whose gate lets them leave,
`"gate_max_prob"` only for those its gate screens in (`exit_gate_threshold`), which then leave when their largest
probability reaches the threshold.

`early_exit_mode="speculative"` instead uses the exits only to draft tokens that the full model verifies, so the
output is exactly full depth's (see `speculative_early_exit`).

The settings and statistics are in `early_exit_settings`, the decoding state in `early_exit_decoder`; this module
plugs them into `generate`.

This file is shipped next to the weights as remote code: it imports only `torch`, `transformers` and its neighbours.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from transformers.cache_utils import Cache, DynamicCache
from transformers.generation import (
    GenerationConfig,
    GenerationMode,
    LogitsProcessorList,
    StoppingCriteriaList,
    StopStringCriteria,
)
from transformers.generation.streamers import BaseStreamer
from transformers.generation.utils import GenerateDecoderOnlyOutput

from .early_exit_decoder import EarlyExitDecoder
from .early_exit_settings import (
    EARLY_EXIT_GENERATION_KEYS,
    EXIT_CONFIDENCE_MEASURES,
    EarlyExitSettings,
    EarlyExitStats,
)

_SUPPORTED_ATTENTION = ("sdpa", "eager")
_MODE_NAMES = {
    GenerationMode.BEAM_SEARCH: "beam search",
    GenerationMode.BEAM_SAMPLE: "beam sampling",
    GenerationMode.GROUP_BEAM_SEARCH: "group beam search",
    GenerationMode.CONSTRAINED_BEAM_SEARCH: "constrained beam search",
    GenerationMode.CONTRASTIVE_SEARCH: "contrastive search",
    GenerationMode.ASSISTED_GENERATION: "assisted decoding",
    GenerationMode.DOLA_GENERATION: "DoLa decoding",
}


@dataclass
class GenerateEarlyExitDecoderOnlyOutput(GenerateDecoderOnlyOutput):
    """`GenerateDecoderOnlyOutput` of early-exit generation.

    Args:
        exit_layers (`torch.LongTensor` of shape `(batch_size, new_tokens)`):
            The layer that produced each generated token: an exit's `config.exit_layers` entry, or
            `num_hidden_layers` for the final head; -1 for the padding of a sequence that had already finished.
        early_exit_stats ([`EarlyExitStats`]):
            Aggregate statistics: `mean_exit_layer`, `tokens_per_exit`, `recomputed_tokens`, compute counts.
    """

    exit_layers: torch.LongTensor | None = None
    early_exit_stats: EarlyExitStats | None = None


def generate_with_early_exit(
    model: nn.Module,
    generate: Callable[..., Any],
    inputs: torch.Tensor | None = None,
    generation_config: GenerationConfig | None = None,
    logits_processor: LogitsProcessorList | None = None,
    stopping_criteria: StoppingCriteriaList | None = None,
    prefix_allowed_tokens_fn: Callable[[int, torch.Tensor], list[int]] | None = None,
    synced_gpus: bool | None = None,
    assistant_model: nn.Module | None = None,
    streamer: BaseStreamer | None = None,
    negative_prompt_ids: torch.Tensor | None = None,
    negative_prompt_attention_mask: torch.Tensor | None = None,
    custom_generate: str | Callable | None = None,
    **kwargs: Any,
) -> GenerateDecoderOnlyOutput | torch.LongTensor:
    """`generate` of an early-exit model: transformers' `generate`, with early exit when a threshold is set.

    Takes `GenerationMixin.generate`'s arguments, plus `early_exit_threshold`, `exit_confidence`,
    `exit_gate_threshold`, `active_exits`, `max_recompute_tokens` and `early_exit_max_batch_size` (defaults from the
    generation config), and `early_exit_mode`, `num_speculative_tokens` and `stop_draft_when_unsure` (lossless
    self-speculative decoding, see `speculative_early_exit`). `generate` is the bound base method.
    """
    base_arguments = dict(
        inputs=inputs,
        generation_config=generation_config,
        logits_processor=logits_processor,
        stopping_criteria=stopping_criteria,
        prefix_allowed_tokens_fn=prefix_allowed_tokens_fn,
        synced_gpus=synced_gpus,
        assistant_model=assistant_model,
        streamer=streamer,
        negative_prompt_ids=negative_prompt_ids,
        negative_prompt_attention_mask=negative_prompt_attention_mask,
        custom_generate=custom_generate,
    )
    return generate_with_decoder(model, generate, base_arguments, kwargs, EarlyExitDecoder)


def generate_with_decoder(
    model: nn.Module,
    generate: Callable[..., Any],
    base_arguments: dict[str, Any],
    kwargs: dict[str, Any],
    decoder_class: Callable[..., Any],
    full_depth_with_transformers: bool = True,
) -> GenerateDecoderOnlyOutput | torch.LongTensor:
    """The body of `generate_with_early_exit`: `base_arguments` are `generate`'s named arguments, `kwargs` the rest.

    `decoder_class(model, settings, input_ids, max_length)` makes the decoding state the loop drives
    (`EarlyExitDecoder`'s `prefill`, `step`, `append`, `gather_logits`, `ids`, `stats`, `write_cache`); pipeline-
    parallel decoding passes its own. Without `full_depth_with_transformers`, a threshold of None runs this loop
    too, with no exit active (for a decoder that has no other way to run the model).
    """
    from .speculative_early_exit import SPECULATIVE_GENERATION_KEYS, SpeculativeSettings, speculative_decoding

    overrides = {key: kwargs.pop(key) for key in EARLY_EXIT_GENERATION_KEYS if key in kwargs}
    configs = (base_arguments["generation_config"], model.generation_config)
    settings = EarlyExitSettings.resolve(model.config, overrides, configs)
    speculative_overrides = {key: kwargs.pop(key) for key in SPECULATIVE_GENERATION_KEYS if key in kwargs}
    speculative = SpeculativeSettings.resolve(settings, speculative_overrides, configs)
    if not settings.exits_at_batch_size(_decoded_batch_size(base_arguments, kwargs, model.generation_config)):
        if full_depth_with_transformers:
            return generate(**base_arguments, **kwargs)
        settings = dataclasses.replace(settings, threshold=None, active_exits=())

    assistant_model, custom_generate = base_arguments["assistant_model"], base_arguments["custom_generate"]
    synced_gpus, generation_config = base_arguments["synced_gpus"], base_arguments["generation_config"]
    stopping_criteria, streamer = base_arguments["stopping_criteria"], base_arguments["streamer"]
    if assistant_model is not None or kwargs.get("prompt_lookup_num_tokens") or kwargs.get("assistant_early_exit"):
        raise NotImplementedError("Early-exit generation does not support assisted decoding.")
    if custom_generate is not None:
        raise NotImplementedError("Early-exit generation cannot be combined with `custom_generate`.")
    if synced_gpus:
        raise NotImplementedError("Early-exit generation does not support `synced_gpus`.")
    base_config = generation_config if generation_config is not None else model.generation_config
    if kwargs.get("token_healing", getattr(base_config, "token_healing", False)):
        raise NotImplementedError("Early-exit generation does not support token healing.")
    if model.config._attn_implementation not in _SUPPORTED_ATTENTION:
        raise NotImplementedError(
            f"Early-exit generation supports the {_SUPPORTED_ATTENTION} attention implementations, "
            f"not {model.config._attn_implementation!r}."
        )

    # `generate` drops the tokenizer before calling a `custom_generate` callable: build stop-string criteria here.
    tokenizer = kwargs.pop("tokenizer", None)
    stop_strings = kwargs["stop_strings"] if "stop_strings" in kwargs else getattr(base_config, "stop_strings", None)
    if stop_strings is not None:
        if tokenizer is None:
            raise ValueError(
                "There are one or more stop strings, either in the arguments to `generate` or in the model's "
                "generation config, but we could not locate a tokenizer. When generating with stop strings, you "
                "must pass the model's tokenizer to the `tokenizer` argument of `generate`."
            )
        kwargs["stop_strings"] = None
        criteria = StoppingCriteriaList(stopping_criteria or [])
        criteria.append(StopStringCriteria(tokenizer=tokenizer, stop_strings=stop_strings))
        base_arguments["stopping_criteria"] = criteria

    # `generate` prepares inputs, special tokens, lengths, processors and criteria, then calls this loop. It does
    # not hand the streamer to a callable (it only streams the prompt), so the loop gets it bound here.
    if speculative.lossless:
        if decoder_class is not EarlyExitDecoder:
            raise NotImplementedError("`early_exit_mode='speculative'` runs in a single process; pipeline-parallel "
                                      "decoding supports the lossy mode only.")
        decoding, decoding_kwargs = speculative_decoding, {"speculative_settings": speculative}
    else:
        decoding, decoding_kwargs = _early_exit_decoding, {"early_exit_decoder_class": decoder_class}
    base_arguments["custom_generate"] = functools.partial(
        decoding, early_exit_settings=settings, early_exit_streamer=streamer, **decoding_kwargs
    )
    with model.reusing_exit_shortlists():
        return generate(**base_arguments, **kwargs)


def _decoded_batch_size(base_arguments: dict[str, Any], kwargs: dict[str, Any],
                        default_generation_config: GenerationConfig) -> int:
    """Sequences `generate` will decode together: the prompts' rows times `num_return_sequences`."""
    inputs = base_arguments["inputs"]
    for candidate in (inputs, kwargs.get("input_ids"), kwargs.get("inputs_embeds")):
        if isinstance(candidate, torch.Tensor):
            rows = candidate.shape[0] if candidate.dim() > 1 else 1
            break
    else:
        rows = 1
    config = base_arguments["generation_config"] or default_generation_config
    return rows * int(kwargs.get("num_return_sequences") or getattr(config, "num_return_sequences", 1) or 1)


def check_decoding_request(generation_config: GenerationConfig, model_kwargs: dict[str, Any]) -> Cache | None:
    """Refuse what the early-exit loops do not support; return the cache `generate` prepared (or the caller's)."""
    mode = generation_config.get_generation_mode()
    if mode not in (GenerationMode.GREEDY_SEARCH, GenerationMode.SAMPLE):
        name = _MODE_NAMES.get(mode, str(mode))
        raise NotImplementedError(
            f"Early-exit generation supports greedy search and sampling, not {name}. Set "
            "`early_exit_threshold=None` to use it at full depth."
        )
    if model_kwargs.get("output_attentions") or model_kwargs.get("output_hidden_states"):
        raise NotImplementedError(
            "Early-exit generation cannot return attentions or hidden states: tokens leave at different depths."
        )
    if model_kwargs.get("inputs_embeds") is not None:
        raise NotImplementedError("Early-exit generation needs `input_ids`, not `inputs_embeds`.")
    cache = model_kwargs.get("cache")
    if cache is not None and not isinstance(cache, DynamicCache):
        raise NotImplementedError(
            f"Early-exit generation works with a `DynamicCache`, not {type(cache).__name__} "
            "(leave `cache_implementation` unset)."
        )
    return cache


def _early_exit_decoding(
    model: nn.Module,
    input_ids: torch.LongTensor,
    logits_processor: LogitsProcessorList,
    stopping_criteria: StoppingCriteriaList,
    generation_config: GenerationConfig,
    early_exit_settings: EarlyExitSettings | None = None,
    early_exit_streamer: BaseStreamer | None = None,
    early_exit_decoder_class: Callable[..., Any] | None = None,
    **model_kwargs: Any,
) -> GenerateEarlyExitDecoderOnlyOutput | torch.LongTensor:
    """The decoding loop of early-exit greedy search and sampling (mirrors `GenerationMixin._sample`)."""
    settings, streamer = early_exit_settings, early_exit_streamer
    cache = check_decoding_request(generation_config, model_kwargs)

    pad_token_id = generation_config._pad_token_tensor
    return_dict_in_generate = generation_config.return_dict_in_generate
    output_scores = return_dict_in_generate and generation_config.output_scores
    output_logits = return_dict_in_generate and generation_config.output_logits
    has_eos_stopping_criteria = any(hasattr(criteria, "eos_token_id") for criteria in stopping_criteria)
    do_sample = generation_config.do_sample
    scores: tuple[torch.Tensor, ...] | None = () if output_scores else None
    raw_logits: tuple[torch.Tensor, ...] | None = () if output_logits else None

    batch_size, prompt_length = input_ids.shape
    decoder = (early_exit_decoder_class or EarlyExitDecoder)(model, settings, input_ids, generation_config.max_length)
    all_rows = list(range(batch_size))
    unfinished_sequences = torch.ones(batch_size, dtype=torch.long, device=input_ids.device)
    if pad_token_id is not None:
        pad_token_id = pad_token_id.to(input_ids.device)
    exit_layers: list[list[int]] = []

    decisions = decoder.prefill(model_kwargs.get("attention_mask"), model_kwargs.get("position_ids"), cache)
    length = prompt_length
    rows = all_rows
    while True:
        next_token_logits, step_layers = decoder.gather_logits(decisions)
        next_token_scores = logits_processor(decoder.ids[:, :length], next_token_logits)
        if output_scores:
            scores += (next_token_scores,)
        if output_logits:
            raw_logits += (next_token_logits,)

        if do_sample:
            probs = nn.functional.softmax(next_token_scores, dim=-1)
            next_tokens = torch.multinomial(probs, num_samples=1).squeeze(1)
        else:
            next_tokens = torch.argmax(next_token_scores, dim=-1)
        if has_eos_stopping_criteria:
            next_tokens = next_tokens * unfinished_sequences + pad_token_id * (1 - unfinished_sequences)

        decoder.append(next_tokens, length)
        length += 1
        exit_layers.append(step_layers)
        unfinished_sequences = unfinished_sequences & ~stopping_criteria(decoder.ids[:, :length], scores)
        if streamer is not None:
            streamer.put(next_tokens.cpu())
        if unfinished_sequences.max() == 0:
            break
        # Finished rows only receive padding from now on: they skip the model (unless padding is not forced).
        rows = unfinished_sequences.nonzero().flatten().tolist() if has_eos_stopping_criteria else all_rows
        decisions = decoder.step(rows, length - 1)

    if streamer is not None:
        streamer.end()

    sequences = decoder.ids[:, :length].clone()
    if not return_dict_in_generate:
        if getattr(cache, "_is_user_defined", False):
            decoder.write_cache(cache, length - 1)
        return sequences
    if cache is not None:
        decoder.write_cache(cache, length - 1)
    return GenerateEarlyExitDecoderOnlyOutput(
        sequences=sequences,
        scores=scores,
        logits=raw_logits,
        cache=cache,
        exit_layers=torch.tensor(exit_layers, dtype=torch.long, device=input_ids.device).T,
        early_exit_stats=decoder.stats,
    )


__all__ = [
    "EARLY_EXIT_GENERATION_KEYS",
    "EXIT_CONFIDENCE_MEASURES",
    "EarlyExitDecoder",
    "EarlyExitSettings",
    "EarlyExitStats",
    "GenerateEarlyExitDecoderOnlyOutput",
    "generate_with_early_exit",
]
