"""EarlyExitGPT on nanotron's 3D-parallel primitives, built from the Hugging Face model's own modules.

* The decoder layers, norms, exits and rotary embedding are those of :mod:`eellm_hf.modeling` (transformers'
  Llama modules). Each pipeline block builds its module on the meta device and swaps in nanotron's
  tensor-parallel modules where :data:`TP_PLAN` says, per module name (as transformers' ``base_model_tp_plan``,
  or torchtitan on a model it leaves unmodified): column-parallel ``q/k/v_proj`` and ``gate/up_proj``,
  row-parallel ``o_proj`` and ``down_proj`` (sync all-reduce mode), so attention runs on this TP rank's heads
  (GQA groups stay on one rank); vocabulary-parallel embedding and heads (:mod:`.vocab_parallel`). The
  vocabulary is padded to a multiple of ``tp`` internally; the padding entries get ``-inf`` logits (see
  :mod:`.loss`) and are removed on export.
* Pipeline parallelism: every module is a ``PipelineBlock`` placed on a stage (:class:`StageLayout`). An exit's
  modules and its head sit on the stage of its layer, so its vocabulary-sized logits and loss never cross stages;
  exit losses join the stage's backward through nanotron's "activations requiring backward" list.
* Parameter names are Hugging Face ``EarlyExitGPTForCausalLM`` names with ``.pp_block`` inserted after the block
  (:func:`hf_name`), so HF <-> parallel conversion is (un)sharding only (:mod:`.weights`).
* Tied weights are the HF model's (:class:`HFParameters`): nanotron tied parameters, possibly across stages;
  parameters replicated over TP are tied across the TP group so that gradient clipping counts them once.
"""

from __future__ import annotations

import copy
import dataclasses
import fnmatch
import math
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn
from transformers.masking_utils import create_causal_mask
from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

from ..modeling import EarlyExitGPTConfig, EarlyExitGPTForCausalLM
from ..modeling.modeling_early_exit_gpt import EarlyExitGPTDecoderLayer, EarlyExitGPTExit
from .loss import MultiExitLoss
from .nanotron_compat import (
    ParallelContext,
    PipelineBlock,
    TensorParallelColumnLinear,
    TensorParallelRowLinear,
    TensorPointer,
    dist,
    make_p2p,
    tie_parameters,
    tie_replicated_parameters,
)
from .vocab_parallel import TP_MODE, ExitHeadBlock, VocabParallelEmbedding, VocabParallelHead

__all__ = [
    "TP_PLAN",
    "HFParameters",
    "ParallelEarlyExitGPT",
    "StageLayout",
    "as_hf_config",
    "balanced_layer_split",
    "exit_flops_per_token",
    "head_flops_per_token",
    "hf_name",
    "layer_flops_per_token",
    "make_layout",
    "padded_vocab_size",
    "tp_style",
]

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
    """Forward FLOPs per token of one exit: its projection (onto its shortlist's rows with ``exit_vocab``), plus its
    MLP and block when it has them."""
    shortlist = getattr(config, "exit_vocab", None)
    flops = head_flops_per_token(config) * (1.0 if shortlist is None else len(shortlist) / config.vocab_size)
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
# The HF model: its parameters, its TP plan
# ------------------------------------------------------------------------------------------------------------


TP_PLAN: dict[str, str] = {
    "model.embed_tokens": "vocab",
    "*.self_attn.q_proj": "colwise",
    "*.self_attn.k_proj": "colwise",
    "*.self_attn.v_proj": "colwise",
    "*.self_attn.o_proj": "rowwise",
    "*.mlp.gate_proj": "colwise",
    "*.mlp.up_proj": "colwise",
    "*.mlp.down_proj": "rowwise",
    "lm_head": "vocab",
    "exit_lm_heads.*": "vocab",
}
"""How each module of ``EarlyExitGPTForCausalLM`` (by HF module name, ``*`` matching any part) is split over
the TP group; unlisted modules (norms, gates) are replicated. ``colwise``: output features split (weight and bias
on dim 0); ``rowwise``: input features split (weight on dim 1, the bias on TP rank 0 only); ``vocab``: the
vocabulary, padded to a multiple of ``tp``, split on dim 0. Backbone layers and exit blocks and MLPs share the
``self_attn`` / ``mlp`` entries."""


def tp_style(module_name: str) -> str | None:
    """The :data:`TP_PLAN` style of HF module ``module_name`` (``None``: replicated)."""
    return next((style for pattern, style in TP_PLAN.items() if fnmatch.fnmatchcase(module_name, pattern)), None)


def as_hf_config(config: Any) -> EarlyExitGPTConfig:
    """``config`` as an ``EarlyExitGPTConfig`` (an object with its fields, e.g. a namespace, is converted)."""
    return config if isinstance(config, EarlyExitGPTConfig) else EarlyExitGPTConfig(**vars(config))


def hf_meta_model(config: Any) -> EarlyExitGPTForCausalLM:
    """``EarlyExitGPTForCausalLM(config)`` on the meta device (no memory, no initialisation). Building it also
    settles the config's attention implementation, as ``from_pretrained`` would."""
    with torch.device("meta"):
        return EarlyExitGPTForCausalLM(as_hf_config(config))


@dataclasses.dataclass(frozen=True)
class HFParameters:
    """The parameters of ``EarlyExitGPTForCausalLM(config)``, read from that model on the meta device.

    ``shapes``: every state-dict key (tied keys included) and its shape. ``sources``: every parameter name of the
    parallel model (those keys, plus ``exit_lm_heads.{j}.weight`` for each exit, which the parallel model has on
    the exit's stage even when the exits project with the final head) -> the state-dict key whose tensor it is
    (itself when untied): the model's ``_tied_weights_keys`` as its config resolves them, and its
    ``exit_projection``.
    """

    shapes: dict[str, tuple[int, ...]]
    sources: dict[str, str]

    @classmethod
    def of(cls, config: Any) -> HFParameters:
        model = hf_meta_model(config)
        shapes = {name: tuple(tensor.shape) for name, tensor in model.state_dict().items()}
        module_names = {id(module): name for name, module in model.named_modules()}
        names = {name: name for name in shapes}
        for j in range(model.config.num_exits):
            names[f"exit_lm_heads.{j}.weight"] = f"{module_names[id(model.exit_projection(j))]}.weight"
        ties = model.all_tied_weights_keys  # {tied key: the key it reads}
        return cls(shapes, {name: ties.get(key, key) for name, key in names.items()})

    def aliases(self, name: str) -> list[str]:
        """``name``, then the other names of its tensor (its source first)."""
        source = self.sources.get(name, name)
        group = [other for other, other_source in self.sources.items() if other_source == source]
        return [name] + [other for other in dict.fromkeys([source, *group]) if other != name]


class LayerInputs:
    """What ``EarlyExitGPTModel.forward`` computes once for all its layers: the positions, the causal mask of the
    config's attention implementation (``create_causal_mask``) and the rotary cos/sin (``LlamaRotaryEmbedding``).
    A stage computes them once per sequence shape and shares them between its decoder layers and exit blocks. Not a
    module, so casting the model to a low-precision dtype leaves the rotary frequencies in fp32."""

    def __init__(self, config: EarlyExitGPTConfig) -> None:
        self.config = config
        self.rotary_emb = LlamaRotaryEmbedding(config)
        self._key: tuple | None = None
        self._inputs: dict[str, Any] = {}

    def __call__(self, hidden_states: torch.Tensor) -> dict[str, Any]:
        key = (*hidden_states.shape[:2], hidden_states.dtype, hidden_states.device)
        if key != self._key:
            position_ids = torch.arange(hidden_states.shape[1], device=hidden_states.device).unsqueeze(0)
            with torch.no_grad():
                mask = create_causal_mask(config=self.config, inputs_embeds=hidden_states, attention_mask=None,
                                          cache=None, position_ids=position_ids)
                position_embeddings = self.rotary_emb(hidden_states, position_ids)
            self._key = key
            self._inputs = dict(attention_mask=mask, position_ids=position_ids,
                                position_embeddings=position_embeddings)
        return self._inputs


class PipelineDecoderLayer(EarlyExitGPTDecoderLayer):
    """A backbone decoder layer as a pipeline module: its inputs come from the stage's :class:`LayerInputs`;
    ``keep`` (layer dropout, training only): per sequence, False to pass ``hidden_states`` through unchanged."""

    def __init__(self, config: EarlyExitGPTConfig, layer_idx: int, layer_inputs: LayerInputs) -> None:
        super().__init__(config, layer_idx)
        self.layer_inputs = layer_inputs

    def forward(self, hidden_states: torch.Tensor, keep: torch.Tensor | None = None) -> torch.Tensor:
        output = super().forward(hidden_states, **self.layer_inputs(hidden_states))
        if keep is None:
            return output
        return torch.where(keep.view(-1, 1, 1), output, hidden_states)


class PipelineExit(EarlyExitGPTExit):
    """An exit before its projection (``EarlyExitGPTExit``: block, norm, MLP; its gate read by ``gate_logit``) as a
    pipeline module; its block's inputs come from the stage's :class:`LayerInputs`."""

    def __init__(self, config: EarlyExitGPTConfig, exit_index: int, layer_inputs: LayerInputs) -> None:
        super().__init__(config, exit_index)
        self.layer_inputs = layer_inputs

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return self.output_and_gate_input(hidden_states)[0]

    def output_and_gate_input(self, hidden_states: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        return super().output_and_gate_input(hidden_states, **self.layer_inputs(hidden_states))


def _materialize(module: nn.Module, device: torch.device) -> None:
    """Give the parameters still on the meta device uninitialised storage on ``device``."""
    for submodule in module.modules():
        for name, param in list(submodule.named_parameters(recurse=False)):
            if param.is_meta:
                setattr(submodule, name, nn.Parameter(torch.empty_like(param, device=device),
                                                      requires_grad=param.requires_grad))


@dataclasses.dataclass
class TensorParallelBuilder:
    """The ``module_builder`` of the pipeline blocks: ``builder(name, build)`` is the HF module ``build()`` (HF
    module name ``name``), built on the meta device, with nanotron's tensor-parallel modules swapped in where
    :data:`TP_PLAN` says, on ``device``; its weights are uninitialised. The vocabulary-parallel heads compute
    their part of ``loss``."""

    tp_pg: dist.ProcessGroup
    device: torch.device
    loss: MultiExitLoss
    exit_vocab: list[int] | None = None  # the exits' shortlist (config.exit_vocab): their heads project onto it

    def __call__(self, name: str, build: Callable[[], nn.Module]) -> nn.Module:
        with torch.device("meta"):
            module = build()
        for child_name, child in list(module.named_modules()):
            full_name = f"{name}.{child_name}" if child_name else name
            style = tp_style(full_name)
            if style is None:
                continue
            parallel = self._parallel(style, child, full_name)
            if not child_name:
                module = parallel
                break
            parent, _, attribute = child_name.rpartition(".")
            setattr(module.get_submodule(parent), attribute, parallel)
        _materialize(module, self.device)
        return module

    def _parallel(self, style: str, module: nn.Module, name: str) -> nn.Module:
        """nanotron's counterpart of HF module ``module`` (named ``name``) in TP_PLAN ``style``."""
        tp_pg, device, tp = self.tp_pg, self.device, self.tp_pg.size()
        if style == "vocab" and isinstance(module, nn.Embedding):
            return VocabParallelEmbedding(padded_vocab_size(module.num_embeddings, tp), module.embedding_dim, tp_pg,
                                          module.padding_idx, device)
        if not isinstance(module, nn.Linear) or style not in ("vocab", "colwise", "rowwise"):
            raise TypeError(f"{name}: TP_PLAN style {style!r} does not apply to a {type(module).__name__}")
        if style == "vocab":  # a head: the final one, or exit_lm_heads.{j}
            head = self.loss.final_index if name == "lm_head" else int(name.rpartition(".")[2])
            shortlist = None if head == self.loss.final_index else self.exit_vocab
            return VocabParallelHead(module.in_features, padded_vocab_size(module.out_features, tp),
                                     module.out_features, tp_pg, self.loss, head, device, shortlist)
        split = module.out_features if style == "colwise" else module.in_features
        if split % tp:
            raise ValueError(f"{name}: {split} features are not divisible by tp={tp}")
        linear = TensorParallelColumnLinear if style == "colwise" else TensorParallelRowLinear
        return linear(module.in_features, module.out_features, pg=tp_pg, mode=TP_MODE,
                      bias=module.bias is not None, device=device)


# ------------------------------------------------------------------------------------------------------------
# The model
# ------------------------------------------------------------------------------------------------------------


class ParallelEarlyExitGPT(nn.Module):
    """EarlyExitGPT split over a nanotron ``ParallelContext``.

    ``forward(input_ids, labels)`` (full micro-batch tensors on every rank; each block uses them only on its own
    stage) returns ``{"loss": ...}`` on the last stage (``TensorPointer`` elsewhere), the final head's scaled loss
    for nanotron's engine; exit losses are registered on their stages. Per-head token-loss sums accumulate in
    :attr:`loss` (:class:`MultiExitLoss`). ``config``: an ``EarlyExitGPTConfig`` or an object with its fields
    (:attr:`config` is the ``EarlyExitGPTConfig``). Weights are uninitialised: load them with :mod:`.weights`.
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
        config = as_hf_config(config)
        if layout.num_stages != parallel_context.pipeline_parallel_size:
            raise ValueError(f"layout has {layout.num_stages} stages, pp={parallel_context.pipeline_parallel_size}")
        if tuple(config.exit_layers or ()) != layout.exit_layers or layout.num_layers != config.num_hidden_layers:
            raise ValueError("layout does not match the config's layers and exits")
        tp = parallel_context.tp_pg.size()
        heads, kv_heads = config.num_attention_heads, _kv_heads(config)
        if heads % tp or kv_heads % tp:
            raise ValueError(f"attention heads ({heads}) and KV heads ({kv_heads}) must be divisible by tp={tp}")
        self.config = config
        self.hf_parameters = HFParameters.of(config)
        self.parallel_context = parallel_context
        self.layout = layout
        self.pp_rank = dist.get_rank(parallel_context.pp_pg)
        self.padded_vocab = padded_vocab_size(config.vocab_size, tp)
        self.loss = MultiExitLoss(config.num_exits, config.exit_loss_weights)
        device = device or parallel_context.device
        self._make_blocks(make_p2p(parallel_context), LayerInputs(config), device)
        self._place_blocks()
        # Hook of the exit schedules (.exit_schedule, train.defer_exit_forward): while set, called as
        # ``exit_interceptor(exit_index, hidden_states, labels)`` in place of each exit it returns True for.
        self.exit_interceptor: Callable[[int, Any, Any], bool] | None = None
        self.to(device=device, dtype=dtype)
        self._tie_weights()

    def _make_blocks(self, p2p: Any, layer_inputs: LayerInputs, device: torch.device) -> None:
        """One ``PipelineBlock`` per module of ``EarlyExitGPTForCausalLM``, named as there, built from the HF
        modules by :class:`TensorParallelBuilder` (on their stages only, by :meth:`_place_blocks`). The embedding,
        final norm and heads are the HF model's own (on the meta device); decoder layers and exits are its classes
        with the pipeline's inputs (:class:`PipelineDecoderLayer`, :class:`PipelineExit`); every exit has a head
        on its stage, a copy of the HF model's ``exit_projection`` (the final head's with ``tie_exit_heads``)."""
        config, hf_model = self.config, hf_meta_model(self.config)
        builder = TensorParallelBuilder(self.parallel_context.tp_pg, device, self.loss, config.exit_vocab)
        hidden, labelled = {"hidden_states"}, {"hidden_states", "labels"}

        def block(name: str, build: Callable[[], nn.Module], inputs: set[str], outputs: set[str] = hidden,
                  block_class: type[PipelineBlock] = PipelineBlock) -> PipelineBlock:
            return block_class(p2p, builder, dict(name=name, build=build), inputs, outputs)

        def hf_module(module: nn.Module) -> Callable[[], nn.Module]:
            return lambda: copy.deepcopy(module)

        self.model = nn.Module()
        self.model.embed_tokens = block("model.embed_tokens", hf_module(hf_model.model.embed_tokens), {"input_ids"})
        self.model.layers = nn.ModuleList(
            block(f"model.layers.{index}", lambda index=index: PipelineDecoderLayer(config, index, layer_inputs),
                  {"hidden_states", "keep"})
            for index in range(config.num_hidden_layers))
        self.model.norm = block("model.norm", hf_module(hf_model.model.norm), hidden)
        self.model.exits = nn.ModuleList(
            block(f"model.exits.{j}", lambda j=j: PipelineExit(config, j, layer_inputs), hidden)
            for j in range(config.num_exits))
        self.lm_head = block("lm_head", hf_module(hf_model.lm_head), labelled, {"loss"})
        self.exit_lm_heads = nn.ModuleList(
            block(f"exit_lm_heads.{j}", hf_module(hf_model.exit_projection(j)), labelled, {"loss"}, ExitHeadBlock)
            for j in range(config.num_exits))

    def _place_blocks(self) -> None:
        layout = self.layout
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

    # -- weights ---------------------------------------------------------------------------------------------

    def _tie_weights(self) -> None:
        """Tie the parameters that are one tensor in the HF model (:attr:`HFParameters.sources`; the vocabulary
        matrices, possibly across stages), then the TP-replicated parameters (collective)."""
        ctx = self.parallel_context
        groups: dict[str, list[str]] = {}
        for name, source in self.hf_parameters.sources.items():
            groups.setdefault(source, []).append(name)
        blocks = {name: block for name, block in self.named_modules() if isinstance(block, PipelineBlock)}
        for names in groups.values():
            if len(names) < 2:
                continue
            ties = []
            for name in names:
                prefix = next(prefix for prefix in blocks if name.startswith(f"{prefix}."))
                stage_rank = ctx.global_rank(pp_rank=blocks[prefix].rank)
                ties.append((f"{prefix}.pp_block{name[len(prefix):]}", (stage_rank,)))
            tie_parameters(root_module=self, ties=ties, parallel_context=ctx,
                           reduce_op=dist.ReduceOp.SUM if len({r for _, r in ties}) > 1 else None)
        tie_replicated_parameters(self, ctx, TP_MODE)

    def hf_named_parameters(self) -> dict[str, nn.Parameter]:
        """This rank's parameters under their HF names (a parameter tied on this rank appears under each name)."""
        return {hf_name(name): p for name, p in self.named_parameters(remove_duplicate=False)}

    def is_exit_parameter(self, name: str) -> bool:
        """Whether HF parameter ``name`` belongs to an exit and is trainable under EE-Tuning (exit heads tied to
        the final head belong to the backbone)."""
        if name.startswith("model.exits."):
            return True
        return name.startswith("exit_lm_heads.") and not self.config.tie_exit_heads

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
