"""EE-Tuning throughput: the trainer's frozen-backbone step against a no-grad forward of the same model on the
same tokens (backbone and final head), and the same step at pp=2 on 2 processes.

In one process (``--threads`` threads), A = no-grad forward and B = one EE-Tuning step alternate A B B A for
``--rounds`` rounds; the ratio is tokens/s of B over A, per round, and its median is printed. Both are timed in
process CPU time (less sensitive than wall time to other jobs on a shared machine). Then the step runs
at pp=1 and pp=2 through ``torchrun`` (1 process x ``--threads`` threads, 2 processes x 1 thread), each timing its
steps after a warm-up; tokens/s of both are printed side by side. ``--autocast bfloat16`` (the recipe's
``train.autocast``) runs both the step and the forward it is compared with under bf16 autocast.

    python benchmarks/bench_ee_tuning.py [--model smollm2-135m] [--exit-layers 16 22] [--rounds 3]
                                         [--autocast bfloat16|none]
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


def trainer_config(args: argparse.Namespace, pp: int, out: Path) -> dict:
    return {
        "model": {"init_from": args.model, "exit_layers": args.exit_layers, "exit_mlp": True, "tie_exit_heads": True,
                  "exit_gate": True},
        "parallelism": {"pp": pp, "timeout_s": 1800},
        "data": {"files": ["builtin:python-stdlib"], "seq_len": args.seq_len},
        "train": {"steps": args.steps, "global_batch_size": args.batch, "micro_batch_size": args.micro_batch,
                  "lr": 1e-3, "freeze_backbone": True, "exit_distillation": 0.5, "autocast": args.autocast},
        "run_dir": str(out / f"run_pp{pp}"),
    }


def in_process(args: argparse.Namespace, out: Path) -> list[float]:
    """Ratios (EE-Tuning tokens/s over no-grad forward tokens/s) of A B B A rounds in this process."""
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
    trainer = ParallelTrainer(model_config, ctx, cfg.train, init_from=init_dir)
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(0, model_config.vocab_size, (args.batch, args.seq_len + 1), generator=generator)
    inputs, labels = ids[:, :-1], ids[:, 1:]
    model = trainer.model

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

    def step(index: int) -> float:
        start = time.process_time()
        trainer.train_step(index, inputs, labels)
        return time.process_time() - start

    forward(), step(0)  # warm-up
    ratios = []
    for round_index in range(args.rounds):
        a1, b1, b2, a2 = forward(), step(2 * round_index + 1), step(2 * round_index + 2), forward()
        ratios.append((a1 + a2) / (b1 + b2))
        print(f"round {round_index}: no-grad forward {a1 + a2:.2f} CPU s, EE-Tuning steps {b1 + b2:.2f} CPU s, "
              f"ratio {ratios[-1]:.3f}", flush=True)
    return ratios


def torchrun_tokens_per_s(args: argparse.Namespace, pp: int, out: Path) -> float:
    config_path = out / f"pp{pp}.yaml"
    config_path.write_text(yaml.safe_dump(trainer_config(args, pp, out)))
    threads = args.threads if pp == 1 else 1
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    subprocess.run([sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={pp}", "-m", "eellm_hf.trainer",
                    "--config", str(config_path)], check=True, env=env, cwd=REPO, stdout=subprocess.DEVNULL,
                   stderr=subprocess.DEVNULL)
    lines = [json.loads(line) for line in (out / f"run_pp{pp}" / "metrics.jsonl").read_text().splitlines()]
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
    args = parser.parse_args()
    args.autocast = None if args.autocast == "none" else args.autocast
    with tempfile.TemporaryDirectory(prefix="bench_ee_tuning_") as tmp:
        out = Path(tmp)
        ratios = in_process(args, out)
        print(f"EE-Tuning / no-grad forward tokens/s (autocast: {args.autocast}), 1 process x {args.threads} "
              "threads: median "
              f"{statistics.median(ratios):.3f} (rounds {', '.join(f'{r:.3f}' for r in ratios)})")
        if not args.skip_torchrun:
            pp1 = torchrun_tokens_per_s(args, 1, out)
            pp2 = torchrun_tokens_per_s(args, 2, out)
            print(f"EE-Tuning tokens/s: pp=1 (1 x {args.threads} threads) {pp1:.1f}, pp=2 (2 x 1 thread) {pp2:.1f}: "
                  f"pp=2 / pp=1 = {pp2 / pp1:.3f}")


if __name__ == "__main__":
    main()
