"""How good are a model's exits, and what could early exit buy? Teacher-forced on held-out text, per exit:
top-1 agreement with the final head, and for each threshold of a confidence measure the share of tokens that
would leave at each exit (first confident exit wins, as in generation), their agreement with the final head, and
the compute per token relative to full depth by the cost model below.

Cost model (batch 1, multiply-adds per token): a decoder layer costs its matmuls, an exit its norm/MLP (and gate)
on every token that reaches it plus its vocabulary projection on every token whose decision needs it (all of them
for ``max_prob``; only the tokens that leave for ``gate``), the final head its projection. Deep KV of exited tokens
is recomputed later in a batched pass, which costs little extra time on a CPU bound by reading weights, so it is
not counted: the figure is an upper bound of the speedup (``ideal``), not a measurement.

    python benchmarks/exit_agreement.py MODEL_DIR [--tokens 8192] [--measure max_prob gate]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from eellm_hf.code_corpus import python_source_documents

THRESHOLDS = (0.95, 0.9, 0.8, 0.7, 0.6, 0.5, 0.4, 0.3)


def layer_cost(config) -> float:
    h, i = config.hidden_size, config.intermediate_size
    head_dim = config.head_dim or h // config.num_attention_heads
    attention = 2 * h * config.num_attention_heads * head_dim + 2 * h * config.num_key_value_heads * head_dim
    return attention + 3 * h * i


def held_out_chunks(tokenizer, tokens: int, length: int) -> list[torch.Tensor]:
    ids = []
    for document in python_source_documents(held_out=True):
        ids.extend(tokenizer(document["text"]).input_ids)
        if len(ids) >= tokens:
            break
    ids = torch.tensor(ids[: tokens - tokens % length])
    return list(ids.view(-1, length))


@torch.no_grad()
def collect(model, chunks: list[torch.Tensor]) -> dict[str, torch.Tensor]:
    """Per token: the final head's greedy token, each exit's greedy token, max probability and gate probability."""
    final, tops, probs, gates = [], [], [], []
    for chunk in chunks:
        out = model(input_ids=chunk[None], compute_exits=True)
        final.append(out.logits[0].argmax(-1))
        tops.append(torch.stack([x[0].argmax(-1) for x in out.exit_logits]))
        probs.append(torch.stack([x[0].float().softmax(-1).amax(-1) for x in out.exit_logits]))
        if out.exit_gate_logits is not None:
            gates.append(torch.stack([torch.sigmoid(x[0].float()) for x in out.exit_gate_logits]))
    result = {"final": torch.cat(final), "top": torch.cat(tops, 1), "max_prob": torch.cat(probs, 1)}
    if gates:
        result["gate"] = torch.cat(gates, 1)
    return result


def policy(data: dict, measure: str, threshold: float, config) -> dict:
    """First exit whose confidence reaches the threshold: shares, agreement and the cost-model speedup."""
    layers, unit, head = config.exit_layers, layer_cost(config), config.hidden_size * config.vocab_size
    exit_extra = 3 * config.hidden_size * config.intermediate_size if config.exit_mlp else 0.0
    exit_extra += unit if config.exit_block else 0.0
    tokens = data["final"].numel()
    undecided = torch.ones(tokens, dtype=torch.bool)
    agree = torch.zeros(tokens, dtype=torch.bool)
    cost = torch.zeros(tokens)
    previous, shares = 0, []
    for index, layer in enumerate(layers):
        cost[undecided] += (layer - previous) * unit + exit_extra
        fire = undecided & (data[measure][index] >= threshold)
        cost[fire if measure == "gate" else undecided] += head
        agree |= fire & (data["top"][index] == data["final"])
        shares.append(float(fire.float().mean()))
        undecided &= ~fire
        previous = layer
    cost[undecided] += (config.num_hidden_layers - previous) * unit + head
    agree |= undecided
    full = config.num_hidden_layers * unit + head
    return {"measure": measure, "threshold": threshold, "shares": shares, "agreement": float(agree.float().mean()),
            "ideal_speedup": full / float(cost.mean())}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("model_dir", type=Path)
    parser.add_argument("--tokens", type=int, default=8192)
    parser.add_argument("--length", type=int, default=256)
    parser.add_argument("--measure", nargs="+", default=["max_prob", "gate"])
    parser.add_argument("--json", type=Path, default=None, help="also write the table here")
    args = parser.parse_args()
    torch.set_num_threads(max(torch.get_num_threads(), 1))
    model = AutoModelForCausalLM.from_pretrained(args.model_dir, trust_remote_code=True).eval()
    tokenizer = AutoTokenizer.from_pretrained(args.model_dir)
    data = collect(model, held_out_chunks(tokenizer, args.tokens, args.length))
    config = model.config
    print(f"{data['final'].numel()} held-out tokens; exits after layers {config.exit_layers} of "
          f"{config.num_hidden_layers}")
    for index, layer in enumerate(config.exit_layers):
        agreement = float((data["top"][index] == data["final"]).float().mean())
        print(f"exit {layer}: top-1 agreement with the final head {agreement:.3f}")
    rows = []
    print(f"{'measure':>9} {'threshold':>9} {'shares per exit':>24} {'agreement':>9} {'ideal':>6}")
    for measure in args.measure:
        if measure not in data:
            continue
        for threshold in THRESHOLDS:
            row = policy(data, measure, threshold, config)
            rows.append(row)
            shares = " ".join(f"{share:.3f}" for share in row["shares"])
            print(f"{measure:>9} {threshold:>9} {shares:>24} {row['agreement']:>9.3f} {row['ideal_speedup']:>5.2f}x")
    if args.json is not None:
        args.json.write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
