"""Training speed of the nanotron-based trainer.

(a) ``--part exits``: step time of an early-exit model against the same backbone without exits, both trained by
    this trainer at pp=2 (2 processes, launched here with torchrun), taking turns step by step so that machine
    noise hits both alike. Prints the time overhead next to the exits' FLOP share (exit FLOPs / backbone FLOPs
    per token); target: overhead <= FLOP share + 5%.
(b) ``--part hf``: tokens/s of this trainer in one process against ``transformers.Trainer`` on the same
    EarlyExitGPT model, data, batch, micro-batch and AdamW; target: >= 1.0x.

    python benchmarks/bench_train.py [--part all|exits|hf] [--layers 12 --hidden 256 --vocab 4096 --steps 8]
                                     [--threads N]

Exits sit after layers L/4 and L/2. At pp=2 a step lasts as long as the slowest stage, so the overhead follows
that stage's FLOPs (printed too), which layer granularity keeps above the exits' average share.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
import types
from pathlib import Path


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--part", choices=["all", "exits", "hf"], default="all")
    parser.add_argument("--layers", type=int, default=12)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--vocab", type=int, default=4096)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--global-batch", type=int, default=16)
    parser.add_argument("--micro-batch", type=int, default=4)
    parser.add_argument("--steps", type=int, default=8, help="timed steps (after 2 warm-up steps)")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch threads per process (default: torch's choice; (a) splits the cores in 2)")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--side", choices=["ours", "hf"], help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def model_fields(args: argparse.Namespace, exits: bool) -> dict:
    layers = args.layers
    return dict(
        vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=args.hidden * 8 // 3 // 64 * 64,
        num_hidden_layers=layers, num_attention_heads=max(args.hidden // 64, 1), max_position_embeddings=1024,
        exit_layers=[layers // 4, layers // 2] if exits else [], exit_loss_weights=[0.25, 0.5] if exits else [],
        bos_token_id=0, eos_token_id=0, pad_token_id=None,
    )


def train_config(args: argparse.Namespace):
    from eellm_hf.trainer.config import TrainConfig

    return TrainConfig(steps=args.steps + 2, global_batch_size=args.global_batch, micro_batch_size=args.micro_batch,
                       lr=1e-3, lr_decay="constant", grad_clip=1.0, weight_decay=0.0)


def batches(args: argparse.Namespace, count: int):
    import torch

    g = torch.Generator().manual_seed(0)
    rows = torch.randint(0, args.vocab, (count, args.global_batch, args.seq_len + 1), generator=g)
    return [(r[:, :-1].contiguous(), r[:, 1:].contiguous()) for r in rows]


# ------------------------------------------------------------------------------------------------------------
# (a) exits overhead at pp=2
# ------------------------------------------------------------------------------------------------------------


def exits_worker(args: argparse.Namespace) -> None:
    """Runs in each of the 2 torchrun processes (no transformers import needed)."""
    import torch

    from eellm_hf.trainer.nanotron_compat import make_parallel_context
    from eellm_hf.trainer.parallel_model import exit_flops_per_token, head_flops_per_token, layer_flops_per_token
    from eellm_hf.trainer.train_loop import ParallelTrainer

    torch.set_num_threads(args.threads or max(1, (os.cpu_count() or 2) // 2))
    ctx = make_parallel_context(tp=1, pp=2, dp=1)
    configs = {name: types.SimpleNamespace(**model_fields(args, exits=name == "early_exit"), rms_norm_eps=1e-6,
                                           initializer_range=0.02, hidden_act="silu", tie_word_embeddings=False,
                                           exit_norm=True, exit_mlp=False, exit_block=False, tie_exit_heads=False,
                                           rope_parameters={"rope_type": "default", "rope_theta": 10000.0})
               for name in ("early_exit", "backbone")}
    trainers = {name: ParallelTrainer(cfg, ctx, train_config(args)) for name, cfg in configs.items()}
    data = batches(args, args.steps + 2)
    times: dict[str, list[float]] = {name: [] for name in trainers}
    for step, (ids, labels) in enumerate(data):
        for name, trainer in trainers.items():
            torch.distributed.barrier()
            start = time.perf_counter()
            trainer.train_step(step, ids, labels)
            torch.distributed.barrier()
            if step >= 2:
                times[name].append(time.perf_counter() - start)
    if torch.distributed.get_rank() == 0:
        cfg = configs["early_exit"]
        backbone = cfg.num_hidden_layers * layer_flops_per_token(cfg) + head_flops_per_token(cfg)
        share = len(cfg.exit_layers) * exit_flops_per_token(cfg) / backbone
        result = {name: statistics.median(t) for name, t in times.items()}
        splits = {n: list(t.model.layout.layer_split) for n, t in trainers.items()}
        bottleneck = {n: max(stage_costs(configs[n], splits[n])) for n in trainers}
        result.update(flop_share=share, overhead=result["early_exit"] / result["backbone"] - 1.0, splits=splits,
                      stage_bound=bottleneck["early_exit"] / bottleneck["backbone"] - 1.0)
        print("RESULT " + json.dumps(result), flush=True)


def stage_costs(config, split: list[int]) -> list[float]:
    """Forward FLOPs per token of each pipeline stage (layers, their exits, the final head on the last)."""
    from eellm_hf.trainer.parallel_model import exit_flops_per_token, head_flops_per_token, layer_flops_per_token

    costs, layer = [], 0
    for stage, count in enumerate(split):
        exits = sum(1 for n in config.exit_layers if layer < n <= layer + count)
        costs.append(count * layer_flops_per_token(config) + exits * exit_flops_per_token(config)
                     + (head_flops_per_token(config) if stage == len(split) - 1 else 0.0))
        layer += count
    return costs


def run_exits(args: argparse.Namespace) -> dict:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", __file__, "--worker",
           *sys.argv[1:]]
    env = dict(os.environ, OMP_NUM_THREADS=str(max(1, (os.cpu_count() or 2) // 2)))
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)
    lines = [line[7:] for line in out.stdout.splitlines() if line.startswith("RESULT ")]
    if out.returncode != 0 or not lines:
        raise RuntimeError(f"benchmark workers failed:\n{out.stdout[-3000:]}\n{out.stderr[-3000:]}")
    result = json.loads(lines[0])
    print(f"(a) pp=2 step time: early-exit {result['early_exit']:.3f} s, backbone {result['backbone']:.3f} s "
          f"(layer splits {result['splits']})")
    verdict = "OK" if result["overhead"] <= result["flop_share"] + 0.05 else "ABOVE TARGET"
    print(f"    overhead {result['overhead']:+.1%} vs exit FLOP share {result['flop_share']:.1%} "
          f"(target <= share + 5%): {verdict}; the slowest stage's FLOPs predict {result['stage_bound']:+.1%}")
    return result


# ------------------------------------------------------------------------------------------------------------
# (b) this trainer vs transformers.Trainer, one process
# ------------------------------------------------------------------------------------------------------------


def hf_side_worker(args: argparse.Namespace) -> None:
    """One side of (b), in a fresh process: this trainer (``ours``) or ``transformers.Trainer`` (``hf``)."""
    import torch

    from eellm_hf import EarlyExitGPTConfig, EarlyExitGPTForCausalLM

    if args.threads:
        torch.set_num_threads(args.threads)
    config = EarlyExitGPTConfig(**model_fields(args, exits=True))
    data = batches(args, args.steps + 2)
    if args.side == "ours":
        from eellm_hf.trainer.nanotron_compat import make_parallel_context
        from eellm_hf.trainer.train_loop import ParallelTrainer

        trainer = ParallelTrainer(config, make_parallel_context(1, 1, 1), train_config(args))
        times = []
        for step, (ids, labels) in enumerate(data):
            start = time.perf_counter()
            trainer.train_step(step, ids, labels)
            times.append(time.perf_counter() - start)
    else:
        times = _hf_trainer_step_times(args, EarlyExitGPTForCausalLM(config), data)
    print("RESULT " + json.dumps({"step_s": times[2:]}), flush=True)


def _hf_trainer_step_times(args: argparse.Namespace, model, data) -> list[float]:
    import torch
    from torch.utils.data import Dataset
    from transformers import Trainer, TrainerCallback, TrainingArguments

    class Rows(Dataset):
        """The same sequences; transformers shifts the labels inside the model."""

        def __init__(self) -> None:
            self.rows = [torch.cat([ids[i], labels[i, -1:]]) for ids, labels in data for i in range(len(ids))]

        def __len__(self) -> int:
            return len(self.rows)

        def __getitem__(self, i: int) -> dict:
            return {"input_ids": self.rows[i], "labels": self.rows[i]}

    class StepTimer(TrainerCallback):
        def __init__(self) -> None:
            self.times: list[float] = []
            self.start = time.perf_counter()

        def on_step_end(self, *a, **k) -> None:
            now = time.perf_counter()
            self.times.append(now - self.start)
            self.start = now

    timer = StepTimer()
    training_args = TrainingArguments(
        output_dir=str(Path(os.environ.get("TMPDIR", "/tmp")) / "bench_train_hf"), max_steps=args.steps + 2,
        per_device_train_batch_size=args.micro_batch,
        gradient_accumulation_steps=args.global_batch // args.micro_batch, learning_rate=1e-3,
        lr_scheduler_type="constant", max_grad_norm=1.0, weight_decay=0.0, logging_steps=10**6,
        save_strategy="no", report_to=[], use_cpu=not torch.cuda.is_available(), dataloader_num_workers=0,
        disable_tqdm=True,
    )
    Trainer(model=model, args=training_args, train_dataset=Rows(), callbacks=[timer]).train()
    return timer.times


def run_hf(args: argparse.Namespace, rounds: int = 3) -> dict:
    """Each side in its own process (transformers.Trainer must not see this trainer's process group), sides
    alternating over ``rounds``; a side's time is its fastest step (the least disturbed by other load)."""
    env = dict(os.environ)
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    if args.threads:
        env["OMP_NUM_THREADS"] = str(args.threads)
    step_s: dict[str, list[float]] = {"ours": [], "hf": []}
    for _ in range(rounds):
        for side in step_s:
            cmd = [sys.executable, __file__, *sys.argv[1:], "--side", side]
            out = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)
            lines = [line[7:] for line in out.stdout.splitlines() if line.startswith("RESULT ")]
            if out.returncode != 0 or not lines:
                raise RuntimeError(f"benchmark side {side} failed:\n{out.stdout[-3000:]}\n{out.stderr[-3000:]}")
            step_s[side] += json.loads(lines[0])["step_s"]
    tokens_per_step = args.global_batch * args.seq_len
    ours_tps, hf_tps = (tokens_per_step / min(step_s[side]) for side in ("ours", "hf"))
    medians = {side: tokens_per_step / statistics.median(times) for side, times in step_s.items()}
    ratio = ours_tps / hf_tps
    print(f"(b) 1 process: this trainer {ours_tps:.0f} tokens/s, transformers.Trainer {hf_tps:.0f} tokens/s "
          f"(fastest steps; medians {medians['ours']:.0f} vs {medians['hf']:.0f}): {ratio:.2f}x "
          f"(target >= 1.0x): {'OK' if ratio >= 1.0 else 'BELOW TARGET'}")
    return {"ours_tokens_per_s": ours_tps, "hf_tokens_per_s": hf_tps, "ratio": ratio, "step_s": step_s}


def main() -> None:
    args = parse_args()
    if args.worker:
        exits_worker(args)
        return
    if args.side:
        hf_side_worker(args)
        return
    print(f"{args.layers} layers, hidden {args.hidden}, vocab {args.vocab}, seq {args.seq_len}, global batch "
          f"{args.global_batch}, micro-batch {args.micro_batch}, {args.steps} timed steps")
    if args.part in ("all", "exits"):
        run_exits(args)
    if args.part in ("all", "hf"):
        run_hf(args)


if __name__ == "__main__":
    main()
