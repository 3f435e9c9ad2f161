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

Cost: an exit evaluates its vocabulary projection (and softmax) for every token that reaches it. With a large
vocabulary this costs about as much as a whole decoder layer (hidden_size x vocab_size multiply-adds against about
12 x hidden_size^2 for a layer), so place few exits, and turn off with `active_exits` the ones you do not want:
nothing is computed for them.

`early_exit_mode="speculative"` instead uses the exits only to draft tokens that the full model verifies, so the
output is exactly full depth's (see `speculative_early_exit`, which drives the decoder below).

This file is shipped next to the weights as remote code: it imports only `torch`, `transformers` and its neighbour.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from transformers.cache_utils import Cache, DynamicCache, DynamicLayer
from transformers.generation import (
    GenerationConfig,
    GenerationMode,
    LogitsProcessorList,
    StoppingCriteriaList,
    StopStringCriteria,
)
from transformers.generation.streamers import BaseStreamer
from transformers.generation.utils import GenerateDecoderOnlyOutput

EXIT_CONFIDENCE_MEASURES = ("max_prob", "top2_margin", "gate")
EARLY_EXIT_GENERATION_KEYS = ("early_exit_threshold", "exit_confidence", "active_exits", "max_recompute_tokens")
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
_UNSET = object()


@dataclass(frozen=True)
class EarlyExitSettings:
    """Validated early-exit settings of one `generate` call.

    Args:
        threshold (`float` or `None`): confidence an exit needs to produce the token; `None` decodes at full depth.
        confidence (`str`): `"max_prob"` (largest probability, as EE-LLM), `"top2_margin"` (p1 - p2), or `"gate"`
            (the exit's learned confidence gate, `config.exit_gate`: evaluated before the vocabulary projection,
            which then runs only for the tokens that leave).
        active_exits (`tuple[int]`): indices into `config.exit_layers` of the exits allowed to fire.
        max_recompute_tokens (`int` or `None`): cap on a row's backlog of tokens whose deep KV is missing (the
            current token included); reaching it fills the backlog's deep KV in the same forward pass.
    """

    threshold: float | None = None
    confidence: str = "max_prob"
    active_exits: tuple[int, ...] = ()
    max_recompute_tokens: int | None = None

    @classmethod
    def resolve(
        cls, model_config: Any, overrides: dict[str, Any], generation_configs: Iterable[GenerationConfig | None]
    ) -> EarlyExitSettings:
        """Settings from `generate` kwargs first, then the first generation config that defines them, then defaults."""
        configs = [config for config in generation_configs if config is not None]

        def setting(name: str, default: Any) -> Any:
            if name in overrides:
                return overrides[name]
            for config in configs:
                if hasattr(config, name):
                    return getattr(config, name)
            return default

        threshold = setting("early_exit_threshold", None)
        if threshold is not None:
            if isinstance(threshold, bool) or not isinstance(threshold, (int, float)) or not 0.0 <= threshold <= 1.0:
                raise ValueError(
                    f"`early_exit_threshold` must be None (full depth) or a number in [0, 1], got {threshold!r}."
                )
            threshold = float(threshold)
            if not model_config.exit_layers:
                raise ValueError(
                    f"`early_exit_threshold`={threshold} needs early exits, but this model has none (`exit_layers` "
                    "is empty, e.g. a Llama folder loaded as EarlyExitGPTForCausalLM): add exits with "
                    "`eellm-convert SRC DST --exit-layers ...`, or leave the threshold unset for full depth."
                )

        confidence = setting("exit_confidence", None) or "max_prob"
        if confidence not in EXIT_CONFIDENCE_MEASURES:
            raise ValueError(f"`exit_confidence` must be one of {EXIT_CONFIDENCE_MEASURES}, got {confidence!r}.")
        if confidence == "gate" and not getattr(model_config, "exit_gate", False):
            raise ValueError("`exit_confidence='gate'` needs exits with confidence gates (`config.exit_gate`); this "
                             "model has none: use 'max_prob' or 'top2_margin'.")

        exit_layers = list(model_config.exit_layers)
        requested = setting("active_exits", None)
        if requested is None:
            active = tuple(range(len(exit_layers)))
        else:
            if isinstance(requested, (int, str)) or not isinstance(requested, Iterable):
                raise ValueError(f"`active_exits` must be a list of exit layers, got {requested!r}.")
            requested = list(requested)
            wrong = [layer for layer in requested if isinstance(layer, bool) or layer not in exit_layers]
            if wrong:
                raise ValueError(
                    f"`active_exits` {wrong} are not exits of this model: its exits sit after layers {exit_layers}."
                )
            active = tuple(sorted({exit_layers.index(layer) for layer in requested}))

        cap = setting("max_recompute_tokens", None)
        if cap is not None and (isinstance(cap, bool) or not isinstance(cap, int) or cap < 1):
            raise ValueError(f"`max_recompute_tokens` must be None (no cap) or an integer >= 1, got {cap!r}.")

        return cls(threshold=threshold, confidence=confidence, active_exits=active, max_recompute_tokens=cap)


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
        exit_gate_tokens (`list[int]`): tokens each exit's confidence gate (and norm and MLP) evaluated.
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
    final_head_tokens: int = 0
    prefill_tokens: int = 0
    completion_token_layers: int = 0

    @property
    def num_tokens(self) -> int:
        """Generated tokens (padding after a sequence finished excluded)."""
        return sum(self.tokens_per_exit.values())

    @property
    def mean_exit_layer(self) -> float:
        """Mean layer that produced the generated tokens (`num_hidden_layers` for the final head)."""
        total = self.num_tokens
        return sum(layer * count for layer, count in self.tokens_per_exit.items()) / total if total else float("nan")


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

    Takes `GenerationMixin.generate`'s arguments, plus `early_exit_threshold`, `exit_confidence`, `active_exits`
    and `max_recompute_tokens` (defaults from the generation config), and `early_exit_mode`,
    `num_speculative_tokens` and `stop_draft_when_unsure` (lossless self-speculative decoding, see
    `speculative_early_exit`). `generate` is the bound base method.
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
    if settings.threshold is None:
        if full_depth_with_transformers:
            return generate(**base_arguments, **kwargs)
        settings = dataclasses.replace(settings, active_exits=())

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
    return generate(**base_arguments, **kwargs)


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


@dataclass
class _Decision:
    """The rows whose next token one head produces, with that head's raw logits."""

    rows: list[int]
    layer: int
    logits: torch.Tensor


class _KVWriter:
    """Stands in for a `Cache` inside a decoder layer's attention.

    It writes the layer's new keys/values for the planned rows and window of columns (only where `valid`), and
    returns the layer's keys/values of those rows up to the window's end.
    """

    def __init__(self, keys: list[torch.Tensor | None], values: list[torch.Tensor | None]):
        self.keys, self.values = keys, values
        self.rows: slice | torch.Tensor = slice(None)
        self.start, self.end = 0, 0
        self.valid: torch.Tensor | None = None

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args: Any, **kwargs: Any
    ) -> tuple[torch.Tensor, torch.Tensor]:
        keys, values = self.keys[layer_idx], self.values[layer_idx]
        rows, start, end = self.rows, self.start, self.end
        if self.valid is None:
            keys[rows, :, start:end] = key_states
            values[rows, :, start:end] = value_states
        else:
            keys[rows, :, start:end] = torch.where(self.valid, key_states, keys[rows, :, start:end])
            values[rows, :, start:end] = torch.where(self.valid, value_states, values[rows, :, start:end])
        return keys[rows, :, :end], values[rows, :, :end]


class EarlyExitDecoder:
    """Runs an `EarlyExitGPTForCausalLM` token by token with per-row exits and per-row, per-layer KV bookkeeping.

    Keys/values live in preallocated `(batch, kv_heads, capacity, head_dim)` tensors, one per cache layer (backbone
    layers, then the active exits' blocks). `filled[layer][row]` counts the leading columns of `row` whose KV is
    computed at `layer`; it never grows with depth, and an exit block's count equals that of the layer it follows.
    `state[row, column - prompt_length]` holds the hidden state at which a generated column's computation last
    stopped, from which the next layer that needs it resumes (prompt columns are computed at full depth at once).
    """

    def __init__(self, model: nn.Module, settings: EarlyExitSettings, input_ids: torch.LongTensor, max_length: int):
        config = model.config
        self.model, self.backbone, self.settings, self.config = model, model.model, settings, config
        self.num_layers = config.num_hidden_layers
        self.exit_layers = list(config.exit_layers)
        self.exit_after = {self.exit_layers[index] - 1: index for index in settings.active_exits}
        batch_size, prompt_length = input_ids.shape
        self.batch_size, self.prompt_length = batch_size, prompt_length
        device = input_ids.device
        self.device = device
        self.dtype = self.backbone.embed_tokens.weight.dtype
        self.confidence_dtype = torch.promote_types(self.dtype, torch.float32)
        self.capacity = max(int(max_length), prompt_length + 1)

        self.ids = input_ids.new_zeros(batch_size, self.capacity)
        self.ids[:, :prompt_length] = input_ids
        self.positions = torch.zeros(batch_size, self.capacity, dtype=torch.long, device=device)
        self.key_mask = torch.ones(batch_size, self.capacity, dtype=torch.bool, device=device)
        self.row_padded = [False] * batch_size
        self.state = torch.zeros(batch_size, self.capacity - prompt_length, config.hidden_size, dtype=self.dtype,
                                 device=device)
        self.arange = torch.arange(self.capacity, device=device)

        num_cache_layers = self.num_layers + len(self.exit_layers)
        self.cache_layers = list(range(self.num_layers))
        if config.exit_block:
            self.cache_layers += [self.num_layers + index for index in settings.active_exits]
        kv_shape = (batch_size, config.num_key_value_heads, self.capacity, config.head_dim)
        self.keys: list[torch.Tensor | None] = [None] * num_cache_layers
        self.values: list[torch.Tensor | None] = [None] * num_cache_layers
        for layer in self.cache_layers:
            self.keys[layer] = torch.zeros(kv_shape, dtype=self.dtype, device=device)
            self.values[layer] = torch.zeros(kv_shape, dtype=self.dtype, device=device)
        self.filled = [[0] * batch_size for _ in range(num_cache_layers)]
        self.cache_lengths = [0] * num_cache_layers
        self.writer = _KVWriter(self.keys, self.values)

        exit_report = tuple(self.exit_layers[index] for index in settings.active_exits) + (self.num_layers,)
        self.stats = EarlyExitStats(
            exit_layers=exit_report,
            tokens_per_exit=dict.fromkeys(exit_report, 0),
            exit_block_tokens=[0] * len(self.exit_layers),
            exit_head_tokens=[0] * len(self.exit_layers),
            exit_gate_tokens=[0] * len(self.exit_layers),
        )
        self._pass_cache: dict[Any, Any] = {}
        self._kind = "prefill"
        self.on_last_layer: Callable[[torch.Tensor, list[int], int], None] | None = None

    # ----------------------------------------------------------------------------------------------- public steps

    def prefill(
        self, attention_mask: torch.Tensor | None, position_ids: torch.Tensor | None, cache: Cache | None
    ) -> list[_Decision]:
        """Compute the prompt at full depth (from what `cache` lacks) and decide each row's first new token."""
        rows = self.prepare_prompt(attention_mask, position_ids, cache)
        return self._run(rows, self.prompt_length - 1, decide=True, fill=True)

    def prepare_prompt(
        self, attention_mask: torch.Tensor | None, position_ids: torch.Tensor | None, cache: Cache | None
    ) -> list[int]:
        """Set the prompt's key mask and positions, load what `cache` holds; return the rows to prefill."""
        prompt_length = self.prompt_length
        key_mask, positions = prompt_mask_and_positions(attention_mask, position_ids, self.batch_size, prompt_length,
                                                        self.device)
        self.key_mask[:, :prompt_length] = key_mask
        self.positions[:, :prompt_length] = positions
        self.row_padded = (~key_mask).any(dim=-1).tolist()

        start = 0
        if cache is not None and cache.get_seq_length() > 0:
            start = self._load_cache(cache)
        for layer in self.cache_layers:
            self.filled[layer] = [start] * self.batch_size
        self.stats.prefill_tokens = (prompt_length - start) * self.batch_size
        self._kind = "prefill"
        return list(range(self.batch_size))

    def step(self, rows: list[int], column: int) -> list[_Decision]:
        """Feed the token at `column` of each of `rows` and decide their next tokens."""
        self._kind = "decode"
        return self._run(rows, column, decide=True, fill=False)

    def append(self, tokens: torch.LongTensor, column: int) -> None:
        """Record the tokens generated at `column` (all rows)."""
        if column >= self.capacity:
            self._grow(column + 1)
        self.ids[:, column] = tokens
        self.positions[:, column] = self.positions[:, column - 1] + 1

    def gather_logits(self, decisions: list[_Decision]) -> tuple[torch.Tensor, list[int]]:
        """The `(batch, vocab)` next-token logits (zeros for rows not computed) and the layer of each row."""
        return gather_decisions(decisions, self.stats, self.batch_size, self.config.vocab_size, self.confidence_dtype,
                                self.device)

    def write_cache(self, cache: Cache, length: int) -> None:
        """Complete every row's KV up to column `length - 1` and append what `cache` lacks to it.

        Backbone layers and the active exits' blocks are completed; the block KV of exits turned off by
        `active_exits` is not computed (a later early-exit call that uses them catches it up from the cache).
        """
        rows = [
            row for row in range(self.batch_size)
            if any(self.filled[layer][row] < length for layer in self.cache_layers)
        ]
        if rows:
            self._kind = "completion"
            self._run(rows, length - 1, decide=False, fill=True)
        while len(cache.layers) <= self.cache_layers[-1]:
            cache.layers.append(DynamicLayer())
        for layer in self.cache_layers:
            begin = self.cache_lengths[layer]
            if begin < length:
                cache.layers[layer].update(
                    self.keys[layer][:, :, begin:length].clone(), self.values[layer][:, :, begin:length].clone()
                )

    # ------------------------------------------------------------------------------------------------- the pass

    def _run(
        self, rows: list[int], top: int, decide: bool, fill: bool, depth: int | None = None
    ) -> list[_Decision]:
        """Bring `rows` through the model up to column `top`.

        At each layer, a row computes all its columns missing there up to `top`. With `decide`, the rows' heads are
        evaluated on column `top` in depth order; a row stops at the first confident exit unless `fill` is set or
        its backlog reached `max_recompute_tokens`, in which case it goes on to full depth without more heads.
        A `depth` below `num_hidden_layers` ends the pass after that many layers (a speculative draft): rows still
        undecided there keep their hidden states to resume from and get no decision. `on_last_layer`, when set,
        receives the last backbone layer's output `(x, rows, first column)` (a speculative verification).
        """
        end = top + 1
        if end > self.capacity:
            self._grow(end)
        self._pass_cache = {}
        stats, kind = self.stats, self._kind
        settings = self.settings
        cap = settings.max_recompute_tokens
        last = self.num_layers - 1
        undecided = set(rows) if decide else set()
        decisions: list[_Decision] = []
        alive = list(rows)
        refill_from = {row: top for row in rows}

        x: torch.Tensor | None = None  # hidden states of `x_rows`, columns `x_start:end`
        x_rows: list[int] = []
        x_starts: list[int] = []  # per row of `x`: first column it computed at the layer that produced `x`
        x_start = end

        depth = self.num_layers if depth is None else depth
        for layer_idx in range(depth):
            filled = self.filled[layer_idx]
            work = [row for row in alive if filled[row] < end]
            if not work:
                x, x_rows, x_starts, x_start = None, [], [], end
                continue
            starts = [filled[row] for row in work]
            start = min(starts)
            if layer_idx == 0:
                sel = self._selector(work)
                x = self.backbone.embed_tokens(self.ids[sel, start:end])
            elif not (x is not None and x_rows == work and x_starts == starts):
                x = self._resume(work, starts, start, end, x, x_rows, x_starts, x_start)
            valid = None if starts.count(start) == len(starts) else self._valid(starts, start, end)
            plan = self._plan(work, start, end, valid)
            x = self.backbone.layers[layer_idx](x, cache=self.writer, use_cache=True, **plan)
            for row, row_start in zip(work, starts):
                filled[row] = end
                if row_start < refill_from[row]:
                    refill_from[row] = row_start
            self._count(kind, work, starts, start, end)
            x_rows, x_starts, x_start = work, starts, start
            if layer_idx == last and self.on_last_layer is not None:
                self.on_last_layer(x, work, start)

            exit_index = self.exit_after.get(layer_idx)
            if exit_index is None:
                continue
            exit_module = self.backbone.exits[exit_index]
            y = x
            if hasattr(exit_module, "block"):  # same rows and columns as the layer it follows
                y = exit_module.block(x, cache=self.writer, use_cache=True, **plan)
                block_filled = self.filled[self.num_layers + exit_index]
                for row in work:
                    block_filled[row] = end
                self._count(kind, work, starts, start, end, exit_block=exit_index)
            if not undecided:
                continue

            positions = [index for index, row in enumerate(x_rows) if row in undecided]
            head_rows = [x_rows[index] for index in positions]
            hidden = y[:, -1] if len(positions) == len(x_rows) else y[positions, -1]
            fired, fired_logits = self._decide_exit(exit_module, exit_index, hidden)
            if not fired:
                continue
            fired_rows = [head_rows[index] for index in fired]
            decisions.append(_Decision(fired_rows, self.exit_layers[exit_index], fired_logits))
            undecided.difference_update(fired_rows)
            stopping = {
                row for row in fired_rows
                if not fill and (cap is None or end - self.filled[last][row] < cap)
            }
            if stopping:
                x, x_rows, x_starts, x_start, alive = self._stop(stopping, x, x_rows, x_starts, x_start, end, alive)
                if not alive:
                    break

        if depth < self.num_layers:
            if alive:
                self._stop(set(alive), x, x_rows, x_starts, x_start, end, alive)
        elif undecided:
            positions = [index for index, row in enumerate(x_rows) if row in undecided]
            hidden = x[:, -1] if len(positions) == len(x_rows) else x[positions, -1]
            logits = self.model.lm_head(self.backbone.norm(hidden))
            stats.final_head_tokens += len(positions)
            decisions.append(_Decision([x_rows[index] for index in positions], self.num_layers, logits))

        if kind == "decode":
            stats.recomputed_tokens += sum(top - column for column in refill_from.values())
        return decisions

    def _stop(
        self,
        stopping: set[int],
        x: torch.Tensor,
        x_rows: list[int],
        x_starts: list[int],
        x_start: int,
        end: int,
        alive: list[int],
    ) -> tuple[torch.Tensor | None, list[int], list[int], int, list[int]]:
        """Save the stopping rows' hidden states (to resume from later) and drop them from the pass."""
        keep, offset = [], self.prompt_length
        for index, (row, row_start) in enumerate(zip(x_rows, x_starts)):
            if row in stopping:
                self.state[row, row_start - offset:end - offset] = x[index, row_start - x_start:]
            else:
                keep.append(index)
        alive = [row for row in alive if row not in stopping]
        if not keep:
            return None, [], [], end, alive
        x_rows = [x_rows[index] for index in keep]
        x_starts = [x_starts[index] for index in keep]
        new_start = min(x_starts)
        return x[keep, new_start - x_start:], x_rows, x_starts, new_start, alive

    def _resume(
        self,
        work: list[int],
        starts: list[int],
        start: int,
        end: int,
        x: torch.Tensor | None,
        x_rows: list[int],
        x_starts: list[int],
        x_start: int,
    ) -> torch.Tensor:
        """Input of a layer where some columns resume from a saved state: saved states, then this pass's outputs."""
        sel = self._selector(work)
        x_in = self.state[sel, start - self.prompt_length:end - self.prompt_length]
        if isinstance(sel, slice):
            x_in = x_in.clone()
        if x is not None:
            index_of = {row: index for index, row in enumerate(x_rows)}
            for position, row in enumerate(work):
                index = index_of.get(row)
                if index is not None:
                    row_start = x_starts[index]
                    x_in[position, row_start - start:] = x[index, row_start - x_start:]
        return x_in

    # ----------------------------------------------------------------------------------------------- helpers

    def _plan(self, work: list[int], start: int, end: int, valid: torch.Tensor | None) -> dict[str, Any]:
        """Point the KV writer at `work` rows and columns `start:end`; return the layer's mask and rotary inputs."""
        key = (tuple(work), start)
        cached = self._pass_cache.get(key)
        if cached is None:
            sel = self._selector(work)
            cached = (sel, self._mask(work, sel, start, end), self._rotary(sel, start, end))
            self._pass_cache[key] = cached
        sel, mask, position_embeddings = cached
        writer = self.writer
        writer.rows, writer.start, writer.end = sel, start, end
        writer.valid = valid
        return {"attention_mask": mask, "position_embeddings": position_embeddings}

    def _selector(self, rows: list[int]) -> slice | torch.Tensor:
        """Index of `rows` in the batch dimension: a slice (views, no copies) when they are contiguous."""
        first = rows[0]
        if rows[-1] - first + 1 == len(rows):
            return slice(first, first + len(rows))
        return torch.tensor(rows, device=self.device)

    def _valid(self, starts: list[int], start: int, end: int) -> torch.Tensor:
        """`(rows, 1, columns, 1)` mask of the window's columns each row actually computes."""
        row_starts = torch.tensor(starts, device=self.device)
        return (self.arange[start:end][None, :] >= row_starts[:, None])[:, None, :, None]

    def _mask(self, rows: list[int], sel: slice | torch.Tensor, start: int, end: int) -> torch.Tensor | None:
        """Additive `(rows, 1, queries, keys)` mask: causal over columns `start:end`, padding hidden."""
        if end - start == 1 and not any(self.row_padded[row] for row in rows):
            return None
        return causal_padding_mask(self.key_mask[sel, :end], start, self.dtype)

    def _rotary(self, sel: slice | torch.Tensor, start: int, end: int) -> tuple[torch.Tensor, torch.Tensor]:
        return rotary_embeddings(self.backbone.rotary_emb, self.positions[sel, start:end], self.dtype)

    def _decide_exit(self, exit_module: nn.Module, exit_index: int, hidden: torch.Tensor
                     ) -> tuple[list[int], torch.Tensor]:
        return decide_exit(self.model, exit_module, exit_index, hidden, self.settings, self.confidence_dtype,
                           self.stats, self._fire)

    def _fire(self, logits: torch.Tensor) -> list[bool]:
        return exit_fires(logits, self.settings, self.confidence_dtype)

    def _count(
        self, kind: str, work: list[int], starts: list[int], start: int, end: int, exit_block: int | None = None
    ) -> None:
        """Account one layer (or exit block) run over `work` rows, columns `start:end`, in the stats."""
        stats = self.stats
        useful = sum(end - row_start for row_start in starts)
        if kind == "completion":
            stats.completion_token_layers += useful
            return
        stats.padding_token_layers += len(work) * (end - start) - useful
        if exit_block is None:
            stats.layer_tokens += useful
        else:
            stats.exit_block_tokens[exit_block] += useful
        if kind == "decode":
            stats.recomputed_token_layers += useful - len(work)

    def _load_cache(self, cache: Cache) -> int:
        """Copy `cache` into the KV tensors; return the first column some needed cache layer lacks."""
        lengths = []
        for layer in self.cache_layers:
            length = cache.layers[layer].get_seq_length() if layer < len(cache.layers) else 0
            self.cache_lengths[layer] = length
            lengths.append(length)
        start = min(lengths)
        if start >= self.prompt_length:
            raise ValueError(
                f"The cache already holds {start} tokens but `input_ids` has only {self.prompt_length}: pass the "
                "whole sequence (cached tokens and new ones)."
            )
        if start > 0:
            for layer in self.cache_layers:
                cached = cache.layers[layer]
                if cached.keys.shape[0] != self.batch_size:
                    raise ValueError(
                        f"The cache holds {cached.keys.shape[0]} sequences but the batch has {self.batch_size}."
                    )
                self.keys[layer][:, :, :start] = cached.keys[:, :, :start]
                self.values[layer][:, :, :start] = cached.values[:, :, :start]
        return start

    def _grow(self, needed: int) -> None:
        """Enlarge every buffer along the sequence dimension (only when stopping criteria allow > max_length)."""
        extra = max(needed, 2 * self.capacity) - self.capacity

        def pad(tensor: torch.Tensor, dim: int, value: float = 0) -> torch.Tensor:
            shape = list(tensor.shape)
            shape[dim] = extra
            return torch.cat([tensor, tensor.new_full(shape, value)], dim=dim)

        self.ids = pad(self.ids, 1)
        self.positions = pad(self.positions, 1)
        self.key_mask = pad(self.key_mask, 1, True)
        self.state = pad(self.state, 1)
        for layer in self.cache_layers:
            self.keys[layer] = pad(self.keys[layer], 2)
            self.values[layer] = pad(self.values[layer], 2)
        self.capacity += extra
        self.arange = torch.arange(self.capacity, device=self.device)


# ---------------------------------------------------------------------------------------- shared decoding steps
# (also used, stage by stage, by pipeline-parallel decoding)


def prompt_mask_and_positions(
    attention_mask: torch.Tensor | None,
    position_ids: torch.Tensor | None,
    batch_size: int,
    prompt_length: int,
    device: torch.device,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The prompt's `(batch, prompt_length)` key mask (False on padding) and rotary positions."""
    if attention_mask is not None:
        key_mask = attention_mask[:, -prompt_length:].bool()
    else:
        key_mask = torch.ones(batch_size, prompt_length, dtype=torch.bool, device=device)
    if position_ids is not None and position_ids.shape[-1] >= prompt_length:
        positions = position_ids[..., -prompt_length:].expand(batch_size, prompt_length)
    elif attention_mask is not None:
        positions = (key_mask.long().cumsum(-1) - 1).clamp(min=0)
    else:
        positions = torch.arange(prompt_length, device=device).expand(batch_size, prompt_length)
    return key_mask, positions


def causal_padding_mask(key_mask: torch.Tensor, start: int, dtype: torch.dtype) -> torch.Tensor:
    """Additive `(rows, 1, queries, keys)` mask of queries `start:end` over keys `0:end` (`end` = the width of the
    `(rows, end)` bool `key_mask`): causal, with keys False in `key_mask` (padding) hidden."""
    end = key_mask.shape[-1]
    arange = torch.arange(end, device=key_mask.device)
    allowed = (arange[None, :] <= arange[start:end, None])[None] & key_mask[:, None, :]
    mask = torch.zeros(allowed.shape, dtype=dtype, device=key_mask.device)
    return mask.masked_fill_(~allowed, torch.finfo(dtype).min)[:, None]


def rotary_embeddings(
    rotary_emb: nn.Module, positions: torch.Tensor, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    """The decoder layers' `position_embeddings` (cos, sin) at `positions` `(rows, columns)`."""
    probe = torch.empty(0, dtype=dtype, device=positions.device)  # only its dtype and device are read
    return rotary_emb(probe, positions)


def decide_exit(
    model: nn.Module,
    exit_module: nn.Module,
    exit_index: int,
    hidden: torch.Tensor,
    settings: EarlyExitSettings,
    confidence_dtype: torch.dtype,
    stats: EarlyExitStats | None = None,
    fire: Callable[[torch.Tensor], list[bool]] | None = None,
) -> tuple[list[int], torch.Tensor]:
    """Which of the rows of `hidden` (exit `exit_index`'s block output, one row each) leave at this exit, and their
    logits: norm, residual MLP, projection (as the model does), then the confidence. With the `"gate"` measure the
    vocabulary projection runs for the leaving rows only. Counts the work in `stats` when given; `fire` (default
    `exit_fires`) decides from the logits."""
    if hasattr(exit_module, "norm"):
        hidden = exit_module.norm(hidden)
    if hasattr(exit_module, "mlp"):
        hidden = hidden + exit_module.mlp(hidden)
    projection = model.exit_projection(exit_index)
    if settings.confidence == "gate":
        if stats is not None:
            stats.exit_gate_tokens[exit_index] += hidden.shape[0]
        confidence = torch.sigmoid(exit_module.gate_logit(hidden).to(confidence_dtype))
        fired = (confidence >= settings.threshold).nonzero().flatten().tolist()
        if not fired:
            return [], hidden[:0]
        if stats is not None:
            stats.exit_head_tokens[exit_index] += len(fired)
        return fired, projection(hidden if len(fired) == hidden.shape[0] else hidden[fired])
    logits = projection(hidden)
    if stats is not None:
        stats.exit_head_tokens[exit_index] += hidden.shape[0]
    fires = fire(logits) if fire is not None else exit_fires(logits, settings, confidence_dtype)
    fired = [index for index, on in enumerate(fires) if on]
    return fired, logits if len(fired) == logits.shape[0] else logits[fired]


def exit_fires(logits: torch.Tensor, settings: EarlyExitSettings, confidence_dtype: torch.dtype) -> list[bool]:
    """Whether each row's confidence reaches the threshold (computed from raw logits, float32 or wider)."""
    threshold = settings.threshold
    if threshold <= 0.0:  # every confidence is >= 0
        return [True] * logits.shape[0]
    probs = logits.to(confidence_dtype).softmax(dim=-1)
    if settings.confidence == "max_prob":
        confidence = probs.amax(dim=-1)
    else:
        top2 = probs.topk(2, dim=-1).values
        confidence = top2[:, 0] - top2[:, 1]
    return (confidence >= threshold).tolist()


def gather_decisions(
    decisions: list[_Decision],
    stats: EarlyExitStats,
    batch_size: int,
    vocab_size: int,
    dtype: torch.dtype,
    device: torch.device,
) -> tuple[torch.Tensor, list[int]]:
    """The `(batch, vocab)` next-token logits in `dtype` (zeros for rows not computed) and the layer of each row;
    counts the tokens per exit in `stats`."""
    layers = [-1] * batch_size
    for decision in decisions:
        stats.tokens_per_exit[decision.layer] += len(decision.rows)
        for row in decision.rows:
            layers[row] = decision.layer
    if len(decisions) == 1 and len(decisions[0].rows) == batch_size:
        return decisions[0].logits.to(dtype, copy=True), layers
    logits = torch.zeros(batch_size, vocab_size, dtype=dtype, device=device)
    for decision in decisions:
        logits[torch.tensor(decision.rows, device=device)] = decision.logits.to(dtype)
    return logits, layers


__all__ = [
    "EXIT_CONFIDENCE_MEASURES",
    "EarlyExitDecoder",
    "EarlyExitSettings",
    "EarlyExitStats",
    "GenerateEarlyExitDecoderOnlyOutput",
    "generate_with_early_exit",
]
