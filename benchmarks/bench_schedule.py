"""The schedule model (`eellm_hf.trainer.schedule`) against measured 1F1B training steps on CPU.

    python benchmarks/bench_schedule.py [--layers 8 --hidden 256 --vocab 4096 --microbatches 2 4 8 --steps 4]

1. Profile (one process, one thread): the trainer's own modules (`ParallelEarlyExitGPT` built at pp=1) time, per
   micro-batch, each pp=2 stage's backbone forward and backward, its exits' forward and backward, the final
   head's, and an AdamW step over the stage's parameters (fastest of several repeats); the training processes
   time one pipeline hop (send and receive of a micro-batch's hidden states). These are the model's
   inputs; nothing is fitted to the runs below.
2. Measure (two processes, one thread each): the trainer at pp=2 trains the same model (exits after layers L/4 and
   L/2) and the same backbone without exits, step by step in turn, for each micro-batch count M; the fastest step
   (on a shared machine, the least disturbed one, as the profile).
3. Print predicted and measured step times side by side, the error (target: within 15%, on an otherwise idle
   machine), how the step time grows with M (predicted and measured), and the predicted and measured exit
   overhead. On a shared machine other jobs slow the training processes down while the profile counts CPU time,
   so the absolute error grows with the load; the ratios (growth with M, exit overhead) are what stays
   comparable. The load average is printed.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
import types
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--vocab", type=int, default=4096)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--micro-batch", type=int, default=4)
    parser.add_argument("--microbatches", type=int, nargs="+", default=[2, 4, 8])
    parser.add_argument("--steps", type=int, default=6, help="timed steps per M (after 1 warm-up step)")
    parser.add_argument("--repeats", type=int, default=7, help="profiling repeats")
    parser.add_argument("--worker", choices=["profile", "train"], default=None, help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def model_config(args: argparse.Namespace, exits: bool) -> types.SimpleNamespace:
    layers = args.layers
    return types.SimpleNamespace(
        vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=args.hidden * 8 // 3 // 64 * 64,
        num_hidden_layers=layers, num_attention_heads=max(args.hidden // 64, 1), num_key_value_heads=None,
        max_position_embeddings=1024, exit_layers=[layers // 4, layers // 2] if exits else [],
        exit_loss_weights=[0.25, 0.5] if exits else [], rms_norm_eps=1e-6, initializer_range=0.02,
        hidden_act="silu", tie_word_embeddings=False, exit_norm=True, exit_mlp=False, exit_block=False,
        tie_exit_heads=False, pad_token_id=None, rope_parameters={"rope_type": "default", "rope_theta": 10000.0})


def train_config(args: argparse.Namespace, microbatches: int, steps: int):
    from eellm_hf.trainer.config import TrainConfig

    return TrainConfig(steps=steps, global_batch_size=microbatches * args.micro_batch,
                       micro_batch_size=args.micro_batch, lr=1e-3, lr_decay="constant", grad_clip=1.0,
                       weight_decay=0.0)


def data(args: argparse.Namespace, rows: int, seed: int = 0):
    import torch

    tokens = torch.randint(0, args.vocab, (rows, args.seq_len + 1), generator=torch.Generator().manual_seed(seed))
    return tokens[:, :-1].contiguous(), tokens[:, 1:].contiguous()


# ------------------------------------------------------------------------------------------------------------
# 1. profile
# ------------------------------------------------------------------------------------------------------------


def _timed(fn, repeats: int) -> float:
    """CPU seconds of the fastest of `repeats` calls (this thread's CPU time: one torch thread computes on the
    calling thread, and time spent descheduled by other jobs on a shared machine does not count)."""
    times = []
    for _ in range(repeats):
        start = time.thread_time()
        fn()
        times.append(time.thread_time() - start)
    return min(times)


def profile_stages(args: argparse.Namespace, exits: bool) -> dict:
    """StageTimes fields of each pp=2 stage, measured on the trainer's modules built at pp=1."""

    from eellm_hf.trainer.nanotron_compat import make_parallel_context
    from eellm_hf.trainer.parallel_model import make_layout
    from eellm_hf.trainer.train_loop import ParallelTrainer

    ctx = make_parallel_context(1, 1, 1)
    config = model_config(args, exits)
    trainer = ParallelTrainer(config, ctx, train_config(args, 1, 1))
    model = trainer.model.train()
    model.loss.begin_step(args.micro_batch * args.seq_len, 1, config.exit_loss_weights, 1.0)
    split = make_layout(config, 2).layer_split
    ids, labels = data(args, args.micro_batch)
    return {"split": list(split),
            "stages": [_profile_stage(args, model, config, split, stage, ids, labels) for stage in range(2)]}


def _profile_stage(args: argparse.Namespace, model, config, split, stage: int, ids, labels) -> dict:
    import torch

    blocks = model.model
    first = sum(split[:stage])
    layers = range(first, first + split[stage])
    with torch.no_grad():  # a stage input of the right shape and scale
        start_hidden = blocks.embed_tokens.pp_block(input_ids=ids)
        for i in range(first):
            start_hidden = blocks.layers[i].pp_block(hidden_states=start_hidden)

    def forward():
        x = blocks.embed_tokens.pp_block(input_ids=ids) if stage == 0 else start_hidden.detach().requires_grad_(True)
        for i in layers:
            x = blocks.layers[i].pp_block(hidden_states=x)
        return x

    def forward_backward():
        x = forward()
        x.backward(torch.ones_like(x))

    f = _timed(forward, args.repeats)
    b = _timed(forward_backward, args.repeats) - f
    stage_exits = [j for j, layer in enumerate(config.exit_layers) if layer - 1 in layers]

    def exit_losses():
        total = 0.0
        for j in stage_exits:
            x = start_hidden.detach().requires_grad_(True)
            total = total + model.exit_lm_heads[j].pp_block(hidden_states=blocks.exits[j].pp_block(hidden_states=x),
                                                            labels=labels)["loss"]
        return total

    fe = _timed(exit_losses, args.repeats) if stage_exits else 0.0
    be = _timed(lambda: exit_losses().backward(), args.repeats) - fe if stage_exits else 0.0
    hf = hb = 0.0
    if stage == 1:
        def head_loss():
            x = start_hidden.detach().requires_grad_(True)
            return model.lm_head.pp_block(hidden_states=blocks.norm.pp_block(hidden_states=x), labels=labels)["loss"]

        hf = _timed(head_loss, args.repeats)
        hb = _timed(lambda: head_loss().backward(), args.repeats) - hf
    stage_params = [p for name, p in model.named_parameters() if _stage_of(name, config, split) == stage]
    for p in stage_params:
        p.grad = torch.randn_like(p)
    optimizer = torch.optim.AdamW(stage_params, lr=1e-3)
    opt = _timed(optimizer.step, args.repeats)
    return dict(forward=f, backward=max(b, 0.0), exit_forward=fe, exit_backward=max(be, 0.0), head_forward=hf,
                head_backward=max(hb, 0.0), optimizer=opt)


def _stage_of(name: str, config, split) -> int:
    from eellm_hf.trainer.parallel_model import hf_name, make_layout

    return make_layout(config, 2, split).stage_of_hf_name(hf_name(name))


# ------------------------------------------------------------------------------------------------------------
# 2. measure
# ------------------------------------------------------------------------------------------------------------


def p2p_seconds(args: argparse.Namespace, repeats: int = 20) -> float:
    """One pipeline hop: half the fastest round trip of a small metadata message and a micro-batch's hidden
    states (what nanotron's P2P sends per activation or gradient)."""
    import torch

    rank = torch.distributed.get_rank()
    meta = torch.zeros(16, dtype=torch.long)
    hidden = torch.zeros(args.micro_batch, args.seq_len, args.hidden)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        for sender in (0, 1):
            for tensor in (meta, hidden):
                if rank == sender:
                    torch.distributed.send(tensor, dst=1 - sender)
                else:
                    torch.distributed.recv(tensor, src=sender)
        times.append(time.perf_counter() - start)
    return min(times) / 2


def train_worker(args: argparse.Namespace) -> None:
    import torch

    from eellm_hf.trainer.nanotron_compat import make_parallel_context
    from eellm_hf.trainer.train_loop import ParallelTrainer

    torch.set_num_threads(1)
    ctx = make_parallel_context(tp=1, pp=2, dp=1)
    result = {"p2p": p2p_seconds(args)}
    for m in args.microbatches:
        trainers = {name: ParallelTrainer(model_config(args, exits=name == "early_exit"), ctx,
                                          train_config(args, m, args.steps + 1))
                    for name in ("early_exit", "backbone")}
        times: dict[str, list[float]] = {name: [] for name in trainers}
        for step in range(args.steps + 1):
            ids, labels = data(args, m * args.micro_batch, seed=step)
            for name, trainer in trainers.items():
                torch.distributed.barrier()
                start = time.perf_counter()
                trainer.train_step(step, ids, labels)
                torch.distributed.barrier()
                if step >= 1:
                    times[name].append(time.perf_counter() - start)
        result[str(m)] = {name: min(t) for name, t in times.items()}
    if torch.distributed.get_rank() == 0:
        print("RESULT " + json.dumps(result), flush=True)


# ------------------------------------------------------------------------------------------------------------
# 3. compare
# ------------------------------------------------------------------------------------------------------------


def run(cmd: list[str]) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS="1",
               PYTHONPATH=os.pathsep.join(p for p in (str(REPO_ROOT), os.environ.get("PYTHONPATH")) if p))
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)
    lines = [line[7:] for line in out.stdout.splitlines() if line.startswith("RESULT ")]
    if out.returncode != 0 or not lines:
        raise SystemExit(f"benchmark worker failed:\n{out.stdout[-3000:]}\n{out.stderr[-3000:]}")
    return json.loads(lines[0])


def main() -> None:
    args = parse_args()
    if args.worker == "profile":
        import torch

        torch.set_num_threads(1)
        print("RESULT " + json.dumps({name: profile_stages(args, exits=name == "early_exit")
                                      for name in ("early_exit", "backbone")}), flush=True)
        return
    if args.worker == "train":
        train_worker(args)
        return
    from eellm_hf.trainer.schedule import StageTimes, simulate_1f1b

    load_before = os.getloadavg()[0]
    profiles = run([sys.executable, __file__, "--worker", "profile", *sys.argv[1:]])
    measured = run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", __file__,
                    "--worker", "train", *sys.argv[1:]])
    print(f"pp=2, {args.layers} layers (hidden {args.hidden}, vocabulary {args.vocab}, exits after layers "
          f"{args.layers // 4} and {args.layers // 2}), micro-batch {args.micro_batch} x {args.seq_len} tokens, "
          f"1 thread per process; layer splits {profiles['early_exit']['split']} (exits), "
          f"{profiles['backbone']['split']} (backbone)")
    for name, profile in profiles.items():
        for stage, times in enumerate(profile["stages"]):
            print(f"  {name} stage {stage}: " + ", ".join(f"{k} {v * 1e3:.1f} ms" for k, v in times.items()))
    print(f"  p2p (one hop, measured): {measured['p2p'] * 1e3:.2f} ms")
    print(f"{'M':>3} {'model':>10} {'predicted s':>11} {'measured s':>10} {'error':>7} {'bubble':>7} "
          f"{'T(M)/T(M0) predicted':>21} {'measured':>8}")
    first = str(args.microbatches[0])
    predicted: dict[str, dict[str, float]] = {}
    for m in args.microbatches:
        predicted[str(m)] = {}
        for name, profile in profiles.items():
            result = simulate_1f1b([StageTimes(**t) for t in profile["stages"]], m, p2p=measured["p2p"])
            predicted[str(m)][name] = result.iteration_time
            real = measured[str(m)][name]
            scaling = result.iteration_time / predicted[first][name]
            print(f"{m:>3} {name:>10} {result.iteration_time:>11.3f} {real:>10.3f} "
                  f"{result.iteration_time / real - 1:>+7.1%} {result.bubble_fraction:>7.1%} "
                  f"{scaling:>21.2f} {real / measured[first][name]:>8.2f}")
    for m in args.microbatches:
        p, r = predicted[str(m)], measured[str(m)]
        print(f"{m:>3} exit overhead: predicted {p['early_exit'] / p['backbone'] - 1:+.1%}, "
              f"measured {r['early_exit'] / r['backbone'] - 1:+.1%}")
    print(f"load average (1 min) before / after: {load_before:.2f} / {os.getloadavg()[0]:.2f} on "
          f"{os.cpu_count()} cores (the absolute check needs an otherwise idle machine)")


if __name__ == "__main__":
    main()
