"""`eellm-generate`: generate text with an early-exit model from the command line.

    eellm-generate MODEL_DIR --prompt TEXT [--prompt TEXT ...] --max-new-tokens N [--early-exit-threshold T] [--json]
        [--early-exit-mode speculative [--num-speculative-tokens K]]

All prompts are decoded together as one left-padded batch; each sequence exits on its own, and greedy outputs
are those of each prompt alone. With `--json`, one JSON object per prompt is printed: `prompt`, `text` (the
continuation), `token_ids` (the generated tokens, up to and including an end-of-sequence token) and
`exit_layers` (the layer that produced each of them; `num_hidden_layers` for the final head). Without `--json`,
the prompt and continuation are printed, then a summary of where tokens left the model.

    torchrun --nproc-per-node P -m eellm_hf.generate_cli MODEL_DIR --pp P --prompt TEXT ... [--layer-split N ...]

decodes with the model split over P pipeline ranks (`eellm_hf.pipeline_decoding`): rank 0 prints exactly what
the single-process command prints; each rank holds and reads only its own layers and exits.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from .modeling.early_exit_settings import EXIT_CONFIDENCE_MEASURES, EarlyExitSettings, mean_exit_layer
from .modeling.loading import DTYPES, load_model, load_tokenizer


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="eellm-generate", description="Generate text with an early-exit model (token-wise early exit)."
    )
    parser.add_argument("model_dir", type=Path, help="a saved EarlyExitGPT folder (weights and tokenizer)")
    parser.add_argument("--prompt", action="append", required=True, help="a prompt; repeat for a batch")
    parser.add_argument("--max-new-tokens", type=int, required=True)
    parser.add_argument("--early-exit-threshold", type=float, default=None,
                        help="confidence an exit needs to produce a token, in [0, 1] (default: full depth)")
    parser.add_argument("--exit-confidence", choices=EXIT_CONFIDENCE_MEASURES, default=None)
    parser.add_argument("--exit-gate-threshold", type=float, default=None,
                        help="gate_max_prob: the gate probability that lets an exit compute its distribution")
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
    parser.add_argument("--device", default="cpu",
                        help="single process only; with --pp each rank uses cpu (gloo) or cuda:LOCAL_RANK (nccl)")
    parser.add_argument("--trust-remote-code", action="store_true",
                        help="load the model with its shipped code instead of the installed eellm_hf")
    parser.add_argument("--json", action="store_true", help="print one JSON object per prompt")
    parser.add_argument("--pp", type=int, default=None,
                        help="pipeline-parallel decoding over PP processes (run under torchrun --nproc-per-node PP)")
    parser.add_argument("--layer-split", type=int, nargs="+", default=None,
                        help="with --pp: decoder layers per stage (default: balanced by cost, exits included)")
    parser.add_argument("--timeout-s", type=float, default=600.0,
                        help="with --pp: longest wait for another rank before failing (default 600)")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not args.model_dir.is_dir():
        parser.error(f"model folder {args.model_dir} does not exist" if not args.model_dir.exists()
                     else f"{args.model_dir} is not a folder (give the folder a model was saved to)")
    if args.max_new_tokens < 1:
        parser.error(f"--max-new-tokens must be >= 1, got {args.max_new_tokens}")
    if args.pp is not None:
        return _main_pipeline(parser, args)
    model = load_model(args.model_dir, args.dtype, args.device, trust_remote_code=args.trust_remote_code)
    _generate_and_print(parser, args, model, model.generation_config, args.device)
    return 0


def _generate_and_print(parser: argparse.ArgumentParser, args: argparse.Namespace, model: Any,
                        generation_config: Any, device: Any) -> None:
    """Tokenize the prompts, check their lengths, generate with ``model`` (one process or a pipeline's first
    rank) and print what ``--json`` or plain output asks for."""
    tokenizer = load_tokenizer(args.model_dir)
    generate_kwargs = _generate_kwargs(parser, args, tokenizer, model.config)
    encoded = tokenizer(args.prompt, return_tensors="pt", padding=True).to(device)
    _check_prompt_lengths(parser, args, encoded["attention_mask"].sum(dim=1).tolist(),
                          model.config.max_position_embeddings)
    torch.manual_seed(args.seed)
    output = model.generate(**encoded, **generate_kwargs)
    _print_outputs(args, tokenizer, output, encoded["input_ids"].shape[1], model.config.num_hidden_layers,
                   generation_config.eos_token_id)


def _main_pipeline(parser: argparse.ArgumentParser, args: argparse.Namespace) -> int:
    """`--pp P`: this process is one of P pipeline ranks (torchrun); rank 0 prints, the others serve its steps."""
    from .pipeline_decoding import PipelineEarlyExitGPT
    from .trainer.rank_exit import fail_fast

    with fail_fast():  # an error on any rank (a dead peer included) ends this rank at once, with the reason
        pipeline = PipelineEarlyExitGPT.from_pretrained(
            args.model_dir, pp=args.pp, layer_split=args.layer_split, dtype=DTYPES[args.dtype],
            timeout_s=args.timeout_s,
        )
        if not pipeline.is_first:
            pipeline.serve()
            return 0
        _generate_and_print(parser, args, pipeline, pipeline.model.generation_config, pipeline.device)
        pipeline.close()
    return 0


def _generate_kwargs(parser: argparse.ArgumentParser, args: argparse.Namespace, tokenizer: Any,
                     model_config: Any) -> dict[str, Any]:
    """`generate`'s keyword arguments; the early-exit ones checked up front against the model
    (`EarlyExitSettings.resolve`), so that a bad value is a usage error naming it."""
    generate_kwargs = {"max_new_tokens": args.max_new_tokens, "do_sample": args.do_sample,
                       "pad_token_id": tokenizer.pad_token_id, "return_dict_in_generate": True}
    if args.early_exit_threshold is not None:
        generate_kwargs["early_exit_threshold"] = args.early_exit_threshold
    for name in ("exit_confidence", "exit_gate_threshold", "active_exits", "max_recompute_tokens", "early_exit_mode",
                 "num_speculative_tokens", "temperature", "top_k", "top_p"):
        if getattr(args, name) is not None:
            generate_kwargs[name] = getattr(args, name)
    if args.stop_draft_when_unsure:
        generate_kwargs["stop_draft_when_unsure"] = True
    try:
        EarlyExitSettings.resolve(model_config, generate_kwargs)
    except ValueError as exc:
        parser.error(str(exc))
    return generate_kwargs


def _print_outputs(args: argparse.Namespace, tokenizer: Any, output: Any, prompt_length: int, num_layers: int,
                   eos_token_id: int | list[int] | None) -> None:
    exit_layers = getattr(output, "exit_layers", None)
    eos_ids = set(_as_list(eos_token_id))
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
        mean = mean_exit_layer(counts)
        per_exit = ", ".join(f"layer {layer}: {count}" for layer, count in sorted(counts.items()))
        print(f"-- {total} tokens, mean exit layer {mean:.2f} of {num_layers} ({per_exit})", file=sys.stderr)
        stats = getattr(output, "early_exit_stats", None)
        if getattr(stats, "draft_tokens", None) is not None:
            print(f"-- speculative: {stats.accepted_draft_tokens} of {stats.draft_tokens} drafted tokens accepted, "
                  f"{stats.tokens_per_round:.2f} tokens per round", file=sys.stderr)


def _check_prompt_lengths(parser: argparse.ArgumentParser, args: argparse.Namespace, lengths: list[int],
                          max_positions: int) -> None:
    """Every prompt must encode to at least one token, and it plus the new tokens must fit the model's
    positions (beyond ``max_position_embeddings`` the model was never trained)."""
    for index, (prompt, length) in enumerate(zip(args.prompt, lengths), start=1):
        if length == 0:
            parser.error(f"prompt {index} ({prompt!r}) is empty: it encodes to no tokens; give some text")
        if length + args.max_new_tokens > max_positions:
            parser.error(f"prompt {index} is {length} tokens; with --max-new-tokens {args.max_new_tokens} that is "
                         f"{length + args.max_new_tokens} positions, more than the model's max_position_embeddings="
                         f"{max_positions}: shorten the prompt or lower --max-new-tokens")


def _as_list(value: int | list[int] | None) -> list[int]:
    if value is None:
        return []
    return [value] if isinstance(value, int) else list(value)


if __name__ == "__main__":
    sys.exit(main())
