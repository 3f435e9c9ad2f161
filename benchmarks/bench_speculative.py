"""Benchmark lossless speculative early exit against full depth, lossy early exit and transformers' LayerSkip-style
`assistant_early_exit`, side by side in one run.

Usage::

    python benchmarks/bench_speculative.py --model DIR        # any EarlyExitGPT folder with its tokenizer
    python benchmarks/bench_speculative.py --model DIR --thresholds 0.9 0.5 0.2 --k 2 4 --batch-sizes 1 8

For every setting it prints tokens/s, the speedup against full depth, whether the greedy output is identical to
full depth's, and (speculative) the acceptance rate of drafted tokens, tokens per round and mean draft layer:

* `full`: `model.generate` at full depth (transformers' own loop);
* `lossy T`: early exit at threshold T (`early_exit_mode="lossy"`, the default);
* `spec T kK`: `early_exit_mode="speculative"`, threshold T, at most K drafted tokens per round;
* `hf E kK` (batch 1 only: transformers refuses batches): the same weights converted to `LlamaForCausalLM`
  (`eellm_hf.modeling.convert.early_exit_to_llama`), `generate(assistant_early_exit=E, num_assistant_tokens=K)`:
  drafts from layer E through the final norm and head (LayerSkip), verified by the whole model.

Timing: each setting is timed right next to full depth on the same prompts, in A B B A order (full depth and the
setting alternating as A), for `--repeats` rounds; the speedup is the median over rounds of full-depth time over
the setting's time (process CPU time, single-threaded, unless `--wall-clock`: the machines this runs on are shared
and CPU time is what load disturbs least); tokens/s are the best wall-clock run's. Every run generates exactly
`--new-tokens` tokens per prompt (the end-of-sequence token is switched off in the generation config, so that no
logits processor is needed), greedy, single-threaded by default (`--threads`), on held-out
KJV verses as prompts (never trained on), so every ratio is per generated token. Batch 1 decodes the prompts one
after the other.
"""

from __future__ import annotations

import argparse
import random
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from eellm_hf import corpus
from eellm_hf.modeling.early_exit_settings import mean_exit_layer


def prompts_from_held_out(count: int, words: int = 8) -> list[str]:
    verses = [verse["text"] for verse in corpus.held_out_verses()]
    return [" ".join(text.split()[:words]) for text in random.Random(1611).sample(verses, count)]


WALL_CLOCK = False  # speedups from wall-clock time instead of process CPU time (`--wall-clock`)


def paired_speedup(full: Callable[[], Any], own: Callable[[], Any], repeats: int) -> tuple[float, float]:
    """Median over rounds of (full-depth time / own time) in A B B A order, and own's best wall time."""
    ratios, best = [], float("inf")
    for round_index in range(repeats):
        order = (full, own, own, full) if round_index % 2 == 0 else (own, full, full, own)
        times: dict[Callable[[], Any], float] = {full: 0.0, own: 0.0}
        for run in order:
            started, started_cpu = time.perf_counter(), time.process_time()
            run()
            wall = time.perf_counter() - started
            times[run] += wall if WALL_CLOCK else time.process_time() - started_cpu
            if run is own:
                best = min(best, wall)
        ratios.append(times[full] / times[own])
    return statistics.median(ratios), best


def _seconds(run: Callable[[], Any]) -> float:
    started = time.perf_counter()
    run()
    return time.perf_counter() - started


class Bench:
    """The settings of one batch size, each a callable returning the generated sequences of every prompt."""

    def __init__(self, model: Any, llama: Any, tokenizer: Any, prompts: list[str], batch_size: int,
                 new_tokens: int):
        self.model, self.llama = model, llama
        groups = [[p] for p in prompts] if batch_size == 1 else [prompts[i:i + batch_size]
                                                                 for i in range(0, len(prompts), batch_size)]
        self.inputs = [tokenizer(group, return_tensors="pt", padding=True) for group in groups]
        self.common = dict(max_new_tokens=new_tokens, do_sample=False, pad_token_id=tokenizer.pad_token_id)
        self.generated = sum(encoded["input_ids"].shape[0] for encoded in self.inputs) * new_tokens

    def run(self, model: Any, **settings: Any) -> list[Any]:
        with torch.no_grad():
            return [model.generate(**encoded, **self.common, **settings) for encoded in self.inputs]

    def stats(self, **settings: Any) -> list[Any]:
        with torch.no_grad():
            return [self.model.generate(**encoded, **self.common, **settings, return_dict_in_generate=True)
                    .early_exit_stats for encoded in self.inputs]


def bench(model: Any, llama: Any, tokenizer: Any, args: argparse.Namespace) -> list[dict[str, Any]]:
    prompts = prompts_from_held_out(args.prompts)
    rows = []
    for batch_size in args.batch_sizes:
        bench = Bench(model, llama, tokenizer, prompts, batch_size, args.new_tokens)
        reference = bench.run(model)

        def full(bench: Bench = bench) -> list[Any]:
            return bench.run(bench.model)

        settings: list[tuple[str, Any, dict[str, Any]]] = [
            (f"lossy {t:g}", model, {"early_exit_threshold": t}) for t in args.thresholds]
        settings += [(f"spec {t:g} k{k}", model, {"early_exit_threshold": t, "early_exit_mode": "speculative",
                                                   "num_speculative_tokens": k})
                     for t in args.thresholds for k in args.k]
        if batch_size == 1:
            settings += [(f"hf {e} k{k}", llama, {"assistant_early_exit": e, "num_assistant_tokens": k,
                                                   "num_assistant_tokens_schedule": "constant"})
                         for e in args.assistant_layers for k in args.k]
        full()  # warm-up
        full_best = min(_seconds(full) for _ in range(2))
        rows.append({"batch": batch_size, "setting": "full", "tokens_per_s": bench.generated / full_best,
                     "speedup": 1.0, "identical": True})
        print_row(rows[-1])
        for name, target, extra in settings:
            def own(bench: Bench = bench, target: Any = target, extra: dict[str, Any] = extra) -> list[Any]:
                return bench.run(target, **extra)

            outputs = own()
            speedup, best = paired_speedup(full, own, args.repeats)
            row: dict[str, Any] = {
                "batch": batch_size, "setting": name, "tokens_per_s": bench.generated / best, "speedup": speedup,
                "identical": all(torch.equal(o, r) for o, r in zip(outputs, reference)),
            }
            if name.startswith(("spec", "lossy")):
                stats = bench.stats(**extra)
                layers: dict[int, int] = {}
                for stat in stats:
                    for layer, count in stat.tokens_per_exit.items():
                        layers[layer] = layers.get(layer, 0) + count
                row["mean_exit_layer"] = mean_exit_layer(layers)
                if name.startswith("spec"):
                    drafted = sum(stat.draft_tokens for stat in stats)
                    row["acceptance"] = sum(stat.accepted_draft_tokens for stat in stats) / drafted if drafted \
                        else float("nan")
                    row["tokens_per_round"] = sum(stat.num_tokens for stat in stats) / sum(
                        stat.rounds for stat in stats)
                    row["drafted_per_token"] = drafted / sum(stat.num_tokens for stat in stats)
            rows.append(row)
            print_row(row)
    return rows


HEADER = (f"{'batch':>5} {'setting':<16} {'tok/s':>8} {'speedup':>7} {'identical':>9} {'exit layer':>10} "
          f"{'accept':>6} {'tok/round':>9} {'drafts/tok':>10}")


def print_row(row: dict[str, Any]) -> None:
    def cell(key: str, width: int, fmt: str) -> str:
        value = row.get(key)
        return f"{'-':>{width}}" if value is None else f"{value:>{width}{fmt}}"

    print(f"{row['batch']:>5} {row['setting']:<16} {row['tokens_per_s']:>8.1f} {row['speedup']:>6.2f}x "
          f"{str(row['identical']):>9} {cell('mean_exit_layer', 10, '.2f')} {cell('acceptance', 6, '.2f')} "
          f"{cell('tokens_per_round', 9, '.2f')} {cell('drafted_per_token', 10, '.2f')}", flush=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", type=Path, required=True, help="an EarlyExitGPT folder with its tokenizer")
    parser.add_argument("--thresholds", type=float, nargs="+", default=[0.8, 0.4, 0.0])
    parser.add_argument("--k", type=int, nargs="+", default=[4], help="most drafted tokens per round")
    parser.add_argument("--assistant-layers", type=int, nargs="+", default=None,
                        help="assistant_early_exit layers for transformers (default: the model's exit layers)")
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--prompts", type=int, default=8)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    parser.add_argument("--wall-clock", action="store_true", help="speedups from wall-clock, not CPU, time")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    global WALL_CLOCK
    WALL_CLOCK = args.wall_clock

    from transformers import AutoModelForCausalLM, AutoTokenizer

    from eellm_hf.modeling.convert import early_exit_to_llama

    tokenizer = AutoTokenizer.from_pretrained(args.model)
    tokenizer.padding_side = "left"
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=getattr(torch, args.dtype)).eval()
    config = model.config
    if not getattr(config, "exit_layers", None):
        raise SystemExit(f"{args.model} has no early exits (config.exit_layers).")
    args.assistant_layers = args.assistant_layers or list(config.exit_layers)
    # every run generates exactly --new-tokens tokens: no end-of-sequence token (nor a logits processor to forbid it)
    model.generation_config.eos_token_id = None
    llama = early_exit_to_llama(model)
    print(f"model {args.model}: {config.num_hidden_layers} layers, hidden {config.hidden_size}, vocabulary "
          f"{config.vocab_size}, exits after {config.exit_layers}; {args.prompts} prompts x {args.new_tokens} "
          f"tokens, {args.repeats} paired rounds, {args.threads} thread(s)")
    print(HEADER)
    rows = bench(model, llama, tokenizer, args)
    print("\n" + HEADER)
    for row in rows:
        print_row(row)
    return 0


if __name__ == "__main__":
    sys.exit(main())
