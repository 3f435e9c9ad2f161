"""Benchmark early-exit generation against full-depth generation, on CPU (or whatever device is given).

Usage::

    python benchmarks/bench_generate.py                      # train a small model on the KJV first (~5 min)
    python benchmarks/bench_generate.py --model DIR          # an EarlyExitGPT folder (weights + tokenizer)

Part 1 (a model with trained exits): tokens/s at full depth (`early_exit_threshold=None`, i.e. transformers' own
loop) and with early exit at several thresholds, at batch 1 and 8, greedy. For each run it prints the speedup, the
mean exit layer and tokens per exit, the backlog tokens recomputed, the ideal speedup counted in FLOPs from what
the run computed (decoder layers and exit blocks per token, exit heads evaluated, tokens recomputed, rows padded
for alignment; matrix-multiply FLOPs, attention scores ignored), efficiency = measured / ideal, and token agreement
with the full-depth output.

Part 2 (speed limits, untrained weights): a 12-layer model whose only exit sits after layer 3 at threshold 0
(every token leaves there) against full depth, and the overhead of early exit when nothing exits (threshold 1.0)
against full depth plus the exit heads' share of the FLOPs.

Timing runs single-threaded by default (`--threads`): the machines this runs on are shared, and multi-threaded
timings swing by an order of magnitude under load. Every configuration runs once per round, `--repeats` rounds.
Tokens/s are the best round's wall-clock rate. A speedup is the median over rounds of the ratio of full-depth to
early-exit process CPU time within the round (wall-clock with `--wall-clock`), which cancels the slow drifts of
a shared machine's speed.
"""

from __future__ import annotations

import argparse
import math
import random
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from eellm_hf import EarlyExitGPTConfig, EarlyExitGPTForCausalLM, corpus
from eellm_hf.modeling.early_exit_settings import mean_exit_layer

EOS, PAD = "<|endoftext|>", "<|pad|>"
WALL_CLOCK = False  # speedups from wall-clock time instead of process CPU time


def train_model(out: Path, train_steps: int, seed: int = 0) -> Path:
    """Train a byte-level BPE tokenizer and a small early-exit model on the KJV (held-out books excluded)."""
    from tokenizers import ByteLevelBPETokenizer
    from transformers import PreTrainedTokenizerFast

    torch.manual_seed(seed)
    random.seed(seed)
    verses = [verse["text"] for verse in corpus.training_verses()]
    bpe = ByteLevelBPETokenizer(add_prefix_space=False)
    bpe.train_from_iterator(verses, vocab_size=2048, min_frequency=2, special_tokens=[EOS, PAD], show_progress=False)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=bpe._tokenizer, bos_token=EOS, eos_token=EOS, unk_token=EOS, pad_token=PAD,
        model_max_length=256, padding_side="left",
    )

    seq_len, batch_size = 128, 16
    ids = [token for encoding in bpe._tokenizer.encode_batch([v + "\n" for v in verses]) for token in encoding.ids]
    data = torch.tensor(ids[: len(ids) // seq_len * seq_len]).view(-1, seq_len)
    config = EarlyExitGPTConfig(
        vocab_size=len(tokenizer), hidden_size=192, intermediate_size=512, num_hidden_layers=8,
        num_attention_heads=4, max_position_embeddings=256, exit_layers=[2, 4], exit_loss_weights=[1.0, 1.0],
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    model = EarlyExitGPTForCausalLM(config)
    peak_lr = 3e-3
    optimizer = torch.optim.AdamW(model.parameters(), lr=peak_lr, weight_decay=0.01, betas=(0.9, 0.95))
    print(f"training {sum(p.numel() for p in model.parameters()) / 1e6:.1f}M parameters on "
          f"{data.numel() / 1e6:.2f}M KJV tokens for {train_steps} steps of {batch_size}x{seq_len} ...", flush=True)
    started = time.perf_counter()
    for step in range(train_steps):
        elapsed = time.perf_counter() - started
        progress = step / train_steps
        for group in optimizer.param_groups:
            group["lr"] = peak_lr * min(1.0, (step + 1) / 20) * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))
        batch = data[torch.randint(0, data.shape[0], (batch_size,))]
        output = model(input_ids=batch, labels=batch)
        output.loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if step % 25 == 0:
            exits = " ".join(f"{loss.item():.2f}" for loss in output.exit_losses)
            print(f"  step {step:4d}  {elapsed:5.0f} s  loss {output.loss.item():.3f}  exit losses {exits}", flush=True)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    print(f"saved to {out} ({time.perf_counter() - started:.0f} s)", flush=True)
    return out


# ---------------------------------------------------------------------------------------------- FLOP counting


@dataclass
class FlopModel:
    """Matrix-multiply FLOPs per token of each part of an EarlyExitGPT."""

    layer: float
    exit_block: float
    exit_mlp: list[float]  # an exit's MLP: every token that reaches the exit, unless a gate before it stops it
    exit_gate: list[float]  # its confidence gate
    exit_projection: list[float]  # its vocabulary projection: only the tokens whose decision needs it
    final_head: float
    num_layers: int

    @property
    def exit_head(self) -> list[float]:
        """An exit's whole head (body and projection), as a token that reaches it and is decided by its logits
        pays."""
        return [sum(parts) for parts in zip(self.exit_mlp, self.exit_gate, self.exit_projection)]

    @classmethod
    def of(cls, model: EarlyExitGPTForCausalLM) -> FlopModel:
        def matmul_flops(module: torch.nn.Module) -> float:
            return 2.0 * sum(p.numel() for name, p in module.named_parameters() if p.dim() == 2)

        config = model.config
        exits = model.model.exits
        block = matmul_flops(exits[0].block) if config.exit_block and len(exits) else 0.0
        mlps = [matmul_flops(exit_module.mlp) if config.exit_mlp else 0.0 for exit_module in exits]
        gates = [matmul_flops(exit_module.gate) if config.exit_gate else 0.0 for exit_module in exits]
        # an exit projects onto its shortlist's rows only (`config.exit_vocab`)
        shortlist = 1.0 if config.exit_vocab is None else len(config.exit_vocab) / config.vocab_size
        projections = [shortlist * matmul_flops(model.exit_projection(index)) for index in range(len(exits))]
        return cls(matmul_flops(model.model.layers[0]), block, mlps, gates, projections, matmul_flops(model.lm_head),
                   config.num_hidden_layers)

    def full_depth(self, batch_size: int, prompt_length: int, new_tokens: int) -> float:
        """What transformers' greedy loop computes: prompt and all but the last token, final head per step."""
        return batch_size * ((prompt_length + new_tokens - 1) * self.num_layers * self.layer
                             + new_tokens * self.final_head)

    def early_exit(self, stats: Any) -> float:
        """What an early-exit run computed, from its `EarlyExitStats` (completing the returned cache excluded)."""
        return ((stats.layer_tokens + stats.padding_token_layers) * self.layer
                + sum(stats.exit_block_tokens) * self.exit_block
                + self._exit_heads(stats)
                + stats.final_head_tokens * self.final_head)

    def _exit_heads(self, stats: Any) -> float:
        """Each exit's MLP, gate and projection, each for the tokens that ran it (`EarlyExitStats` counts them:
        with `exit_confidence="gate"` the projection runs only for the tokens that leave, and so does the MLP when
        the gate reads before it)."""
        counted = ((stats.exit_mlp_tokens, self.exit_mlp), (stats.exit_gate_tokens, self.exit_gate),
                   (stats.exit_head_tokens, self.exit_projection))
        return sum(n * flops for tokens, costs in counted for n, flops in zip(tokens, costs))

    def heads_share(self, stats: Any, full: float) -> float:
        return self._exit_heads(stats) / full


# ------------------------------------------------------------------------------------------------ measurement


def time_runs(runs: dict[str, Any], repeats: int) -> tuple[dict[str, float], dict[str, float]]:
    """Time callables in `repeats` interleaved rounds (after a warm-up round); `runs["full"]` is the baseline.

    Returns each run's best wall-clock time, and its speedup over the baseline: the median over rounds of the
    ratio of their times within the round (process CPU time unless `WALL_CLOCK`), which cancels the slow drifts
    of a shared machine's speed.
    """
    wall: dict[str, list[float]] = {name: [] for name in runs}
    measured: dict[str, list[float]] = {name: [] for name in runs}
    for round_index in range(repeats + 1):
        for name, run in runs.items():
            started, started_cpu = time.perf_counter(), time.process_time()
            run()
            if round_index:
                wall[name].append(time.perf_counter() - started)
                measured[name].append(wall[name][-1] if WALL_CLOCK else time.process_time() - started_cpu)
    speedups = {
        name: statistics.median(full / own for full, own in zip(measured["full"], values))
        for name, values in measured.items()
    }
    return {name: min(values) for name, values in wall.items()}, speedups


def prompts_from_held_out(tokenizer: Any, count: int, words: int = 8) -> list[str]:
    verses = [verse["text"] for verse in corpus.held_out_verses()]  # prompts: never trained on
    rng = random.Random(1611)
    return [" ".join(text.split()[:words]) for text in rng.sample(verses, count)]


def bench_trained(model_dir: Path, thresholds: list[float], batch_sizes: list[int], new_tokens: int,
                  repeats: int) -> list[dict[str, Any]]:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    tokenizer.padding_side = "left"
    model = EarlyExitGPTForCausalLM.from_pretrained(model_dir).eval()
    flops = FlopModel.of(model)
    config = model.config
    print(f"\nmodel: {config.num_hidden_layers} layers, hidden {config.hidden_size}, vocab {config.vocab_size}, "
          f"exits after layers {config.exit_layers}; one exit head = {flops.exit_head[0] / flops.layer:.2f} layers "
          f"of FLOPs")
    rows = []
    for batch_size in batch_sizes:
        # batch 1 decodes four prompts one after the other; larger batches decode one left-padded batch
        groups = [[p] for p in prompts_from_held_out(tokenizer, 4)] if batch_size == 1 else [
            prompts_from_held_out(tokenizer, batch_size)]
        inputs = [tokenizer(group, return_tensors="pt", padding=True) for group in groups]
        common = dict(max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                      pad_token_id=tokenizer.pad_token_id)

        def generate(threshold: float | None, inputs: list[Any] = inputs, common: dict = common, **extra: Any) -> Any:
            return [model.generate(**encoded, early_exit_threshold=threshold, **common, **extra)
                    for encoded in inputs]

        settings: dict[str, float | None] = {"full": None, **{f"{t:g}": t for t in thresholds}}
        wall, speedups = time_runs({name: (lambda t=t: generate(t)) for name, t in settings.items()}, repeats)
        reference = generate(None)
        generated = sum(batch.shape[0] for batch in reference) * new_tokens
        full_flops = sum(flops.full_depth(encoded["input_ids"].shape[0], encoded["input_ids"].shape[1], new_tokens)
                         for encoded in inputs)
        for name, threshold in settings.items():
            row: dict[str, Any] = {"batch": batch_size, "threshold": name,
                                   "tokens_per_s": generated / wall[name], "speedup": speedups[name]}
            if threshold is not None:
                outputs = generate(threshold, return_dict_in_generate=True)
                stats = [output.early_exit_stats for output in outputs]
                tokens_per_exit: dict[int, int] = {}
                for stat in stats:
                    for layer, count in stat.tokens_per_exit.items():
                        tokens_per_exit[layer] = tokens_per_exit.get(layer, 0) + count
                ideal = full_flops / sum(flops.early_exit(stat) for stat in stats)
                agree = [
                    (output.sequences[:, -new_tokens:] == ref[:, -new_tokens:]).float().mean().item()
                    for output, ref in zip(outputs, reference)
                ]
                row.update(
                    mean_exit_layer=mean_exit_layer(tokens_per_exit),
                    tokens_per_exit=tokens_per_exit,
                    recomputed=sum(stat.recomputed_tokens for stat in stats),
                    padding=sum(stat.padding_token_layers for stat in stats)
                    / sum(stat.layer_tokens + stat.padding_token_layers for stat in stats),
                    ideal=ideal,
                    efficiency=row["speedup"] / ideal,
                    agreement=statistics.mean(agree),
                    heads_share=sum(flops.heads_share(stat, full_flops / len(stats)) for stat in stats) / len(stats),
                )
            rows.append(row)
    return rows


def bench_speed_limits(new_tokens: int, repeats: int, batch_sizes: list[int]) -> list[dict[str, Any]]:
    """12 layers, one exit after layer 3 (untrained): threshold 0 vs full depth, and threshold 1.0 overhead."""
    torch.manual_seed(0)
    config = EarlyExitGPTConfig(
        vocab_size=4096, hidden_size=512, intermediate_size=1408, num_hidden_layers=12, num_attention_heads=8,
        max_position_embeddings=512, exit_layers=[3], bos_token_id=None, eos_token_id=None, pad_token_id=0,
    )
    model = EarlyExitGPTForCausalLM(config).eval()
    flops = FlopModel.of(model)
    print(f"\nspeed-limit model: 12 layers, hidden 512, vocab 4096, one exit after layer 3 (untrained); "
          f"exit head = {flops.exit_head[0] / flops.layer:.2f} layers of FLOPs")
    rows = []
    for batch_size in batch_sizes:
        input_ids = torch.randint(1, config.vocab_size, (batch_size, 16))
        common = dict(max_new_tokens=new_tokens, do_sample=False)
        runs = {
            "full": lambda ids=input_ids, common=common: model.generate(ids, **common),
            "0": lambda ids=input_ids, common=common: model.generate(ids, early_exit_threshold=0.0, **common),
            "1": lambda ids=input_ids, common=common: model.generate(ids, early_exit_threshold=1.0, **common),
        }
        wall, speedups = time_runs(runs, repeats)
        full = flops.full_depth(batch_size, 16, new_tokens)
        for name, threshold in (("0", 0.0), ("1", 1.0)):
            stats = model.generate(input_ids, early_exit_threshold=threshold, return_dict_in_generate=True,
                                   **common).early_exit_stats
            ideal = full / flops.early_exit(stats)
            rows.append({"batch": batch_size, "threshold": name, "speedup": speedups[name],
                         "ideal": ideal, "efficiency": speedups[name] / ideal,
                         "mean_exit_layer": stats.mean_exit_layer, "heads_share": flops.heads_share(stats, full),
                         "tokens_per_s": batch_size * new_tokens / wall[name],
                         "full_tokens_per_s": batch_size * new_tokens / wall["full"]})
    return rows


def print_table(rows: list[dict[str, Any]]) -> None:
    header = (f"{'batch':>5} {'threshold':>9} {'tok/s':>8} {'speedup':>7} {'mean exit':>9} {'tokens per exit':>22} "
              f"{'recomp':>6} {'pad':>5} {'ideal':>6} {'effic.':>6} {'agree':>6}")
    print(header)
    print("-" * len(header))
    print("(recomp: backlog tokens recomputed; pad: share of decoder-layer compute spent aligning the rows of a batch,"
          " counted in the ideal)")
    for row in rows:
        if row["threshold"] == "full":
            print(f"{row['batch']:>5} {'full':>9} {row['tokens_per_s']:8.1f} {1.0:7.2f}")
            continue
        per_exit = " ".join(f"L{layer}:{count}" for layer, count in row["tokens_per_exit"].items())
        print(f"{row['batch']:>5} {row['threshold']:>9} {row['tokens_per_s']:8.1f} {row['speedup']:7.2f} "
              f"{row['mean_exit_layer']:9.2f} {per_exit:>22} {row['recomputed']:6d} {row['padding']:5.2f} "
              f"{row['ideal']:6.2f} {row['efficiency']:6.2f} {row['agreement']:6.2f}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", type=Path, help="an EarlyExitGPT folder with a tokenizer (default: train one)")
    parser.add_argument("--out", type=Path, default=Path("runs/bench_generate_model"),
                        help="where to save (or reuse) the trained model when --model is not given")
    parser.add_argument("--train-steps", type=int, default=400)
    parser.add_argument("--thresholds", type=float, nargs="+", default=[0.1, 0.2, 0.3, 0.5, 0.7, 0.9, 1.0])
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=15, help="interleaved timing rounds (best one kept)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads while timing (default 1)")
    parser.add_argument("--wall-clock", action="store_true", help="speedups from wall-clock instead of CPU time")
    parser.add_argument("--skip-trained", action="store_true", help="only run the speed-limit checks")
    parser.add_argument("--skip-limits", action="store_true", help="only run the trained-model table")
    args = parser.parse_args(argv)
    global WALL_CLOCK
    WALL_CLOCK = args.wall_clock or args.threads != 1

    ok = True
    if not args.skip_trained:
        model_dir = args.model
        if model_dir is None:
            model_dir = args.out
            if not (model_dir / "config.json").exists():
                train_model(model_dir, args.train_steps)
        torch.set_num_threads(args.threads)
        rows = bench_trained(model_dir, args.thresholds, args.batch_sizes, args.new_tokens, args.repeats)
        print_table(rows)
        for batch_size in args.batch_sizes:
            efficiencies = [row["efficiency"] for row in rows if row["batch"] == batch_size and "efficiency" in row]
            verdict = "ok" if min(efficiencies) >= 0.85 else "MISSED"
            ok &= verdict == "ok"
            print(f"batch {batch_size}: lowest efficiency {min(efficiencies):.2f} (target >= 0.85) {verdict}")
        for row in rows:
            if row["threshold"] == "1":
                allowed = 1.0 + row["heads_share"] + 0.03
                print(f"batch {row['batch']}, threshold 1.0: time x{1 / row['speedup']:.3f} of full depth "
                      f"(allowed x{allowed:.3f} = 1 + exit heads' FLOP share {row['heads_share']:.3f} + 0.03)")

    if not args.skip_limits:
        torch.set_num_threads(args.threads)
        print()
        for row in bench_speed_limits(args.new_tokens * 2, args.repeats, args.batch_sizes):
            if row["threshold"] == "0":
                verdict = "ok" if row["speedup"] >= 2.5 else "MISSED"
                ok &= verdict == "ok"
                print(f"batch {row['batch']}, threshold 0 (every token leaves after layer 3): "
                      f"{row['tokens_per_s']:.1f} vs {row['full_tokens_per_s']:.1f} tok/s, speedup "
                      f"{row['speedup']:.2f} (ideal {row['ideal']:.2f}, target >= 2.5) {verdict}")
            else:
                allowed = 1.0 + row["heads_share"] + 0.03
                ratio = 1 / row["speedup"]
                verdict = "ok" if ratio <= allowed else "MISSED"
                ok &= verdict == "ok"
                print(f"batch {row['batch']}, threshold 1.0 (nothing exits): time x{ratio:.3f} of full depth, "
                      f"allowed x{allowed:.3f} (exit head FLOP share {row['heads_share']:.3f} + 0.03) {verdict}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
