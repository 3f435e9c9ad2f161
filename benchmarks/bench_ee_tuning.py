"""EE-Tuning throughput: the trainer's frozen-backbone step against a no-grad forward of the same model on the
same tokens (backbone and final head), and the same step at pp=2 on 2 processes.

In one process (``--threads`` threads), A = no-grad forward and B = one EE-Tuning step alternate A B B A for
``--rounds`` rounds; the ratio is tokens/s of B over A, per round, and its median is printed. Both are timed in
process CPU time (less sensitive than wall time to other jobs on a shared machine). Then the step runs
at pp=1 and pp=2 through ``torchrun`` (1 process x ``--threads`` threads, 2 processes x 1 thread), and at pp=2
without ``train.prefetch_next_step``, in the order A B C C B A, each run timing its steps after a warm-up; the
mean tokens/s of each are printed side by side. ``--autocast bfloat16`` (the recipe's
``train.autocast``) runs both the step and the forward it is compared with under bf16 autocast.
``--exit-vocab-sizes 0 8192`` measures the step without and with vocabulary-pruned exits (``model.exit_vocab_size``;
0: the whole vocabulary) in the same rounds (A B C C B A) and torchrun runs. In process the shortlist is the
first K token ids (what it costs does not depend on which; the torchrun runs choose it from the data, as the
trainer does).

    python benchmarks/bench_ee_tuning.py [--model smollm2-135m] [--exit-layers 16 22] [--rounds 3]
                                         [--autocast bfloat16|none] [--exit-vocab-sizes 0 8192]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import yaml

REPO = Path(__file__).resolve().parents[1]


def trainer_config(args: argparse.Namespace, pp: int, out: Path, exit_vocab_size: int = 0,
                   prefetch: bool = True) -> dict:
    model = {"init_from": args.model, "exit_layers": args.exit_layers, "exit_mlp": True, "tie_exit_heads": True,
             "exit_gate": True, "exit_gate_before_mlp": True}
    if exit_vocab_size:
        model["exit_vocab_size"] = exit_vocab_size
    return {
        "model": model,
        "parallelism": {"pp": pp, "timeout_s": 1800},
        "data": {"files": ["builtin:python-stdlib"], "seq_len": args.seq_len},
        "train": {"steps": args.steps, "global_batch_size": args.batch, "micro_batch_size": args.micro_batch,
                  "lr": 1e-3, "freeze_backbone": True, "exit_distillation": 1.0, "autocast": args.autocast,
                  "prefetch_next_step": prefetch},
        "run_dir": str(out / f"run_pp{pp}_k{exit_vocab_size}_prefetch{int(prefetch)}"),
    }


def in_process(args: argparse.Namespace, out: Path) -> dict[int, list[float]]:
    """Per exit vocabulary size, the ratios (EE-Tuning tokens/s over no-grad forward tokens/s) of A B .. B A rounds
    in this process."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(29600 + os.getpid() % 300), RANK="0", WORLD_SIZE="1",
                      LOCAL_RANK="0", LOCAL_WORLD_SIZE="1")
    torch.set_num_threads(args.threads)
    from eellm_hf.host_memory import keep_freed_memory
    from eellm_hf.trainer import nanotron_compat as nc
    from eellm_hf.trainer.config import load_config
    from eellm_hf.trainer.init_model import prepare_init_model
    from eellm_hf.trainer.train_loop import ParallelTrainer

    keep_freed_memory()  # as the trainer's run() does

    cfg = load_config(trainer_config(args, 1, out), world_size=1)
    model_config = cfg.model_config()
    init_dir = prepare_init_model(cfg.model.init_from, model_config, cfg.run_dir, is_writer=True)
    ctx = nc.make_parallel_context(1, 1, 1)
    trainers = {}
    for size in args.exit_vocab_sizes:
        shortlist = {"exit_vocab": list(range(size))} if size else {}
        config = type(model_config).from_dict({**model_config.to_dict(), **shortlist})
        trainers[size] = ParallelTrainer(config, ctx, cfg.train, init_from=init_dir)
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(0, model_config.vocab_size, (args.batch, args.seq_len + 1), generator=generator)
    inputs, labels = ids[:, :-1], ids[:, 1:]
    model = trainers[args.exit_vocab_sizes[0]].model

    precision = (torch.autocast("cpu", dtype=torch.bfloat16) if args.autocast else contextlib.nullcontext())

    @torch.no_grad()
    def forward() -> float:
        start = time.process_time()
        with precision:
            _forward()
        return time.process_time() - start

    def _forward() -> None:
        for micro in range(0, args.batch, args.micro_batch):
            hidden = model.model.embed_tokens.pp_block(inputs[micro:micro + args.micro_batch])
            for layer in model.model.layers:
                hidden = layer.pp_block(hidden)
            model.lm_head.pp_block.sharded_logits(model.model.norm.pp_block(hidden))

    def step(size: int, index: int) -> float:
        start = time.process_time()
        trainers[size].train_step(index, inputs, labels)
        return time.process_time() - start

    sizes = args.exit_vocab_sizes
    forward()
    for size in sizes:  # warm-up
        step(size, 0)
    ratios: dict[int, list[float]] = {size: [] for size in sizes}
    for round_index in range(args.rounds):
        a1 = forward()
        first = {size: step(size, 2 * round_index + 1) for size in sizes}
        second = {size: step(size, 2 * round_index + 2) for size in reversed(sizes)}
        a2 = forward()
        for size in sizes:
            ratios[size].append((a1 + a2) / (first[size] + second[size]))
        print(f"round {round_index}: no-grad forward {a1 + a2:.2f} CPU s, EE-Tuning steps "
              + ", ".join(f"{_name(size)} {first[size] + second[size]:.2f} CPU s (ratio {ratios[size][-1]:.3f})"
                          for size in sizes), flush=True)
    return ratios


def _name(exit_vocab_size: int) -> str:
    return "whole vocabulary" if not exit_vocab_size else f"shortlist of {exit_vocab_size}"


def torchrun_tokens_per_s(args: argparse.Namespace, pp: int, out: Path, exit_vocab_size: int,
                          prefetch: bool = True) -> float:
    config_path = out / f"pp{pp}_k{exit_vocab_size}_prefetch{int(prefetch)}.yaml"
    config = trainer_config(args, pp, out, exit_vocab_size, prefetch)
    config_path.write_text(yaml.safe_dump(config))
    threads = args.threads if pp == 1 else 1
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    subprocess.run([sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={pp}", "-m", "eellm_hf.trainer",
                    "--config", str(config_path)], check=True, env=env, cwd=REPO, stdout=subprocess.DEVNULL,
                   stderr=subprocess.DEVNULL)
    lines = [json.loads(line) for line in (Path(config["run_dir"]) / "metrics.jsonl").read_text().splitlines()]
    rates = [entry["tokens_per_s"] for entry in lines if entry.get("split") == "train" and entry["step"] > 1]
    return statistics.median(rates)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--exit-layers", type=int, nargs="+", default=[16, 22])
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--micro-batch", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=6, help="steps of each torchrun run (the first is not timed)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--skip-torchrun", action="store_true")
    parser.add_argument("--autocast", default="bfloat16", choices=["bfloat16", "none"],
                        help="train.autocast of the step, and the precision of the forward it is compared with")
    parser.add_argument("--exit-vocab-sizes", type=int, nargs="+", default=[0],
                        help="model.exit_vocab_size of each variant measured (0: the whole vocabulary)")
    args = parser.parse_args()
    args.autocast = None if args.autocast == "none" else args.autocast
    with tempfile.TemporaryDirectory(prefix="bench_ee_tuning_") as tmp:
        out = Path(tmp)
        ratios = in_process(args, out)
        for size, values in ratios.items():
            print(f"EE-Tuning / no-grad forward tokens/s (autocast: {args.autocast}, {_name(size)}), 1 process x "
                  f"{args.threads} threads: median {statistics.median(values):.3f} "
                  f"(rounds {', '.join(f'{r:.3f}' for r in values)})")
        if not args.skip_torchrun:
            for size in args.exit_vocab_sizes:
                # A B C C B A: pp=1, pp=2, pp=2 without train.prefetch_next_step
                runs = [(1, True), (2, True), (2, False)]
                rates: dict[tuple[int, bool], list[float]] = {run: [] for run in runs}
                for run in [*runs, *reversed(runs)]:
                    rates[run].append(torchrun_tokens_per_s(args, run[0], out, size, prefetch=run[1]))
                pp1, pp2, plain = (statistics.mean(rates[run]) for run in runs)
                names = {(1, True): "pp=1", (2, True): "pp=2", (2, False): "pp=2 without prefetch"}
                print("tokens/s of each run: " + "; ".join(
                    f"{names[run]} " + ", ".join(f"{rate:.1f}" for rate in rates[run]) for run in runs))
                print(f"EE-Tuning tokens/s ({_name(size)}): pp=1 (1 x {args.threads} threads) {pp1:.1f}, pp=2 (2 x 1 "
                      f"thread) {pp2:.1f}: pp=2 / pp=1 = {pp2 / pp1:.3f}; pp=2 without prefetch_next_step "
                      f"{plain:.1f} ({plain / pp1:.3f} of pp=1)", flush=True)


if __name__ == "__main__":
    main()
