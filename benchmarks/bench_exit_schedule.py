"""EE-LLM's exit schedules in the trainer, measured: deferred exit forward (memory) and bubble filling (throughput).

    python benchmarks/bench_exit_schedule.py [--pp 2 4] [--layers 8 --hidden 256 --vocab 2048 --steps 12 --lr 3e-3]

Per pipeline size P (one process per stage, one thread each), the trainer trains the same model (exits after
layers L/4 and L/2, so on stage 0 at pp=2 and on stages 0 and 1 at pp=4) from the same weights on the same
batches of learnable sequences (each next token is a fixed function of the previous one 80% of the time) in
three variants, one optimizer step each in turn, paired A B C C B A:

* ``plain``: today's 1F1B schedule;
* ``defer``: ``train.defer_exit_forward``;
* ``fill``: ``train.fill_bubbles`` with the count the schedule model predicts from FLOPs (printed).

Printed side by side: per stage, the peak bytes autograd held for backward during a step (exact, from
``saved_tensors_hooks``: :class:`~eellm_hf.trainer.exit_schedule.SavedActivationMeter`) and, from separate
launches of ``plain`` and ``defer`` alone, each rank's peak resident memory (``ru_maxrss``) above its resident
memory before the first step; the median step time and the CPU seconds of all ranks per step, exit-training
tokens per second (label tokens whose loss trains the exits: main plus exit-only), the exits' and final head's
losses on held-out sequences after the steps, and the exit-only micro-batches' own losses at the last step;
ratios against ``plain``. The machine's load average is printed: with more stages than cores, the "idle" bubble
time is not idle CPU (another stage runs there), so filling it costs step time in proportion to the extra work;
the schedule model's prediction (no growth) holds where every stage has its own core.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
import types
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
VARIANTS = {"plain": {}, "defer": {"defer_exit_forward": True}, "fill": {"fill_bubbles": True}}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pp", type=int, nargs="+", default=[2, 4])
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--vocab", type=int, default=2048)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--micro-batch", type=int, default=2)
    parser.add_argument("--microbatches", type=int, default=8, help="micro-batches per step (M)")
    parser.add_argument("--steps", type=int, default=12, help="timed steps per variant (after 1 warm-up step)")
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--worker", choices=["compare", "memory"], default=None, help=argparse.SUPPRESS)
    parser.add_argument("--variant", choices=list(VARIANTS), default=None, help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def model_config(args: argparse.Namespace) -> types.SimpleNamespace:
    layers = args.layers
    return types.SimpleNamespace(
        vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=args.hidden * 8 // 3 // 64 * 64,
        num_hidden_layers=layers, num_attention_heads=max(args.hidden // 64, 1), num_key_value_heads=None,
        max_position_embeddings=1024, exit_layers=[layers // 4, layers // 2], exit_loss_weights=[0.25, 0.5],
        rms_norm_eps=1e-6, initializer_range=0.02, hidden_act="silu", tie_word_embeddings=False, exit_norm=True,
        exit_mlp=False, exit_block=False, tie_exit_heads=False, pad_token_id=None,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0})


def make_trainer(args: argparse.Namespace, ctx, variant: str):
    from eellm_hf.trainer.config import TrainConfig
    from eellm_hf.trainer.train_loop import ParallelTrainer

    train = TrainConfig(steps=args.steps + 1, global_batch_size=args.microbatches * args.micro_batch,
                        micro_batch_size=args.micro_batch, lr=args.lr, lr_decay="constant", **VARIANTS[variant])
    split = [args.layers // ctx.pipeline_parallel_size] * ctx.pipeline_parallel_size
    return ParallelTrainer(model_config(args), ctx, train, layer_split=split)


def batch(args: argparse.Namespace, rows: int, seed: int):
    """Learnable sequences: each next token is ``(7 t + 3) mod V`` with probability 0.8, else uniform."""
    import torch

    g = torch.Generator().manual_seed(seed)
    tokens = torch.empty(rows, args.seq_len + 1, dtype=torch.long)
    tokens[:, 0] = torch.randint(0, args.vocab, (rows,), generator=g)
    follow = torch.rand(rows, args.seq_len, generator=g) < 0.8
    noise = torch.randint(0, args.vocab, (rows, args.seq_len), generator=g)
    for i in range(args.seq_len):
        tokens[:, i + 1] = torch.where(follow[:, i], (7 * tokens[:, i] + 3) % args.vocab, noise[:, i])
    return {"input_ids": tokens[:, :-1].contiguous(), "labels": tokens[:, 1:].contiguous()}


def _timed_step(trainer, args, step: int) -> tuple[float, float, int, object]:
    """One optimizer step: (wall seconds between barriers, CPU seconds of all ranks together, peak bytes autograd
    held on this rank, result)."""
    import torch

    from eellm_hf.trainer.exit_schedule import SavedActivationMeter

    main = batch(args, args.microbatches * args.micro_batch, seed=step)
    bubble = batch(args, trainer.bubble_batch_size, seed=10_000 + step) if trainer.bubble_micro_batches else None
    torch.distributed.barrier()
    start, cpu = time.perf_counter(), time.process_time()
    with SavedActivationMeter(exclude=list(trainer.model.parameters())) as meter:
        result = trainer.train_step(step, main["input_ids"], main["labels"], bubble=bubble)
    cpu = torch.tensor([time.process_time() - cpu], dtype=torch.float64)
    torch.distributed.barrier()
    seconds = time.perf_counter() - start
    torch.distributed.all_reduce(cpu)
    return seconds, float(cpu), meter.peak, result


def compare_worker(args: argparse.Namespace) -> None:
    import torch

    from eellm_hf.trainer.nanotron_compat import make_parallel_context

    torch.set_num_threads(1)
    pp = int(os.environ["WORLD_SIZE"])
    ctx = make_parallel_context(tp=1, pp=pp, dp=1)
    trainers = {name: make_trainer(args, ctx, name) for name in VARIANTS}
    times: dict[str, list[float]] = {name: [] for name in VARIANTS}
    cpu_times: dict[str, list[float]] = {name: [] for name in VARIANTS}
    peaks: dict[str, int] = dict.fromkeys(VARIANTS, 0)
    bubble_losses: dict[str, list] = {name: [] for name in VARIANTS}
    for step in range(args.steps + 1):  # one step of each variant per round, A B C then C B A
        for name in list(VARIANTS) if step % 2 == 0 else list(reversed(VARIANTS)):
            seconds, cpu, peak, result = _timed_step(trainers[name], args, step)
            if step >= 1:
                times[name].append(seconds)
                cpu_times[name].append(cpu)
            peaks[name] = max(peaks[name], peak)
            bubble_losses[name] = result.bubble_exit_losses
    held_out = batch(args, args.microbatches * args.micro_batch, seed=99_999)
    gathered: list = [None] * pp
    local = {"peaks": peaks}
    torch.distributed.all_gather_object(gathered, local)
    evaluations = {name: t.evaluate(held_out["input_ids"], held_out["labels"]) for name, t in trainers.items()}
    if torch.distributed.get_rank() == 0:
        tokens = {name: args.microbatches * args.micro_batch * args.seq_len
                  + trainers[name].bubble_batch_size * args.seq_len for name in VARIANTS}
        print("RESULT " + json.dumps({"times": times, "cpu": cpu_times, "peaks": [g["peaks"] for g in gathered],
                                      "eval": evaluations, "bubble_losses": bubble_losses, "exit_tokens": tokens,
                                      "bubble_micro_batches": trainers["fill"].bubble_micro_batches}), flush=True)


def memory_worker(args: argparse.Namespace) -> None:
    """One variant alone: each rank's peak resident memory above its resident memory before training (KiB)."""
    import torch

    from eellm_hf.trainer.nanotron_compat import make_parallel_context

    torch.set_num_threads(1)
    pp = int(os.environ["WORLD_SIZE"])
    ctx = make_parallel_context(tp=1, pp=pp, dp=1)
    trainer = make_trainer(args, ctx, args.variant)
    before = _resident_kib()
    for step in range(2):
        _timed_step(trainer, args, step)
    gathered: list = [None] * pp
    torch.distributed.all_gather_object(gathered, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before)
    if torch.distributed.get_rank() == 0:
        print("RESULT " + json.dumps(gathered), flush=True)


def _resident_kib() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") // 1024


def launch(args: argparse.Namespace, pp: int, worker: str, variant: str | None = None) -> object:
    env = dict(os.environ, OMP_NUM_THREADS="1",
               PYTHONPATH=os.pathsep.join(p for p in (str(REPO_ROOT), os.environ.get("PYTHONPATH")) if p))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(pp), __file__, "--worker", worker,
           *sys.argv[1:]] + (["--variant", variant] if variant else [])
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)
    lines = [line[7:] for line in out.stdout.splitlines() if line.startswith("RESULT ")]
    if out.returncode != 0 or not lines:
        raise SystemExit(f"benchmark worker failed:\n{out.stdout[-3000:]}\n{out.stderr[-3000:]}")
    return json.loads(lines[0])


def report(args: argparse.Namespace, pp: int, result: dict, rss: dict) -> None:
    times = {name: statistics.median(t) for name, t in result["times"].items()}
    print(f"\npp={pp} ({pp} processes on {os.cpu_count()} cores), M={args.microbatches} micro-batches of "
          f"{args.micro_batch} x {args.seq_len} tokens, exits after layers {args.layers // 4} and {args.layers // 2}, "
          f"fill: {result['bubble_micro_batches']} exit-only micro-batches per step (schedule model, FLOPs)")
    print("  peak activation bytes held by autograd per stage (MiB), and peak RSS growth per rank (MiB):")
    for stage in range(pp):
        peaks = {name: result["peaks"][stage][name] / 2**20 for name in VARIANTS}
        print(f"    stage {stage}: plain {peaks['plain']:7.1f}  defer {peaks['defer']:7.1f} "
              f"({peaks['defer'] / peaks['plain']:.2f}x)  fill {peaks['fill']:7.1f} "
              f"({peaks['fill'] / peaks['plain']:.2f}x) | RSS plain {rss['plain'][stage] / 1024:7.1f}  defer "
              f"{rss['defer'][stage] / 1024:7.1f} ({rss['defer'][stage] / max(rss['plain'][stage], 1):.2f}x)")
    cpu = {name: statistics.median(t) for name, t in result["cpu"].items()}
    print(f"  {'variant':>7} {'step s':>8} {'ratio':>6} {'CPU s':>7} {'ratio':>6} {'exit tokens/s':>13} {'ratio':>6}"
          f"   held-out losses (exit {args.layers // 4}, exit {args.layers // 2}, final)   exit-only losses")
    for name in VARIANTS:
        rate = result["exit_tokens"][name] / times[name]
        base = result["exit_tokens"]["plain"] / times["plain"]
        losses = ", ".join(f"{x:.4f}" for x in result["eval"][name])
        bubble = ", ".join("-" if x is None else f"{x:.4f}" for x in result["bubble_losses"][name]) or "-"
        print(f"  {name:>7} {times[name]:8.3f} {times[name] / times['plain']:6.2f} {cpu[name]:7.3f} "
              f"{cpu[name] / cpu['plain']:6.2f} {rate:13.0f} {rate / base:6.2f}   {losses:>40}   {bubble}")


def main() -> None:
    args = parse_args()
    if args.worker == "compare":
        compare_worker(args)
        return
    if args.worker == "memory":
        memory_worker(args)
        return
    load_before = os.getloadavg()[0]
    for pp in args.pp:
        rss = {name: launch(args, pp, "memory", name) for name in ("plain", "defer")}
        report(args, pp, launch(args, pp, "compare"), rss)
    print(f"\nload average (1 min) before / after: {load_before:.2f} / {os.getloadavg()[0]:.2f} on "
          f"{os.cpu_count()} cores")


if __name__ == "__main__":
    main()
