"""`eellm-generate`: generate text with an early-exit model from the command line.

    eellm-generate MODEL_DIR --prompt TEXT [--prompt TEXT ...] --max-new-tokens N [--early-exit-threshold T] [--json]
        [--early-exit-mode speculative [--num-speculative-tokens K]]

All prompts are decoded together as one left-padded batch; each sequence exits on its own, and greedy outputs
are those of each prompt alone. With `--json`, one JSON object per prompt is printed: `prompt`, `text` (the
continuation), `token_ids` (the generated tokens, up to and including an end-of-sequence token) and
`exit_layers` (the layer that produced each of them; `num_hidden_layers` for the final head). Without `--json`,
the prompt and continuation are printed, then a summary of where tokens left the model.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path

import torch

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16, "float64": torch.float64}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="eellm-generate", description="Generate text with an early-exit model (token-wise early exit)."
    )
    parser.add_argument("model_dir", type=Path, help="a saved EarlyExitGPT folder (weights and tokenizer)")
    parser.add_argument("--prompt", action="append", required=True, help="a prompt; repeat for a batch")
    parser.add_argument("--max-new-tokens", type=int, required=True)
    parser.add_argument("--early-exit-threshold", type=float, default=None,
                        help="confidence an exit needs to produce a token, in [0, 1] (default: full depth)")
    parser.add_argument("--exit-confidence", choices=("max_prob", "top2_margin"), default=None)
    parser.add_argument("--active-exits", type=int, nargs="+", default=None,
                        help="the exit layers allowed to fire (default: all)")
    parser.add_argument("--max-recompute-tokens", type=int, default=None)
    parser.add_argument("--early-exit-mode", choices=("lossy", "speculative"), default=None,
                        help="lossy: tokens leave at confident exits; speculative: exits draft, the full model "
                             "verifies (output identical to full depth)")
    parser.add_argument("--num-speculative-tokens", type=int, default=None,
                        help="speculative mode: most tokens drafted per round (default 4)")
    parser.add_argument("--stop-draft-when-unsure", action="store_true",
                        help="speculative mode: end the draft at a token no exit is confident about (by default "
                             "it is drafted from the deepest exit)")
    parser.add_argument("--do-sample", action="store_true", help="sample instead of greedy decoding")
    parser.add_argument("--temperature", type=float, default=None)
    parser.add_argument("--top-k", type=int, default=None)
    parser.add_argument("--top-p", type=float, default=None)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="float32")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--trust-remote-code", action="store_true",
                        help="load the model with its shipped code instead of the installed eellm_hf")
    parser.add_argument("--json", action="store_true", help="print one JSON object per prompt")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    import eellm_hf  # noqa: F401  (registers the model with the Auto classes)

    torch.manual_seed(args.seed)
    tokenizer = AutoTokenizer.from_pretrained(args.model_dir)
    tokenizer.padding_side = "left"
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    model = AutoModelForCausalLM.from_pretrained(
        args.model_dir, dtype=DTYPES[args.dtype], trust_remote_code=args.trust_remote_code
    ).to(args.device).eval()

    generate_kwargs = {"max_new_tokens": args.max_new_tokens, "do_sample": args.do_sample,
                       "pad_token_id": tokenizer.pad_token_id, "return_dict_in_generate": True}
    if args.early_exit_threshold is not None:
        generate_kwargs["early_exit_threshold"] = args.early_exit_threshold
    for name in ("exit_confidence", "active_exits", "max_recompute_tokens", "early_exit_mode",
                 "num_speculative_tokens", "temperature", "top_k", "top_p"):
        if getattr(args, name) is not None:
            generate_kwargs[name] = getattr(args, name)
    if args.stop_draft_when_unsure:
        generate_kwargs["stop_draft_when_unsure"] = True

    encoded = tokenizer(args.prompt, return_tensors="pt", padding=True).to(args.device)
    output = model.generate(**encoded, **generate_kwargs)
    prompt_length = encoded["input_ids"].shape[1]
    num_layers = model.config.num_hidden_layers
    exit_layers = getattr(output, "exit_layers", None)
    eos_ids = set(_as_list(model.generation_config.eos_token_id))

    counts: dict[int, int] = {}
    for row, prompt in enumerate(args.prompt):
        token_ids = output.sequences[row, prompt_length:].tolist()
        layers = exit_layers[row].tolist() if exit_layers is not None else [num_layers] * len(token_ids)
        for index, token in enumerate(token_ids):
            if token in eos_ids:
                token_ids, layers = token_ids[: index + 1], layers[: index + 1]
                break
        for layer in layers:
            counts[layer] = counts.get(layer, 0) + 1
        text = tokenizer.decode(token_ids, skip_special_tokens=True)
        if args.json:
            print(json.dumps({"prompt": prompt, "text": text, "token_ids": token_ids, "exit_layers": layers}))
        else:
            print(f"{prompt}{text}")
    if not args.json and counts:
        total = sum(counts.values())
        mean = sum(layer * count for layer, count in counts.items()) / total
        per_exit = ", ".join(f"layer {layer}: {count}" for layer, count in sorted(counts.items()))
        print(f"-- {total} tokens, mean exit layer {mean:.2f} of {num_layers} ({per_exit})", file=sys.stderr)
        stats = getattr(output, "early_exit_stats", None)
        if getattr(stats, "draft_tokens", None) is not None:
            print(f"-- speculative: {stats.accepted_draft_tokens} of {stats.draft_tokens} drafted tokens accepted, "
                  f"{stats.tokens_per_round:.2f} tokens per round", file=sys.stderr)
    return 0


def _as_list(value: int | list[int] | None) -> list[int]:
    if value is None:
        return []
    return [value] if isinstance(value, int) else list(value)


if __name__ == "__main__":
    sys.exit(main())
