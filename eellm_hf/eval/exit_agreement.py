"""How good are a model's exits, and what could early exit buy? Teacher-forced on held-out text, per exit:
top-1 agreement with the final head, and for each threshold of a confidence measure the share of tokens that
would leave at each exit (first confident exit wins, as in generation), their agreement with the final head, and
the compute per token relative to full depth by the cost model below.

Cost model (batch 1, multiply-adds per token): a decoder layer costs its matmuls, an exit its block and MLP on
every token that reaches it (with ``gate`` and ``exit_gate_before_mlp``, the MLP only on the tokens that leave)
plus its vocabulary projection on every token whose decision needs it (all of them for ``max_prob``; only the
tokens that leave for ``gate``; with ``exit_vocab``, onto its shortlist only), the final head its projection;
norms and gates are not counted (a gate is one dot product). Deep KV of exited tokens is recomputed later in a
batched pass, which costs little extra time on a CPU bound by reading weights, so it is not counted: the figure
is an upper bound of the speedup (``ideal``), not a measurement.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from ..code_corpus import python_source_documents
from ..modeling.early_exit_settings import GATED_MEASURES

THRESHOLDS = (0.95, 0.9, 0.8, 0.7, 0.6, 0.5, 0.4, 0.3)


def layer_cost(config: Any) -> float:
    """Multiply-adds per token of one decoder layer's matmuls."""
    h, i = config.hidden_size, config.intermediate_size
    head_dim = config.head_dim or h // config.num_attention_heads
    attention = 2 * h * config.num_attention_heads * head_dim + 2 * h * config.num_key_value_heads * head_dim
    return attention + 3 * h * i


def held_out_chunks(tokenizer: Any, tokens: int, length: int) -> list[torch.Tensor]:
    """``tokens`` tokens of the held-out standard-library source, as rows of ``length`` (never trained on)."""
    if tokens < length:
        raise ValueError(f"tokens ({tokens}) must be at least one row of length {length}")
    ids: list[int] = []
    for document in python_source_documents(held_out=True):
        ids.extend(tokenizer(document["text"]).input_ids)
        if len(ids) >= tokens:
            break
    ids_tensor = torch.tensor(ids[: min(tokens, len(ids)) // length * length])
    return list(ids_tensor.view(-1, length))


@torch.no_grad()
def collect(model: Any, chunks: Sequence[torch.Tensor]) -> dict[str, torch.Tensor]:
    """Per token: the final head's greedy token, each exit's greedy token, max probability and gate probability."""
    final, tops, probs, gates = [], [], [], []
    for chunk in chunks:
        out = model(input_ids=chunk[None].to(model.device), compute_exits=True)
        final.append(out.logits[0].argmax(-1).cpu())
        tops.append(torch.stack([x[0].argmax(-1) for x in out.exit_logits]).cpu())
        probs.append(torch.stack([x[0].float().softmax(-1).amax(-1) for x in out.exit_logits]).cpu())
        if out.exit_gate_logits is not None:
            gates.append(torch.stack([torch.sigmoid(x[0].float()) for x in out.exit_gate_logits]).cpu())
    result = {"final": torch.cat(final), "top": torch.cat(tops, 1), "max_prob": torch.cat(probs, 1)}
    if gates:
        result["gate"] = torch.cat(gates, 1)
    return result


def exit_agreements(data: dict[str, torch.Tensor]) -> list[float]:
    """Per exit: the share of tokens whose greedy token equals the final head's."""
    return [float((top == data["final"]).float().mean()) for top in data["top"]]


def policy(data: dict[str, torch.Tensor], measure: str, threshold: float, config: Any,
           gate_threshold: float | None = None) -> dict[str, Any]:
    """First exit whose confidence reaches the threshold: shares, agreement and the cost-model speedup. With
    ``gate_max_prob`` an exit's gate screens at ``gate_threshold`` and its largest probability decides."""
    layers, unit, head = config.exit_layers, layer_cost(config), config.hidden_size * config.vocab_size
    shortlist = getattr(config, "exit_vocab", None)
    exit_head = head if shortlist is None else config.hidden_size * len(shortlist)
    mlp = 3 * config.hidden_size * config.intermediate_size if config.exit_mlp else 0.0
    block = unit if config.exit_block else 0.0
    gated = measure in GATED_MEASURES
    gate_first = gated and getattr(config, "exit_gate_before_mlp", False)
    tokens = data["final"].numel()
    undecided = torch.ones(tokens, dtype=torch.bool)
    agree = torch.zeros(tokens, dtype=torch.bool)
    cost = torch.zeros(tokens)
    previous, shares = 0, []
    for index, layer in enumerate(layers):
        cost[undecided] += (layer - previous) * unit + block + (0.0 if gate_first else mlp)
        if measure == "gate_max_prob":
            screened = undecided & (data["gate"][index] >= gate_threshold)
            fire = screened & (data["max_prob"][index] >= threshold)
        else:
            fire = undecided & (data[measure][index] >= threshold)
            screened = fire if gated else undecided
        if gate_first:
            cost[screened] += mlp
        cost[screened] += exit_head  # the projection runs for every token whose decision needs it
        agree |= fire & (data["top"][index] == data["final"])
        shares.append(float(fire.float().mean()))
        undecided &= ~fire
        previous = layer
    cost[undecided] += (config.num_hidden_layers - previous) * unit + head
    agree |= undecided
    full = config.num_hidden_layers * unit + head
    row = {"measure": measure, "threshold": threshold, "shares": shares, "agreement": float(agree.float().mean()),
           "ideal_speedup": full / float(cost.mean())}
    if measure == "gate_max_prob":
        row["gate_threshold"] = gate_threshold
    return row


def measure_exits(model: Any, tokenizer: Any, tokens: int = 8192, length: int = 256,
                  measures: Sequence[str] = ("max_prob", "gate"),
                  thresholds: Sequence[float] = THRESHOLDS, gate_threshold: float = 0.7) -> dict[str, Any]:
    """Held-out agreement per exit and, per measure the model has and threshold, :func:`policy`'s row
    (``gate_max_prob`` screening at ``gate_threshold``)."""
    data = collect(model, held_out_chunks(tokenizer, tokens, length))
    available = [m for m in measures if (m == "gate_max_prob" and "gate" in data) or m in data]
    rows = [policy(data, measure, threshold, model.config, gate_threshold)
            for measure in available for threshold in thresholds]
    return {"tokens": data["final"].numel(), "exit_layers": list(model.config.exit_layers),
            "agreement": exit_agreements(data), "policies": rows}


__all__ = ["THRESHOLDS", "collect", "exit_agreements", "held_out_chunks", "layer_cost", "measure_exits", "policy"]
