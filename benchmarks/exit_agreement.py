"""How good are a model's exits, and what could early exit buy? Teacher-forced on held-out standard-library
source: per exit, top-1 agreement with the final head; per confidence measure and threshold, the share of tokens
leaving at each exit, their agreement with the final head and the cost model's ideal speedup (see
``eellm_hf.eval.exit_agreement`` for the cost model).

    python benchmarks/exit_agreement.py MODEL_DIR [--tokens 8192] [--measure max_prob gate gate_max_prob]
        [--gate-threshold 0.7]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from eellm_hf.eval.exit_agreement import measure_exits


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("model_dir", type=Path)
    parser.add_argument("--tokens", type=int, default=8192)
    parser.add_argument("--length", type=int, default=256)
    parser.add_argument("--measure", nargs="+", default=["max_prob", "gate"],
                        choices=["max_prob", "gate", "gate_max_prob"])
    parser.add_argument("--gate-threshold", type=float, default=0.7,
                        help="the gate probability gate_max_prob screens with")
    parser.add_argument("--json", type=Path, default=None, help="also write the table here")
    args = parser.parse_args()
    torch.set_num_threads(max(torch.get_num_threads(), 1))
    model = AutoModelForCausalLM.from_pretrained(args.model_dir, trust_remote_code=True).eval()
    tokenizer = AutoTokenizer.from_pretrained(args.model_dir)
    result = measure_exits(model, tokenizer, args.tokens, args.length, args.measure,
                           gate_threshold=args.gate_threshold)
    print(f"{result['tokens']} held-out tokens; exits after layers {result['exit_layers']} of "
          f"{model.config.num_hidden_layers}")
    for layer, agreement in zip(result["exit_layers"], result["agreement"]):
        print(f"exit {layer}: top-1 agreement with the final head {agreement:.3f}")
    print(f"{'measure':>9} {'threshold':>9} {'shares per exit':>24} {'agreement':>9} {'ideal':>6}")
    for row in result["policies"]:
        shares = " ".join(f"{share:.3f}" for share in row["shares"])
        print(f"{row['measure']:>9} {row['threshold']:>9} {shares:>24} {row['agreement']:>9.3f} "
              f"{row['ideal_speedup']:>5.2f}x")
    if args.json is not None:
        args.json.write_text(json.dumps(result["policies"], indent=1))


if __name__ == "__main__":
    main()
