"""EarlyExitGPT: a Llama-style decoder with early-exit heads after some of its layers (EE-LLM).

The backbone reuses transformers' Llama building blocks, so with its exits ignored the model computes exactly
what `LlamaForCausalLM` computes on the same weights. Each exit sits after a backbone layer and turns that
layer's hidden state into next-token logits: an optional extra decoder layer ("exit block", with its own KV
cache), an optional RMSNorm, an optional residual MLP, then a vocabulary projection (its own, or the final
LM head's when `tie_exit_heads`).

This file is self-contained apart from single-dot imports of its neighbours, so `save_pretrained` can ship it
as remote code.
"""

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from transformers.cache_utils import Cache, DynamicCache, DynamicLayer
from transformers.generation import GenerationMixin
from transformers.masking_utils import create_causal_mask
from transformers.modeling_outputs import BaseModelOutputWithPast, CausalLMOutputWithPast
from transformers.modeling_utils import PreTrainedModel, slice_logits_to_keep
from transformers.models.llama.modeling_llama import (
    LlamaAttention,
    LlamaDecoderLayer,
    LlamaMLP,
    LlamaRMSNorm,
    LlamaRotaryEmbedding,
)
from transformers.processing_utils import Unpack
from transformers.utils import TransformersKwargs, can_return_tuple
from transformers.utils.deprecation import deprecate_kwarg
from transformers.utils.generic import merge_with_config_defaults
from transformers.utils.output_capturing import OutputRecorder, capture_outputs

from .configuration_early_exit_gpt import EarlyExitGPTConfig
from .generation_early_exit import generate_with_early_exit


@dataclass
class EarlyExitModelOutputWithPast(BaseModelOutputWithPast):
    """`BaseModelOutputWithPast` plus each exit's hidden state, ready for its vocabulary projection.

    Args:
        exit_hidden_states (`tuple(torch.Tensor)`, *optional*):
            One `(batch_size, sequence_length, hidden_size)` tensor per exit in `config.exit_layers`, after the
            exit's block, norm and MLP. `None` when exits were not computed.
        exit_gate_inputs (`tuple(torch.Tensor)`, *optional*): with `config.exit_gate`, what each exit's gate reads
            (`EarlyExitGPTExit.output_and_gate_input`), of the same shape.
    """

    exit_hidden_states: tuple[torch.Tensor, ...] | None = None
    exit_gate_inputs: tuple[torch.Tensor, ...] | None = None


@dataclass
class EarlyExitCausalLMOutputWithPast(CausalLMOutputWithPast):
    """`CausalLMOutputWithPast` plus the early exits' logits and losses.

    Args:
        loss (`torch.Tensor`, *optional*): final-head cross-entropy plus `sum_i exit_loss_weights[i] * exit_losses[i]`.
        logits (`torch.Tensor`): the final head's logits.
        exit_logits (`tuple(torch.Tensor)`, *optional*): each exit's logits, aligned with `config.exit_layers`.
        exit_losses (`tuple(torch.Tensor)`, *optional*): each exit's unweighted cross-entropy.
        exit_gate_logits (`tuple(torch.Tensor)`, *optional*): with `config.exit_gate`, each exit's confidence
            gate logit, `(batch_size, sequence_length)`.
        exit_gate_losses (`tuple(torch.Tensor)`, *optional*): each gate's binary cross-entropy against "the exit's
            greedy token is the final head's" (added to `loss` with weight 1).
    """

    exit_logits: tuple[torch.Tensor, ...] | None = None
    exit_losses: tuple[torch.Tensor, ...] | None = None
    exit_gate_logits: tuple[torch.Tensor, ...] | None = None
    exit_gate_losses: tuple[torch.Tensor, ...] | None = None


class EarlyExitGPTDecoderLayer(LlamaDecoderLayer):
    """A backbone decoder layer (pre-norm attention + SwiGLU MLP), identical to Llama's."""


class EarlyExitGPTExitBlock(LlamaDecoderLayer):
    """The extra decoder layer of an exit (`config.exit_block`); caches its KV at index `num_hidden_layers + i`."""


class EarlyExitGPTExit(nn.Module):
    """Everything of exit `exit_index` before its vocabulary projection: block, then norm, then residual MLP; and
    its confidence gate (`config.exit_gate`), read by `gate_logit` from the exit's output, or from its normed
    hidden state before the MLP with `config.exit_gate_before_mlp` (an exit that does not fire then skips its
    MLP)."""

    def __init__(self, config: EarlyExitGPTConfig, exit_index: int):
        super().__init__()
        if config.exit_block:
            self.block = EarlyExitGPTExitBlock(config, layer_idx=config.num_hidden_layers + exit_index)
        if config.exit_norm:
            self.norm = LlamaRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        if config.exit_mlp:
            self.mlp = LlamaMLP(config)
        if config.exit_gate:
            self.gate = nn.Linear(config.hidden_size, 1)
        self.gate_before_mlp = config.exit_gate_before_mlp

    def gate_logit(self, gate_input: torch.Tensor) -> torch.Tensor:
        """The gate's logit per token, `(..., )`, from its input (`output_and_gate_input`); the input is
        detached, so training the gate leaves the exit's own representation alone."""
        return self.gate(gate_input.detach()).squeeze(-1)

    def forward(self, hidden_states: torch.Tensor, **layer_kwargs) -> torch.Tensor:
        return self.output_and_gate_input(hidden_states, **layer_kwargs)[0]

    def output_and_gate_input(self, hidden_states: torch.Tensor, **layer_kwargs
                              ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The exit's output (block, norm, residual MLP) and what its gate reads (None without a gate)."""
        if hasattr(self, "block"):
            hidden_states = self.block(hidden_states, **layer_kwargs)
        normed = self.normed(hidden_states)
        output = self.residual_mlp(normed)
        if not hasattr(self, "gate"):
            return output, None
        return output, normed if self.gate_before_mlp else output

    def normed(self, hidden_states: torch.Tensor) -> torch.Tensor:
        """The exit's norm (the identity without `config.exit_norm`)."""
        return self.norm(hidden_states) if hasattr(self, "norm") else hidden_states

    def residual_mlp(self, hidden_states: torch.Tensor) -> torch.Tensor:
        """The exit's residual MLP (the identity without `config.exit_mlp`)."""
        return hidden_states + self.mlp(hidden_states) if hasattr(self, "mlp") else hidden_states


class EarlyExitGPTPreTrainedModel(PreTrainedModel):
    config: EarlyExitGPTConfig
    config_class = EarlyExitGPTConfig
    base_model_prefix = "model"
    supports_gradient_checkpointing = True
    _no_split_modules = ["EarlyExitGPTDecoderLayer", "EarlyExitGPTExitBlock"]
    _supports_flash_attn = True
    _supports_sdpa = True
    _supports_flex_attn = True
    _supports_attention_backend = True
    _can_record_outputs = {
        "hidden_states": OutputRecorder(EarlyExitGPTDecoderLayer, layer_name="layers"),
        "attentions": OutputRecorder(LlamaAttention, index=1, layer_name="layers"),
    }


def ensure_cache_layers(cache: Cache, num_layers: int) -> None:
    """Give a `DynamicCache` built from the config (one layer per backbone layer) room for the exit blocks."""
    if isinstance(cache, DynamicCache):
        while len(cache.layers) < num_layers:
            cache.layers.append(DynamicLayer())


class EarlyExitGPTModel(EarlyExitGPTPreTrainedModel):
    """The backbone: embeddings, decoder layers, final norm, and the exits' pre-projection modules."""

    def __init__(self, config: EarlyExitGPTConfig):
        super().__init__(config)
        self.padding_idx = config.pad_token_id
        self.vocab_size = config.vocab_size

        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size, self.padding_idx)
        self.layers = nn.ModuleList(
            [EarlyExitGPTDecoderLayer(config, layer_idx) for layer_idx in range(config.num_hidden_layers)]
        )
        self.norm = LlamaRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.exits = nn.ModuleList([EarlyExitGPTExit(config, index) for index in range(config.num_exits)])
        self.rotary_emb = LlamaRotaryEmbedding(config=config)
        self.gradient_checkpointing = False

        self.post_init()

    @deprecate_kwarg("past_key_values", "5.40.0", new_name="cache")
    @merge_with_config_defaults
    @capture_outputs
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache: Cache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        use_cache: bool | None = None,
        compute_exits: bool = True,
        **kwargs: Unpack[TransformersKwargs],
    ) -> EarlyExitModelOutputWithPast:
        r"""
        compute_exits (`bool`, defaults to `True`):
            Whether to run the exits' modules and return `exit_hidden_states`. Plain full-depth generation turns
            this off so that exits cost nothing.
        """
        if (input_ids is None) ^ (inputs_embeds is not None):
            raise ValueError("You must specify exactly one of input_ids or inputs_embeds")

        if inputs_embeds is None:
            inputs_embeds = self.embed_tokens(input_ids)

        if use_cache and cache is None:
            cache = DynamicCache(config=self.config)
        if cache is not None and self.config.exit_block:
            ensure_cache_layers(cache, self.config.num_hidden_layers + self.config.num_exits)

        if position_ids is None:
            past_seen_tokens = cache.get_seq_length() if cache is not None else 0
            position_ids = torch.arange(inputs_embeds.shape[1], device=inputs_embeds.device) + past_seen_tokens
            position_ids = position_ids.unsqueeze(0)

        causal_mask = create_causal_mask(
            config=self.config,
            inputs_embeds=inputs_embeds,
            attention_mask=attention_mask,
            cache=cache,
            position_ids=position_ids,
        )

        hidden_states = inputs_embeds
        position_embeddings = self.rotary_emb(hidden_states, position_ids=position_ids)
        layer_kwargs = dict(
            attention_mask=causal_mask,
            position_embeddings=position_embeddings,
            position_ids=position_ids,
            cache=cache,
            use_cache=use_cache,
            **kwargs,
        )

        exit_of_layer = dict(zip(self.config.exit_layers, self.exits)) if compute_exits else {}
        exit_hidden_states, gate_inputs = [], []
        for layer_number, decoder_layer in enumerate(self.layers[: self.config.num_hidden_layers], start=1):
            hidden_states = decoder_layer(hidden_states, **layer_kwargs)
            if layer_number in exit_of_layer:
                exit_hidden, gate_input = exit_of_layer[layer_number].output_and_gate_input(hidden_states,
                                                                                            **layer_kwargs)
                exit_hidden_states.append(exit_hidden)
                gate_inputs.append(gate_input)

        hidden_states = self.norm(hidden_states)
        return EarlyExitModelOutputWithPast(
            last_hidden_state=hidden_states,
            cache=cache,
            exit_hidden_states=tuple(exit_hidden_states) if compute_exits else None,
            exit_gate_inputs=tuple(gate_inputs) if compute_exits and self.config.exit_gate else None,
        )


class EarlyExitGPTForCausalLM(EarlyExitGPTPreTrainedModel, GenerationMixin):
    """EarlyExitGPT with its final LM head and one vocabulary projection per exit."""

    _tied_weights_keys = {"lm_head.weight": "model.embed_tokens.weight"}
    _tp_plan = {"lm_head": "colwise_gather_output"}
    _pp_plan = {"lm_head": (["hidden_states"], ["logits"])}

    def __init__(self, config: EarlyExitGPTConfig):
        super().__init__(config)
        self.model = EarlyExitGPTModel(config)
        self.vocab_size = config.vocab_size
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        if not config.tie_exit_heads:
            self.exit_lm_heads = nn.ModuleList(
                [nn.Linear(config.hidden_size, config.vocab_size, bias=False) for _ in range(config.num_exits)]
            )
        self._shortlist_weights: dict | None = None  # see `reusing_exit_shortlists`
        self.post_init()

    def exit_projection(self, exit_index: int) -> nn.Linear:
        """The vocabulary projection of exit `exit_index` (the final LM head when exits are tied)."""
        return self.lm_head if self.config.tie_exit_heads else self.exit_lm_heads[exit_index]

    def exit_logits(self, exit_index: int, exit_hidden: torch.Tensor) -> torch.Tensor:
        """Exit `exit_index`'s next-token logits from its output (`exit_hidden_states`): its projection, onto the
        rows of `config.exit_vocab` only when set (every other token then gets -inf: probability 0)."""
        projection = self.exit_projection(exit_index)
        if self.config.exit_vocab is None:
            return projection(exit_hidden)
        weight, ids = self._shortlist(projection.weight)
        shortlist_logits = nn.functional.linear(exit_hidden, weight)
        logits = shortlist_logits.new_full((*shortlist_logits.shape[:-1], projection.out_features), float("-inf"))
        logits[..., ids] = shortlist_logits
        return logits

    def _shortlist(self, weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The rows of `weight` at `config.exit_vocab`, and those ids as a tensor on its device."""
        cache = self._shortlist_weights
        key = (weight.data_ptr(), weight.device, weight.dtype)
        if cache is not None and key in cache:
            return cache[key]
        ids = torch.tensor(self.config.exit_vocab, device=weight.device)
        rows = (weight.index_select(0, ids), ids)
        if cache is not None:
            cache[key] = rows
        return rows

    @contextlib.contextmanager
    def reusing_exit_shortlists(self) -> Iterator[None]:
        """Within this block the exits' shortlisted projection rows (`config.exit_vocab`) are gathered once and
        reused: generation runs in one, as the weights do not change while it decodes. Without it, every call
        gathers them afresh (so that training and edited weights are always seen)."""
        outer = self._shortlist_weights
        self._shortlist_weights = {} if outer is None else outer
        try:
            yield
        finally:
            self._shortlist_weights = outer

    def resize_token_embeddings(self, new_num_tokens: int | None = None, pad_to_multiple_of: int | None = None,
                                mean_resizing: bool = True) -> nn.Embedding:
        """Resize the input embedding, the final head and every untied exit head together; a smaller vocabulary also
        drops the ids it no longer has from the exits' shortlist (`config.exit_vocab`)."""
        if new_num_tokens is not None and self.config.exit_vocab is not None:  # checked before anything changes
            multiple = pad_to_multiple_of or 1
            size = -(-new_num_tokens // multiple) * multiple
            if self.config.exit_vocab[0] >= size:
                raise ValueError(f"resizing to {size} tokens leaves none of `config.exit_vocab` (its smallest id is "
                                 f"{self.config.exit_vocab[0]}); set `config.exit_vocab` anew, or None")
        embeddings = super().resize_token_embeddings(new_num_tokens, pad_to_multiple_of, mean_resizing)
        num_tokens = embeddings.weight.shape[0]
        if not self.config.tie_exit_heads:
            for index, head in enumerate(self.exit_lm_heads):
                self.exit_lm_heads[index] = self._get_resized_lm_head(
                    head, num_tokens, mean_resizing=mean_resizing
                )
        if self.config.exit_vocab is not None:
            self.config.exit_vocab = [token for token in self.config.exit_vocab if token < num_tokens]
        return embeddings

    def generate(self, *args, **kwargs):
        """`GenerationMixin.generate`, plus token-wise early exit when `early_exit_threshold` is set (as an argument
        or in the generation config); see `generation_early_exit` for the settings and the extra outputs."""
        return generate_with_early_exit(self, super().generate, *args, **kwargs)

    def prepare_inputs_for_generation(self, *args, **kwargs):
        """Plain `generate()` decodes at full depth, so the exits are not computed unless asked for."""
        model_inputs = super().prepare_inputs_for_generation(*args, **kwargs)
        model_inputs.setdefault("compute_exits", False)
        return model_inputs

    @deprecate_kwarg("past_key_values", "5.40.0", new_name="cache")
    @can_return_tuple
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache: Cache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        compute_exits: bool = True,
        **kwargs: Unpack[TransformersKwargs],
    ) -> EarlyExitCausalLMOutputWithPast:
        r"""
        labels (`torch.LongTensor` of shape `(batch_size, sequence_length)`, *optional*):
            Next-token labels as for `LlamaForCausalLM` (shifted inside; -100 is ignored). The loss is the final
            head's cross-entropy plus `sum_i exit_loss_weights[i] * exit_losses[i]`.
        compute_exits (`bool`, defaults to `True`):
            Whether to compute `exit_logits` (and exit losses).

        Example:

        ```python
        >>> from eellm_hf import EarlyExitGPTConfig, EarlyExitGPTForCausalLM
        >>> model = EarlyExitGPTForCausalLM(EarlyExitGPTConfig(
        ...     vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
        ...     num_attention_heads=4, exit_layers=[1, 2], exit_loss_weights=[0.5, 0.5]))
        >>> out = model(input_ids=torch.tensor([[1, 2, 3]]), labels=torch.tensor([[1, 2, 3]]))
        >>> len(out.exit_logits), out.loss.shape
        (2, torch.Size([]))
        ```"""
        outputs: EarlyExitModelOutputWithPast = self.model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            cache=cache,
            inputs_embeds=inputs_embeds,
            use_cache=use_cache,
            compute_exits=compute_exits,
            **kwargs,
        )

        hidden_states = slice_logits_to_keep(outputs.last_hidden_state, logits_to_keep)
        logits = self.lm_head(hidden_states)
        exit_logits, gate_logits = None, None
        if outputs.exit_hidden_states is not None:
            exit_hidden_states = [slice_logits_to_keep(exit_hidden, logits_to_keep)
                                  for exit_hidden in outputs.exit_hidden_states]
            exit_logits = tuple(self.exit_logits(index, exit_hidden)
                                for index, exit_hidden in enumerate(exit_hidden_states))
            if outputs.exit_gate_inputs is not None:
                gate_logits = tuple(exit_module.gate_logit(slice_logits_to_keep(gate_input, logits_to_keep))
                                    for exit_module, gate_input in zip(self.model.exits, outputs.exit_gate_inputs))

        loss, exit_losses, gate_losses = None, None, None
        if labels is not None:
            loss = self.loss_function(logits=logits, labels=labels, vocab_size=self.config.vocab_size, **kwargs)
            if exit_logits is not None:
                exit_labels, exit_kwargs = shortlisted_labels(labels, self.config.exit_vocab, kwargs)
                exit_losses = tuple(
                    self.loss_function(logits=exit_logit, labels=exit_labels, vocab_size=self.config.vocab_size,
                                       **exit_kwargs)
                    for exit_logit in exit_logits
                )
                for weight, exit_loss in zip(self.config.exit_loss_weights, exit_losses):
                    loss = loss + weight * exit_loss
            if gate_logits is not None:
                gate_losses = tuple(gate_loss(gate, exit_logit, logits, labels)
                                    for gate, exit_logit in zip(gate_logits, exit_logits))
                loss = loss + sum(gate_losses)

        return EarlyExitCausalLMOutputWithPast(
            loss=loss,
            logits=logits,
            cache=outputs.cache,
            hidden_states=outputs.hidden_states,
            attentions=outputs.attentions,
            exit_logits=exit_logits,
            exit_losses=exit_losses,
            exit_gate_logits=gate_logits,
            exit_gate_losses=gate_losses,
        )

    def save_pretrained(self, save_directory: str | Path, *args, **kwargs) -> None:
        """`PreTrainedModel.save_pretrained`, plus a model card (README.md) unless the folder already has one."""
        super().save_pretrained(save_directory, *args, **kwargs)
        card = Path(save_directory) / "README.md"
        if not card.exists():
            card.write_text(model_card(self.config))


def shortlisted_labels(labels: torch.LongTensor, exit_vocab: list[int] | None, loss_kwargs: dict
                       ) -> tuple[torch.LongTensor, dict]:
    """The labels and loss arguments of an exit restricted to `exit_vocab`: a label outside it, which the exit can
    never predict, costs nothing (-100), and the mean stays over every real label (`num_items_in_batch`), so the
    exit's loss is the sum of its listed labels' cross-entropies over all of them. Unchanged without a shortlist."""
    if exit_vocab is None:
        return labels, loss_kwargs
    ids = torch.tensor(exit_vocab, device=labels.device)

    def listed(targets: torch.Tensor) -> torch.Tensor:
        return targets.masked_fill(~torch.isin(targets, ids) & (targets != -100), -100)

    loss_kwargs = dict(loss_kwargs)
    shift_labels = loss_kwargs.get("shift_labels")
    if loss_kwargs.get("num_items_in_batch") is None:
        shifted = shift_labels if shift_labels is not None else labels[..., 1:]
        loss_kwargs["num_items_in_batch"] = (shifted != -100).sum()
    if shift_labels is not None:
        loss_kwargs["shift_labels"] = listed(shift_labels)
    return listed(labels), loss_kwargs


def gate_loss(gate_logits: torch.Tensor, exit_logits: torch.Tensor, logits: torch.Tensor,
              labels: torch.LongTensor) -> torch.Tensor:
    """Mean binary cross-entropy of an exit's gate against "the exit's greedy token is the final head's", over the
    positions that have a next-token label (as the cross-entropy counts them: `labels` unshifted, -100 ignored)."""
    agree = (exit_logits.argmax(dim=-1) == logits.argmax(dim=-1)).float()
    has_label = torch.zeros_like(agree, dtype=torch.bool)
    has_label[:, :-1] = labels[:, 1:] != -100
    losses = nn.functional.binary_cross_entropy_with_logits(gate_logits.float(), agree, reduction="none")
    return (losses * has_label).sum() / has_label.sum().clamp(min=1)


def model_card(config: EarlyExitGPTConfig) -> str:
    """A Hub model card stating the exits and showing how to generate with them."""
    exits = "\n".join(
        f"| {index} | after layer {layer} of {config.num_hidden_layers} | {weight:g} |"
        for index, (layer, weight) in enumerate(zip(config.exit_layers, config.exit_loss_weights))
    )
    head_parts = [name for name, on in (("exit block", config.exit_block), ("RMSNorm", config.exit_norm),
                                        ("residual MLP", config.exit_mlp)) if on]
    projection = "the final LM head's weight" if config.tie_exit_heads else "its own projection"
    shortlist = ""
    if config.exit_vocab is not None:
        shortlist = (f" The exits predict among {len(config.exit_vocab):,} of the vocabulary's {config.vocab_size:,} "
                     "tokens only (a shortlist, `config.exit_vocab`), so a token that leaves pays that share of a "
                     "projection.")
    gate = ""
    if config.exit_gate:
        reads = "its state before the MLP" if config.exit_gate_before_mlp else "its output"
        gate = (f" Each exit has a learned confidence gate (`exit_confidence=\"gate\"`), which reads {reads}: the"
                " projection runs only for the tokens that leave (with `exit_confidence=\"gate_max_prob\"`, for"
                " those the gate screens in, which leave when their largest probability reaches the threshold).")
    return f"""---
library_name: transformers
tags:
- early-exit
- eellm_hf
pipeline_tag: text-generation
---

# Early-exit language model (EarlyExitGPT)

A Llama-style decoder with {config.num_hidden_layers} layers, hidden size {config.hidden_size} and
{config.num_exits} early exit(s) besides the final head, in the style of EE-LLM. Each exit applies
{", ".join(head_parts) or "nothing"} and then {projection}.{shortlist}{gate}

| exit | position | training loss weight |
|---|---|---|
{exits}

## Generate with early exit

```python
from transformers import AutoModelForCausalLM, AutoTokenizer

model = AutoModelForCausalLM.from_pretrained(MODEL_DIR, trust_remote_code=True)
tokenizer = AutoTokenizer.from_pretrained(MODEL_DIR)
inputs = tokenizer(["In the beginning"], return_tensors="pt")
out = model.generate(**inputs, max_new_tokens=32, early_exit_threshold=0.9,
                     return_dict_in_generate=True)
print(tokenizer.batch_decode(out.sequences, skip_special_tokens=True))
print(out.exit_layers)  # the layer that produced each generated token
```

A token leaves at the first exit whose confidence (its largest probability) reaches the threshold; the
KV cache of the layers it skipped is recomputed before a later token needs it, so the output equals
no-cache early-exit decoding exactly. `early_exit_threshold=None` decodes at full depth.

With `early_exit_mode="speculative"` the exits only draft tokens (up to `num_speculative_tokens` per round)
and the whole model verifies them in one pass: the output is then identical to full depth (greedy), or
distributed as full depth (sampling), also for batches.
"""


__all__ = [
    "EarlyExitCausalLMOutputWithPast",
    "EarlyExitGPTForCausalLM",
    "EarlyExitGPTModel",
    "EarlyExitGPTPreTrainedModel",
    "EarlyExitModelOutputWithPast",
]
