"""Pipeline-parallel early-exit decoding at pp=2: latency per generated token, side by side in one run.

    python benchmarks/bench_pipeline_decode.py [--layers 12 --hidden 512 --vocab 4096 --new-tokens 48 --rounds 3]

Two processes (torchrun, one thread each) hold one pipeline stage each of an untrained model whose only exit sits
at the stage boundary (after layer L/2, where EE-LLM's configurations put theirs), with its head scaled up so that
a threshold can split tokens between the exit and the final head. Rank 0 also loads the whole model. For each
threshold (0: every token leaves at the exit; the median confidence of the exit on a full-depth text: about half
of them), per round in A B C A1 A1 C B A order, batch 1, greedy:

* A: single-process early-exit generation (`EarlyExitGPTForCausalLM.generate`, KV recomputation) on both cores
  (2 threads) while rank 1 idles;
* B: pipeline decoding with early exit;
* C: pipeline decoding at full depth (threshold None);
* A1: the same single-process generation on one thread (for reference; also in the pairs, A B C A1 A1 C B A);
* ideal: the schedule model (`eellm_hf.trainer.schedule.simulate_pipeline_decoding`) fed with each stage's
  measured compute per step in B's last round and the stage that decided each token: B's latency with free
  communication and no per-token overhead on rank 0.

Printed per threshold: median ms per generated token of each, the ratios, the share of tokens that left at the
exit, and whether B's tokens equal A's.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=12)
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--vocab", type=int, default=4096)
    parser.add_argument("--prompt-length", type=int, default=16)
    parser.add_argument("--new-tokens", type=int, default=48)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--head-scale", type=float, default=30.0, help="exit head weights are multiplied by this")
    parser.add_argument("--worker", type=Path, default=None, help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def make_model(args: argparse.Namespace, out: Path) -> None:
    import torch

    from eellm_hf import EarlyExitGPTConfig, EarlyExitGPTForCausalLM

    torch.manual_seed(0)
    config = EarlyExitGPTConfig(
        vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=args.hidden * 8 // 3 // 64 * 64,
        num_hidden_layers=args.layers, num_attention_heads=max(args.hidden // 64, 1), max_position_embeddings=1024,
        exit_layers=[args.layers // 2], bos_token_id=None, eos_token_id=None, pad_token_id=None,
    )
    model = EarlyExitGPTForCausalLM(config).eval()
    with torch.no_grad():
        model.exit_lm_heads[0].weight.mul_(args.head_scale)
    model.save_pretrained(out)


def worker(args: argparse.Namespace) -> None:
    import torch

    from eellm_hf import EarlyExitGPTForCausalLM
    from eellm_hf.pipeline_decoding import PipelineEarlyExitGPT, PipelineStage
    from eellm_hf.trainer.schedule import simulate_pipeline_decoding

    step_seconds: list[float] = []  # this rank's PipelineStage.run durations, in order
    original_run = PipelineStage.run

    def timed_run(self, *a, **k):
        start = time.perf_counter()
        try:
            return original_run(self, *a, **k)
        finally:
            step_seconds.append(time.perf_counter() - start)

    PipelineStage.run = timed_run
    half = args.layers // 2
    pipeline = PipelineEarlyExitGPT.from_pretrained(args.worker, pp=2, layer_split=[half, args.layers - half])
    if not pipeline.is_first:
        pipeline.serve()
        torch.distributed.gather_object(step_seconds, None, dst=0)
        return

    single = EarlyExitGPTForCausalLM.from_pretrained(args.worker).eval()
    prompt = torch.randint(0, args.vocab, (1, args.prompt_length), generator=torch.Generator().manual_seed(1))
    common = dict(max_new_tokens=args.new_tokens, do_sample=False,
                  return_dict_in_generate=True)

    torch.set_num_threads(1)
    full = pipeline.generate(prompt, **common)
    with torch.no_grad():  # the exit's confidence along a full-depth text
        exit_logits = single(full.sequences).exit_logits[0][0, args.prompt_length - 1:-1]
    median_confidence = exit_logits.double().softmax(-1).amax(-1).median().item()

    calls: list[dict] = []  # every pipeline call: its kind, threshold and where its steps start in step_seconds

    def run(kind: str, threshold: float | None) -> tuple[float, object]:
        settings = {} if threshold is None else {"early_exit_threshold": threshold}
        if kind.startswith("single"):
            torch.set_num_threads(1 if kind == "single_1thread" else 2)
            model_generate = single.generate
        else:
            torch.set_num_threads(1)
            model_generate = pipeline.generate
            calls.append({"kind": kind, "threshold": threshold, "first_step": len(step_seconds)})
        start = time.perf_counter()
        output = model_generate(prompt, **common, **settings)
        elapsed = time.perf_counter() - start
        if not kind.startswith("single"):
            calls[-1]["exit_layers"] = output.exit_layers[0].tolist()
        return elapsed / (output.sequences.shape[1] - args.prompt_length), output

    results = []
    for threshold in (0.0, median_confidence):
        times: dict[str, list[float]] = {"single": [], "pipeline": [], "pipeline_full": [], "single_1thread": []}
        outputs = {}
        for _ in range(args.rounds):
            for kind in ("single", "pipeline", "pipeline_full", "single_1thread", "single_1thread", "pipeline_full",
                         "pipeline", "single"):
                seconds, output = run(kind, None if kind == "pipeline_full" else threshold)
                times[kind].append(seconds)
                outputs[kind] = output
        results.append({"threshold": threshold, "times": {k: statistics.median(v) for k, v in times.items()},
                        "exit_share": (outputs["pipeline"].exit_layers == half).float().mean().item(),
                        "same_tokens": torch.equal(outputs["pipeline"].sequences, outputs["single"].sequences),
                        "call": len(calls) - 1})  # B's last call of this threshold
    pipeline.close()
    gathered: list = [None, None]
    torch.distributed.gather_object(step_seconds, gathered, dst=0)
    for result in results:
        call = calls[result["call"]]
        steps = len(call["exit_layers"])
        first = call["first_step"]
        costs = [[gathered[0][first + t], gathered[1][first + t]] for t in range(steps)]
        stages = [0 if layer <= half else 1 for layer in call["exit_layers"]]
        result["times"]["ideal"] = simulate_pipeline_decoding(costs, stages) / steps
        del result["call"]
    print("RESULT " + json.dumps(results), flush=True)


def main() -> None:
    args = parse_args()
    if args.worker is not None:
        worker(args)
        return
    with tempfile.TemporaryDirectory(prefix="bench_pipeline_") as tmp:
        model_dir = Path(tmp) / "model"
        make_model(args, model_dir)
        env = dict(os.environ, OMP_NUM_THREADS="1",
                   PYTHONPATH=os.pathsep.join(p for p in (str(REPO_ROOT), os.environ.get("PYTHONPATH")) if p))
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", __file__,
               "--worker", str(model_dir), *sys.argv[1:]]
        out = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)
    lines = [line[7:] for line in out.stdout.splitlines() if line.startswith("RESULT ")]
    if out.returncode != 0 or not lines:
        raise SystemExit(f"benchmark workers failed:\n{out.stdout[-3000:]}\n{out.stderr[-3000:]}")
    print(f"pp=2, {args.layers} layers (hidden {args.hidden}, vocabulary {args.vocab}), exit after layer "
          f"{args.layers // 2} (the stage boundary), batch 1, {args.new_tokens} greedy tokens, median of "
          f"{2 * args.rounds} runs each (A B C A1 A1 C B A), ms per generated token")
    print(f"{'threshold':>9} {'exit share':>10} {'A single':>9} {'A1 1 thr':>8} {'B pipe':>7} {'C pipe full':>11}"
          f" {'ideal':>6} {'B/A':>5} {'B/A1':>5} {'B/C':>5} {'B/ideal':>7} {'same tokens':>11}")
    for r in json.loads(lines[0]):
        t = {k: v * 1e3 for k, v in r["times"].items()}
        print(f"{r['threshold']:>9.3f} {r['exit_share']:>10.2f} {t['single']:>9.2f} {t['single_1thread']:>8.2f} "
              f"{t['pipeline']:>7.2f} {t['pipeline_full']:>11.2f} {t['ideal']:>6.2f} "
              f"{t['pipeline'] / t['single']:>5.2f} {t['pipeline'] / t['single_1thread']:>5.2f} "
              f"{t['pipeline'] / t['pipeline_full']:>5.2f} {t['pipeline'] / t['ideal']:>7.2f} "
              f"{str(r['same_tokens']):>11}")


if __name__ == "__main__":
    main()
