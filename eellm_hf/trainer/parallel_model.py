"""EarlyExitGPT on nanotron's 3D-parallel primitives.

* Tensor parallelism (sync all-reduce mode): vocabulary-parallel embedding and heads, column-parallel
  ``q/k/v_proj`` and ``gate/up_proj``, row-parallel ``o_proj`` and ``down_proj``; attention and KV heads are split
  over TP ranks (GQA groups stay on one rank). The vocabulary is padded to a multiple of ``tp`` internally; the
  padding entries get ``-inf`` logits (see :mod:`.loss`) and are removed on export.
* Pipeline parallelism: every module is a ``PipelineBlock`` placed on a stage (:class:`StageLayout`). An exit's
  modules and its head sit on the stage of its layer, so its vocabulary-sized logits and loss never cross stages;
  exit losses join the stage's backward through nanotron's "activations requiring backward" list.
* Parameter names are Hugging Face ``EarlyExitGPTForCausalLM`` names with ``.pp_block`` inserted after the block
  (:func:`hf_name`), so HF <-> parallel conversion is (un)sharding only (:mod:`.weights`).
* Tied weights (input embedding and final head with ``tie_word_embeddings``; exit heads and final head with
  ``tie_exit_heads``) are nanotron tied parameters, possibly across stages; parameters replicated over TP are
  tied across the TP group so that gradient clipping counts them once.

Only attributes of the config are read (an ``EarlyExitGPTConfig``, or any object with its fields), so this
module imports neither transformers nor the HF model.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .loss import (
    MultiExitLoss,
    TeacherTargets,
    distillation_token_losses,
    gate_token_losses,
    mask_padded_vocab,
    vocab_parallel_argmax,
    vocab_parallel_token_losses,
)
from .nanotron_compat import (
    ParallelContext,
    PipelineBlock,
    PipelineTrainBatchState,
    TensorParallelColumnLinear,
    TensorParallelEmbedding,
    TensorParallelLinearMode,
    TensorParallelRowLinear,
    TensorPointer,
    differentiable_all_gather,
    dist,
    make_p2p,
    tie_parameters,
    tie_replicated_parameters,
)

__all__ = [
    "ParallelEarlyExitGPT",
    "StageLayout",
    "balanced_layer_split",
    "exit_flops_per_token",
    "head_flops_per_token",
    "hf_name",
    "layer_flops_per_token",
    "make_layout",
    "padded_vocab_size",
]

TP_MODE = TensorParallelLinearMode.ALL_REDUCE


# ------------------------------------------------------------------------------------------------------------
# Layout: which pipeline stage holds what
# ------------------------------------------------------------------------------------------------------------


def _head_dim(config: Any) -> int:
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


def _kv_heads(config: Any) -> int:
    return getattr(config, "num_key_value_heads", None) or config.num_attention_heads


def padded_vocab_size(vocab_size: int, tp: int) -> int:
    """``vocab_size`` rounded up to a multiple of ``tp``."""
    return -(-vocab_size // tp) * tp


def layer_flops_per_token(config: Any) -> float:
    """Forward FLOPs per token of one decoder layer's matmuls: ``2 * (attention + 3 * h * i)`` parameters, the
    attention counting ``q/o`` with all heads and ``k/v`` with the KV heads (GQA)."""
    h, hd = config.hidden_size, _head_dim(config)
    attention = 2 * h * config.num_attention_heads * hd + 2 * h * _kv_heads(config) * hd
    return 2.0 * (attention + 3 * h * config.intermediate_size)


def head_flops_per_token(config: Any) -> float:
    """Forward FLOPs per token of a vocabulary projection (``2 * h * V``)."""
    return 2.0 * config.hidden_size * config.vocab_size


def exit_flops_per_token(config: Any) -> float:
    """Forward FLOPs per token of one exit: its projection, plus its MLP and block when it has them."""
    flops = head_flops_per_token(config)
    if getattr(config, "exit_mlp", False):
        flops += 2.0 * 3 * config.hidden_size * config.intermediate_size
    if getattr(config, "exit_block", False):
        flops += layer_flops_per_token(config)
    return flops


FROZEN_EXIT_COST = 3.0
"""EE-Tuning: an exit's forward and backward against the backbone's forward alone, per forward FLOP."""


def balanced_layer_split(config: Any, pp: int, frozen_backbone: bool = False) -> list[int]:
    """Decoder layers per pipeline stage minimising the most expensive stage, counting each exit on its layer's
    stage and the final head on the last stage (every stage gets at least one layer). With ``frozen_backbone``
    (EE-Tuning, :mod:`.ee_tuning`) the backbone runs forward only while the exits also run backward, so an exit
    weighs :data:`FROZEN_EXIT_COST` times its forward FLOPs."""
    num_layers = config.num_hidden_layers
    if not 1 <= pp <= num_layers:
        raise ValueError(f"cannot split {num_layers} layers over pp={pp} pipeline stages")
    exits = set(config.exit_layers or [])
    exit_cost = exit_flops_per_token(config) * (FROZEN_EXIT_COST if frozen_backbone else 1.0)
    unit = [layer_flops_per_token(config) + (exit_cost if n in exits else 0.0) for n in range(1, num_layers + 1)]
    prefix = [0.0]
    for cost in unit:
        prefix.append(prefix[-1] + cost)
    head = head_flops_per_token(config)
    # best[s][n]: minimal max-stage cost putting the first n layers on stages 0..s-1; choice[s][n]: layers on stage s-1
    inf = math.inf
    best = [[inf] * (num_layers + 1) for _ in range(pp + 1)]
    choice = [[0] * (num_layers + 1) for _ in range(pp + 1)]
    best[0][0] = 0.0
    for s in range(1, pp + 1):
        for n in range(s, num_layers - (pp - s) + 1):
            for k in range(1, n - (s - 1) + 1):
                cost = prefix[n] - prefix[n - k] + (head if s == pp else 0.0)
                value = max(best[s - 1][n - k], cost)
                if value < best[s][n] - 1e-9 * max(1.0, value):
                    best[s][n], choice[s][n] = value, k
    split, n = [], num_layers
    for s in range(pp, 0, -1):
        split.append(choice[s][n])
        n -= choice[s][n]
    return split[::-1]


@dataclasses.dataclass(frozen=True)
class StageLayout:
    """Decoder layers per pipeline stage and the model's exit layers (1-based)."""

    layer_split: tuple[int, ...]
    exit_layers: tuple[int, ...]

    @property
    def num_stages(self) -> int:
        return len(self.layer_split)

    @property
    def num_layers(self) -> int:
        return sum(self.layer_split)

    def stage_of_layer(self, layer: int) -> int:
        """Stage (0-based) of decoder layer ``layer`` (1-based)."""
        end = 0
        for stage, count in enumerate(self.layer_split):
            end += count
            if layer <= end:
                return stage
        raise ValueError(f"layer {layer} is outside [1, {self.num_layers}]")

    def stage_of_exit(self, exit_index: int) -> int:
        return self.stage_of_layer(self.exit_layers[exit_index])

    @property
    def last_stage(self) -> int:
        return self.num_stages - 1

    def stage_of_hf_name(self, name: str) -> int:
        """Stage holding the HF parameter ``name``."""
        parts = name.split(".")
        if name.startswith("model.embed_tokens."):
            return 0
        if name.startswith("model.layers."):
            return self.stage_of_layer(int(parts[2]) + 1)
        if name.startswith("model.exits.") or name.startswith("exit_lm_heads."):
            return self.stage_of_exit(int(parts[2] if parts[0] == "model" else parts[1]))
        if name.startswith("model.norm.") or name.startswith("lm_head."):
            return self.last_stage
        raise KeyError(f"unknown parameter name {name!r}")


def make_layout(config: Any, pp: int, layer_split: Sequence[int] | None = None,
                frozen_backbone: bool = False) -> StageLayout:
    """The stage layout: ``layer_split`` if given (checked), else :func:`balanced_layer_split`."""
    split = list(layer_split) if layer_split is not None else balanced_layer_split(config, pp, frozen_backbone)
    if len(split) != pp or any(n < 1 for n in split) or sum(split) != config.num_hidden_layers:
        raise ValueError(f"layer_split {split} must have pp={pp} entries >= 1 summing to {config.num_hidden_layers}")
    return StageLayout(tuple(split), tuple(config.exit_layers or ()))


def hf_name(name: str) -> str:
    """The Hugging Face name of a parallel model parameter (``...pp_block.`` removed)."""
    return name.replace(".pp_block", "")


# ------------------------------------------------------------------------------------------------------------
# Tensor-parallel modules
# ------------------------------------------------------------------------------------------------------------


class RMSNorm(nn.Module):
    """Llama's RMSNorm (normalise in fp32, scale in the input dtype)."""

    def __init__(self, hidden_size: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.eps = eps

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        dtype = hidden_states.dtype
        x = hidden_states.to(torch.float32)
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(dtype)


_ACTIVATIONS = {
    "silu": F.silu,
    "swish": F.silu,
    "gelu": F.gelu,
    "relu": F.relu,
    "gelu_new": lambda x: F.gelu(x, approximate="tanh"),
    "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh"),
}


def _activation(name: str):
    if name in _ACTIVATIONS:
        return _ACTIVATIONS[name]
    from transformers.activations import ACT2FN  # other activations: transformers' own

    return ACT2FN[name]


class RotaryEmbedding:
    """Llama rotary embedding cos/sin for positions ``0..seq_len-1`` (cached); not a module, so it never holds
    parameters or buffers and is unaffected by dtype casts."""

    def __init__(self, config: Any) -> None:
        rope = dict(getattr(config, "rope_parameters", None) or {})
        rope_type = rope.get("rope_type", rope.get("type", "default"))
        if rope_type == "default":
            dim = _head_dim(config)
            theta = float(rope.get("rope_theta", getattr(config, "rope_theta", 10000.0)))
            self.inv_freq = 1.0 / (theta ** (torch.arange(0, dim, 2, dtype=torch.float) / dim))
            self.scaling = 1.0
        else:
            from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

            self.inv_freq, self.scaling = ROPE_INIT_FUNCTIONS[rope_type](config, torch.device("cpu"))
        self._cache: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}

    def __call__(self, seq_len: int, device: torch.device, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        key = (seq_len, str(device), dtype)
        if key not in self._cache:
            positions = torch.arange(seq_len, dtype=torch.float, device=device)
            freqs = positions[:, None] * self.inv_freq.to(device)[None, :]
            emb = torch.cat((freqs, freqs), dim=-1)
            self._cache[key] = ((emb.cos() * self.scaling).to(dtype), (emb.sin() * self.scaling).to(dtype))
        return self._cache[key]


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


class ParallelAttention(nn.Module):
    """Causal self-attention with rotary embeddings and GQA; heads split over the TP group."""

    def __init__(self, config: Any, tp_pg: dist.ProcessGroup) -> None:
        super().__init__()
        tp = tp_pg.size()
        h, self.head_dim = config.hidden_size, _head_dim(config)
        heads, kv_heads = config.num_attention_heads, _kv_heads(config)
        if heads % tp or kv_heads % tp:
            raise ValueError(f"attention heads ({heads}) and KV heads ({kv_heads}) must be divisible by tp={tp}")
        self.groups = heads // kv_heads
        bias = bool(getattr(config, "attention_bias", False))
        self.q_proj = TensorParallelColumnLinear(h, heads * self.head_dim, pg=tp_pg, mode=TP_MODE, bias=bias)
        self.k_proj = TensorParallelColumnLinear(h, kv_heads * self.head_dim, pg=tp_pg, mode=TP_MODE, bias=bias)
        self.v_proj = TensorParallelColumnLinear(h, kv_heads * self.head_dim, pg=tp_pg, mode=TP_MODE, bias=bias)
        self.o_proj = TensorParallelRowLinear(heads * self.head_dim, h, pg=tp_pg, mode=TP_MODE, bias=bias)
        self.rotary = RotaryEmbedding(config)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        batch, seq, _ = hidden_states.shape
        q = self.q_proj(hidden_states).view(batch, seq, -1, self.head_dim).transpose(1, 2)
        k = self.k_proj(hidden_states).view(batch, seq, -1, self.head_dim).transpose(1, 2)
        v = self.v_proj(hidden_states).view(batch, seq, -1, self.head_dim).transpose(1, 2)
        cos, sin = self.rotary(seq, hidden_states.device, q.dtype)
        q = q * cos + _rotate_half(q) * sin
        k = k * cos + _rotate_half(k) * sin
        if self.groups > 1:
            k = k.repeat_interleave(self.groups, dim=1)
            v = v.repeat_interleave(self.groups, dim=1)
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=self.head_dim**-0.5)
        return self.o_proj(out.transpose(1, 2).reshape(batch, seq, -1))


class ParallelMLP(nn.Module):
    """SwiGLU MLP: column-parallel ``gate/up_proj``, row-parallel ``down_proj``."""

    def __init__(self, config: Any, tp_pg: dist.ProcessGroup) -> None:
        super().__init__()
        h, i = config.hidden_size, config.intermediate_size
        bias = bool(getattr(config, "mlp_bias", False))
        self.gate_proj = TensorParallelColumnLinear(h, i, pg=tp_pg, mode=TP_MODE, bias=bias)
        self.up_proj = TensorParallelColumnLinear(h, i, pg=tp_pg, mode=TP_MODE, bias=bias)
        self.down_proj = TensorParallelRowLinear(i, h, pg=tp_pg, mode=TP_MODE, bias=bias)
        self.act_fn = _activation(getattr(config, "hidden_act", "silu"))

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.act_fn(self.gate_proj(hidden_states)) * self.up_proj(hidden_states))


class ParallelDecoderLayer(nn.Module):
    """A Llama decoder layer (pre-norm attention, then pre-norm MLP, both residual)."""

    def __init__(self, config: Any, tp_pg: dist.ProcessGroup) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = ParallelAttention(config, tp_pg)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = ParallelMLP(config, tp_pg)

    def forward(self, hidden_states: torch.Tensor, keep: torch.Tensor | None = None) -> torch.Tensor:
        """``keep`` (layer dropout, training only): per sequence, False to pass ``hidden_states`` through."""
        output = hidden_states + self.self_attn(self.input_layernorm(hidden_states))
        output = output + self.mlp(self.post_attention_layernorm(output))
        if keep is None:
            return output
        return torch.where(keep.view(-1, 1, 1), output, hidden_states)


class ParallelExit(nn.Module):
    """An exit before its projection: optional decoder layer (``block``), RMSNorm (``norm``), residual MLP; and
    its optional confidence gate (``gate``, replicated over TP), read from its output by :meth:`gate_logit`."""

    def __init__(self, config: Any, tp_pg: dist.ProcessGroup) -> None:
        super().__init__()
        if getattr(config, "exit_block", False):
            self.block = ParallelDecoderLayer(config, tp_pg)
        if getattr(config, "exit_norm", True):
            self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        if getattr(config, "exit_mlp", False):
            self.mlp = ParallelMLP(config, tp_pg)
        if getattr(config, "exit_gate", False):
            self.gate = nn.Linear(config.hidden_size, 1)

    def gate_logit(self, exit_hidden_states: torch.Tensor) -> torch.Tensor:
        """The gate's logit per token from this exit's output (input detached, as in the HF model)."""
        return self.gate(exit_hidden_states.detach()).squeeze(-1)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        if hasattr(self, "block"):
            hidden_states = self.block(hidden_states)
        if hasattr(self, "norm"):
            hidden_states = self.norm(hidden_states)
        if hasattr(self, "mlp"):
            hidden_states = hidden_states + self.mlp(hidden_states)
        return hidden_states


class VocabParallelEmbedding(TensorParallelEmbedding):
    """nanotron's vocabulary-parallel embedding over the padded vocabulary; ``padding_idx`` rows get no gradient
    from lookups (as ``nn.Embedding(padding_idx=...)``)."""

    def __init__(self, padded_vocab: int, hidden_size: int, tp_pg: dist.ProcessGroup, padding_idx: int | None):
        super().__init__(padded_vocab, hidden_size, pg=tp_pg, mode=TP_MODE)
        self.pad_id = padding_idx

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        out = super().forward(input_ids)
        if self.pad_id is not None and self.training:
            out = torch.where((input_ids == self.pad_id)[..., None], out.detach(), out)
        return out


class VocabParallelHead(TensorParallelColumnLinear):
    """A vocabulary projection (column-parallel over the padded vocabulary) and its cross-entropy.

    ``head``: exit index, or ``loss.final_index`` for the final head. Exit logits are divided by the loss's
    temperature in training mode. With a ``teacher`` (the final head's distribution) and the loss's
    ``distillation`` weight w > 0, an exit's token losses are ``w * KL(teacher || exit) + (1 - w) * CE``. With
    ``gate_logits`` (the exit's confidence gate) and a teacher, the gate's loss (:func:`gate_token_losses`) is
    added to the returned loss.
    """

    def __init__(self, hidden_size: int, padded_vocab: int, vocab_size: int, tp_pg: dist.ProcessGroup,
                 loss: MultiExitLoss, head: int) -> None:
        super().__init__(hidden_size, padded_vocab, pg=tp_pg, mode=TP_MODE, bias=False)
        self.vocab_size = vocab_size
        self.loss = loss
        self.head = head

    def sharded_logits(self, hidden_states: torch.Tensor) -> torch.Tensor:
        """This TP rank's shard of the logits (padded vocabulary entries not masked)."""
        return super().forward(hidden_states)

    def forward(self, hidden_states: torch.Tensor, labels: torch.Tensor,
                teacher: TeacherTargets | None = None,
                gate_logits: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        sharded_logits = self.sharded_logits(hidden_states)
        if self.loss.captured_logits is not None:
            full = differentiable_all_gather(sharded_logits.transpose(0, -1).contiguous(), group=self.pg)
            self.loss.capture(self.head, full.transpose(0, -1)[..., : self.vocab_size])
        is_exit = self.head != self.loss.final_index
        if is_exit and self.training and self.loss.temperature != 1.0:
            sharded_logits = sharded_logits / self.loss.temperature
        weight = self.loss.distillation
        if is_exit and teacher is not None and weight > 0.0:
            token_losses = distillation_token_losses(sharded_logits, teacher, labels, self.pg, self.vocab_size,
                                                     weight)
        else:
            token_losses = vocab_parallel_token_losses(sharded_logits, labels, self.pg, self.vocab_size)
        loss = self.loss.head_loss(self.head, token_losses)
        if is_exit and gate_logits is not None and teacher is not None:
            exit_top = vocab_parallel_argmax(mask_padded_vocab(sharded_logits.detach(), self.vocab_size,
                                                               dist.get_rank(self.pg)), self.pg)
            loss = loss + self.loss.gate_loss(self.head, gate_token_losses(gate_logits, exit_top, teacher.top, labels))
        if not is_exit and torch.is_grad_enabled() and not loss.requires_grad:
            # Frozen final head (EE-Tuning): nanotron's engine needs a loss that requires grad.
            loss = loss + torch.zeros((), device=loss.device, requires_grad=True)
        return {"loss": loss}


class ExitHeadBlock(PipelineBlock):
    """The ``PipelineBlock`` of an exit head: in training, registers the exit's loss (divided by the micro-batch
    count) in the stage's list of activations requiring backward, so it joins this stage's backward pass."""

    def forward(self, **kwargs: Any) -> dict[str, torch.Tensor | TensorPointer]:
        output = super().forward(**kwargs)
        loss = output["loss"]
        if isinstance(self.pipeline_state, PipelineTrainBatchState) and isinstance(loss, torch.Tensor):
            if loss.requires_grad:
                self.pipeline_state.register_activation_requiring_backward(self.pp_block.loss.exit_backward_loss(loss))
        return output


# ------------------------------------------------------------------------------------------------------------
# The model
# ------------------------------------------------------------------------------------------------------------


class ParallelEarlyExitGPT(nn.Module):
    """EarlyExitGPT split over a nanotron ``ParallelContext``.

    ``forward(input_ids, labels)`` (full micro-batch tensors on every rank; each block uses them only on its own
    stage) returns ``{"loss": ...}`` on the last stage (``TensorPointer`` elsewhere), the final head's scaled loss
    for nanotron's engine; exit losses are registered on their stages. Per-head token-loss sums accumulate in
    :attr:`loss` (:class:`MultiExitLoss`). Weights are uninitialised: load them with :mod:`.weights`.
    """

    def __init__(
        self,
        config: Any,
        parallel_context: ParallelContext,
        layout: StageLayout,
        dtype: torch.dtype = torch.float32,
        device: torch.device | None = None,
    ) -> None:
        super().__init__()
        if layout.num_stages != parallel_context.pipeline_parallel_size:
            raise ValueError(f"layout has {layout.num_stages} stages, pp={parallel_context.pipeline_parallel_size}")
        if tuple(config.exit_layers or ()) != layout.exit_layers or layout.num_layers != config.num_hidden_layers:
            raise ValueError("layout does not match the config's layers and exits")
        self.config = config
        self.parallel_context = parallel_context
        self.layout = layout
        self.pp_rank = dist.get_rank(parallel_context.pp_pg)
        tp_pg = parallel_context.tp_pg
        num_exits = len(layout.exit_layers)
        self.padded_vocab = padded_vocab_size(config.vocab_size, tp_pg.size())
        self.loss = MultiExitLoss(num_exits, getattr(config, "exit_loss_weights", None))
        p2p = make_p2p(parallel_context)
        h = config.hidden_size

        def head_kwargs(head: int) -> dict[str, Any]:
            return dict(hidden_size=h, padded_vocab=self.padded_vocab, vocab_size=config.vocab_size, tp_pg=tp_pg,
                        loss=self.loss, head=head)

        hidden = {"hidden_states"}
        self.model = nn.Module()
        self.model.embed_tokens = PipelineBlock(
            p2p, VocabParallelEmbedding,
            dict(padded_vocab=self.padded_vocab, hidden_size=h, tp_pg=tp_pg,
                 padding_idx=getattr(config, "pad_token_id", None)),
            {"input_ids"}, hidden,
        )
        self.model.layers = nn.ModuleList(
            PipelineBlock(p2p, ParallelDecoderLayer, dict(config=config, tp_pg=tp_pg), {"hidden_states", "keep"},
                          hidden)
            for _ in range(config.num_hidden_layers)
        )
        self.model.norm = PipelineBlock(p2p, RMSNorm, dict(hidden_size=h, eps=config.rms_norm_eps), hidden, hidden)
        self.model.exits = nn.ModuleList(
            PipelineBlock(p2p, ParallelExit, dict(config=config, tp_pg=tp_pg), hidden, hidden)
            for _ in range(num_exits)
        )
        self.lm_head = PipelineBlock(p2p, VocabParallelHead, head_kwargs(num_exits), {"hidden_states", "labels"},
                                     {"loss"})
        self.exit_lm_heads = nn.ModuleList(
            ExitHeadBlock(p2p, VocabParallelHead, head_kwargs(j), {"hidden_states", "labels"}, {"loss"})
            for j in range(num_exits)
        )

        self.model.embed_tokens.build_and_set_rank(0)
        for index, layer in enumerate(self.model.layers, start=1):
            layer.build_and_set_rank(layout.stage_of_layer(index))
        self.model.norm.build_and_set_rank(layout.last_stage)
        self.lm_head.build_and_set_rank(layout.last_stage)
        self.exits_after: dict[int, list[int]] = {}
        for j, layer in enumerate(layout.exit_layers):
            self.model.exits[j].build_and_set_rank(layout.stage_of_exit(j))
            self.exit_lm_heads[j].build_and_set_rank(layout.stage_of_exit(j))
            self.exits_after.setdefault(layer, []).append(j)

        # Hook of the exit schedules (.exit_schedule, train.defer_exit_forward): while set, called as
        # ``exit_interceptor(exit_index, hidden_states, labels)`` in place of each exit it returns True for.
        self.exit_interceptor: Callable[[int, Any, Any], bool] | None = None
        self.to(device=device or parallel_context.device, dtype=dtype)
        self._tie_weights()

    # -- weights ---------------------------------------------------------------------------------------------

    def _tie_weights(self) -> None:
        """Tie the vocabulary matrices (across stages) and the TP-replicated parameters (collective)."""
        ctx, config = self.parallel_context, self.config
        members: list[tuple[str, int]] = []
        if getattr(config, "tie_word_embeddings", False):
            members.append(("model.embed_tokens.pp_block.weight", 0))
        if members or getattr(config, "tie_exit_heads", False):
            members.append(("lm_head.pp_block.weight", self.layout.last_stage))
        if getattr(config, "tie_exit_heads", False):
            members += [(f"exit_lm_heads.{j}.pp_block.weight", self.layout.stage_of_exit(j))
                        for j in range(len(self.layout.exit_layers))]
        if len(members) > 1:
            ranks = {stage: ctx.global_rank(pp_rank=stage) for _, stage in members}
            tie_parameters(
                root_module=self,
                ties=[(name, (ranks[stage],)) for name, stage in members],
                parallel_context=ctx,
                reduce_op=dist.ReduceOp.SUM if len(set(ranks.values())) > 1 else None,
            )
        tie_replicated_parameters(self, ctx, TP_MODE)

    def hf_named_parameters(self) -> dict[str, nn.Parameter]:
        """This rank's parameters under their HF names (a parameter tied on this rank appears under each name)."""
        return {hf_name(name): p for name, p in self.named_parameters(remove_duplicate=False)}

    def is_exit_parameter(self, name: str) -> bool:
        """Whether HF parameter ``name`` belongs to an exit and is trainable under EE-Tuning (exit heads tied to
        the final head belong to the backbone)."""
        if name.startswith("model.exits."):
            return True
        return name.startswith("exit_lm_heads.") and not getattr(self.config, "tie_exit_heads", False)

    def freeze_backbone(self) -> None:
        """EE-Tuning: only exit parameters keep ``requires_grad``."""
        for name, param in self.hf_named_parameters().items():
            param.requires_grad_(self.is_exit_parameter(name))

    # -- forward ---------------------------------------------------------------------------------------------

    def _on_stage(self, block: PipelineBlock, tensor: torch.Tensor | TensorPointer | None
                  ) -> torch.Tensor | TensorPointer | None:
        """``tensor`` where ``block`` runs, a pointer to the block's stage elsewhere (every rank has the batch, so
        inputs never travel between stages; an optional input that is None stays None where the block runs)."""
        if block.rank == self.pp_rank or isinstance(tensor, TensorPointer):
            return tensor
        return TensorPointer(group_rank=block.rank)

    def forward(
        self,
        input_ids: torch.Tensor | TensorPointer,
        labels: torch.Tensor | TensorPointer,
        layer_keep: torch.Tensor | None = None,
    ) -> dict[str, torch.Tensor | TensorPointer]:
        """``layer_keep``: optional ``(batch, num_hidden_layers)`` bool, False where a sequence skips a layer
        (layer dropout, :mod:`.layer_dropout`)."""
        hidden = self.model.embed_tokens(input_ids=self._on_stage(self.model.embed_tokens, input_ids))
        hidden = hidden["hidden_states"]
        for index, layer in enumerate(self.model.layers, start=1):
            keep = self._on_stage(layer, None if layer_keep is None else layer_keep[:, index - 1])
            hidden = layer(hidden_states=hidden, keep=keep)["hidden_states"]
            for j in self.exits_after.get(index, ()):
                if self.exit_interceptor is not None and self.exit_interceptor(j, hidden, labels):
                    continue
                exit_hidden = self.model.exits[j](hidden_states=hidden)["hidden_states"]
                head = self.exit_lm_heads[j]
                head(hidden_states=exit_hidden, labels=self._on_stage(head, labels))
        hidden = self.model.norm(hidden_states=hidden)["hidden_states"]
        return self.lm_head(hidden_states=hidden, labels=self._on_stage(self.lm_head, labels))
