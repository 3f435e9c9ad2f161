"""``eellm-calibrate``: the fastest early-exit threshold that keeps a quality target, with a statistical guarantee.

    eellm-calibrate MODEL_DIR --data prompts.txt --prompts 200 --target-agreement 0.95 --delta 0.1 [--write]
    eellm-calibrate MODEL_DIR --target-task kjv_completion --target-metric rougeL --max-drop 0.01 --delta 0.1

This is Learn-then-Test (Angelopoulos et al. 2021; used for early exit by CALM, Schuster et al. 2022). Each
calibration prompt is generated greedily at full depth and at every candidate threshold (as ``eellm-sweep`` does,
timed in A B B A pairs), giving a per-prompt loss in [0, 1] for each threshold:

* ``--target-agreement A``: the loss is 1 - the prompt's token agreement with full depth (matching positions over
  the longer of the two outputs, free-running); the risk to control is ``alpha = 1 - A``, so the guarantee is on
  the expected per-prompt agreement.
* ``--target-task T --target-metric M --max-drop D``: the loss is ``(M(full depth) - M(threshold) + 1) / 2`` of
  each document of the lm-eval task (M must lie in [0, 1], e.g. ROUGE-L or exact match); ``alpha = (D + 1) / 2``,
  i.e. the expected drop of M is at most D.

Each threshold's null hypothesis "its risk exceeds alpha" gets the Hoeffding-Bentkus p-value of the mean loss over
the n prompts (valid for any loss bounded in [0, 1], prompts drawn independently from the distribution the
guarantee is about). Thresholds are tested in a fixed sequence from strict (1.0) to loose, each at level
``delta``; the search stops at the first one that fails. Every threshold before it is then valid at once with
probability >= 1 - delta, and the loosest of them (the fastest) is chosen. ``--write`` stores it as
``early_exit_threshold`` in the model's ``generation_config.json``.

Output (``--out``): ``calibration.json``, ``calibration.png`` (agreement or metric and its confidence bound against
the threshold, with the speedup).
"""

from __future__ import annotations

import argparse
import json
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from eellm_hf.eval.sweep import (
    Generation,
    PromptSet,
    _cut,
    check_settings,
    load_prompts_file,
    load_task,
    prompt_agreements,
    run_sweep,
)
from eellm_hf.host_memory import keep_freed_memory
from eellm_hf.modeling.early_exit_settings import check_threshold
from eellm_hf.modeling.loading import DTYPES, load_model, load_tokenizer

DEFAULT_THRESHOLDS: list[float] = [round(1.0 - 0.05 * step, 2) for step in range(21)]


# --------------------------------------------------------------------------------------------------- statistics


def binomial_cdf(k: int, n: int, p: float) -> float:
    """P(Bin(n, p) <= k), summed in log space."""
    if k < 0:
        return 0.0
    if k >= n or p <= 0.0:
        return 1.0
    if p >= 1.0:
        return 0.0
    log_p, log_q = math.log(p), math.log1p(-p)
    terms = [math.lgamma(n + 1) - math.lgamma(i + 1) - math.lgamma(n - i + 1) + i * log_p + (n - i) * log_q
             for i in range(k + 1)]
    top = max(terms)
    return min(1.0, math.exp(top) * sum(math.exp(term - top) for term in terms))


def hoeffding_bentkus_p_value(mean_loss: float, n: int, alpha: float) -> float:
    """p-value of "risk > alpha" given the mean of n independent losses in [0, 1] (Bates et al. 2021, eq. 4.8)."""
    if not 0.0 < alpha < 1.0:
        raise ValueError(f"alpha must be in (0, 1), got {alpha}.")
    if mean_loss >= alpha:
        return 1.0
    a = mean_loss
    h1 = (a * math.log(a / alpha) if a > 0 else 0.0) + (1 - a) * math.log((1 - a) / (1 - alpha))
    hoeffding = math.exp(-n * h1)
    bentkus = math.e * binomial_cdf(math.ceil(n * mean_loss - 1e-9), n, alpha)
    return min(1.0, hoeffding, bentkus)


def risk_upper_bound(mean_loss: float, n: int, delta: float) -> float:
    """The smallest risk level that the test above rejects at ``delta`` (a 1 - delta upper confidence bound)."""
    low, high = mean_loss, 1.0
    if hoeffding_bentkus_p_value(mean_loss, n, min(high, 1 - 1e-12)) > delta:
        return 1.0
    for _ in range(60):
        middle = (low + high) / 2
        if middle > 0 and hoeffding_bentkus_p_value(mean_loss, n, middle) <= delta:
            high = middle
        else:
            low = middle
    return high


def learn_then_test(losses: Sequence[Sequence[float]], alpha: float, delta: float) -> tuple[int | None, list[float]]:
    """Fixed-sequence testing over candidates ordered strict to loose (``losses[j]``: per-prompt losses of
    candidate j). Returns the index of the last candidate before the first failure (None if the first fails)
    and every candidate's p-value."""
    chosen, p_values, failed = None, [], False
    for index, candidate in enumerate(losses):
        if not candidate:
            raise ValueError("A candidate has no calibration losses.")
        if any(not 0.0 <= loss <= 1.0 for loss in candidate):
            raise ValueError(f"Losses must lie in [0, 1], got {min(candidate)}..{max(candidate)}.")
        p_value = hoeffding_bentkus_p_value(sum(candidate) / len(candidate), len(candidate), alpha)
        p_values.append(p_value)
        if not failed and p_value <= delta:
            chosen = index
        else:
            failed = True
    return chosen, p_values


# ------------------------------------------------------------------------------------------------- calibration


@dataclass
class CalibrationPoint:
    """One candidate threshold: its quality on the calibration prompts, the bound, the test and the speed."""

    threshold: float
    agreement: float  # pooled over tokens, as eellm-sweep reports it
    quality: float  # mean per-prompt agreement, or the mean metric of the task
    quality_bound: float  # 1 - delta lower confidence bound of `quality` (from the risk's upper bound)
    p_value: float
    passed: bool
    speedup: float
    mean_exit_layer: float | None


def prompt_losses(prompt_set: PromptSet, tokenizer: Any, outputs: dict[float | None, Generation],
                  threshold: float, metric: str | None) -> list[float]:
    """Per-prompt losses in [0, 1] of one threshold against full depth (see the module docstring)."""
    if metric is None:
        return [1.0 - value for value in prompt_agreements(outputs[threshold].tokens, outputs[None].tokens)]
    full, own = (_metric_values(prompt_set, tokenizer, outputs[key], metric) for key in (None, threshold))
    return [(f - o + 1.0) / 2.0 for f, o in zip(full, own)]


def _metric_values(prompt_set: PromptSet, tokenizer: Any, generation: Generation, metric: str) -> list[float]:
    texts = [_cut(tokenizer.decode(row, skip_special_tokens=True), prompt_set.stop) for row in generation.tokens]
    values = prompt_set.score_each(prompt_set.prompts, texts)
    if metric not in values:
        raise SystemExit(f"eellm-calibrate: task {prompt_set.name!r} has no metric {metric!r} (it has "
                         f"{sorted(values)}).")
    scores = [float(value) for value in values[metric]]
    if any(not 0.0 <= value <= 1.0 for value in scores):
        raise SystemExit(f"eellm-calibrate: --target-metric {metric!r} must lie in [0, 1] per document to bound "
                         "its drop; pick a metric such as rougeL or exact_match.")
    return scores


def calibrate(model: Any, tokenizer: Any, prompt_set: PromptSet, thresholds: Sequence[float], alpha: float,
              delta: float, max_new_tokens: int, batch_size: int = 8, metric: str | None = None,
              early_exit_kwargs: dict[str, Any] | None = None, repeats: int = 1) -> dict[str, Any]:
    """Generate, test every threshold from strict to loose, and choose (see the module docstring)."""
    ordered = sorted(set(thresholds), reverse=True)
    outputs: dict[float | None, Generation] = {}
    rows = run_sweep(model, tokenizer, prompt_set, ordered, max_new_tokens, batch_size, early_exit_kwargs,
                     repeats=repeats, outputs=outputs)
    losses = [prompt_losses(prompt_set, tokenizer, outputs, threshold, metric) for threshold in ordered]
    chosen, p_values = learn_then_test(losses, alpha, delta)
    n = len(prompt_set.prompts)
    full_quality = 1.0 if metric is None else sum(_metric_values(prompt_set, tokenizer, outputs[None], metric)) / n
    points = []
    for index, (threshold, row, candidate) in enumerate(zip(ordered, rows[1:], losses)):
        mean_loss = sum(candidate) / n
        bound = risk_upper_bound(mean_loss, n, delta)
        if metric is None:
            quality, quality_bound = 1.0 - mean_loss, 1.0 - bound
        else:  # loss = (drop + 1) / 2: back to the metric
            quality, quality_bound = full_quality - (2 * mean_loss - 1), full_quality - (2 * bound - 1)
        points.append(CalibrationPoint(threshold, row["agreement"], quality, quality_bound, p_values[index],
                                       chosen is not None and index <= chosen, row["speedup"],
                                       row["mean_exit_layer"]))
    return {"alpha": alpha, "delta": delta, "num_prompts": n, "metric": metric or "agreement",
            "full_depth_quality": full_quality, "threshold": ordered[chosen] if chosen is not None else None,
            "points": [asdict(point) for point in points]}


def plot_calibration(result: dict[str, Any], target: float, path: Path, title: str) -> None:
    """Quality and its lower confidence bound against the threshold, the target, and the speedup."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    points = result["points"]
    thresholds = [point["threshold"] for point in points]
    fig, ax = plt.subplots(figsize=(6.4, 4.4))
    ax.plot(thresholds, [point["quality"] for point in points], "o-", label=f"{result['metric']} (calibration)")
    ax.plot(thresholds, [point["quality_bound"] for point in points], "s--",
            label=f"lower bound, 1 - delta = {1 - result['delta']:g}")
    ax.axhline(target, color="red", linewidth=0.8, label=f"target {target:g}")
    if result["threshold"] is not None:
        ax.axvline(result["threshold"], color="green", linewidth=0.8, label=f"chosen {result['threshold']:g}")
    ax.invert_xaxis()
    ax.set_xlabel("early-exit threshold (tested from strict to loose)")
    ax.set_ylabel(result["metric"])
    speed = ax.twinx()
    speed.plot(thresholds, [point["speedup"] for point in points], "^:", color="grey", label="speedup")
    speed.set_ylabel("speedup against full depth (paired, per token)")
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="lower left")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_threshold(model_dir: Path, threshold: float) -> Path:
    """Store ``early_exit_threshold`` in the model folder's ``generation_config.json`` (other fields kept)."""
    from transformers import GenerationConfig

    path = model_dir / "generation_config.json"
    config = GenerationConfig.from_pretrained(model_dir) if path.exists() else GenerationConfig()
    config.early_exit_threshold = threshold
    config.save_pretrained(model_dir)
    return path


# -------------------------------------------------------------------------------------------------------- CLI


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="eellm-calibrate",
        description="Choose the fastest early-exit threshold whose quality meets a target with probability "
                    ">= 1 - delta (Learn-then-Test).")
    parser.add_argument("model_dir", type=Path, help="an EarlyExitGPT folder (weights and tokenizer)")
    parser.add_argument("--data", type=Path, help="calibration prompts: one per line, or .jsonl with 'text'")
    parser.add_argument("--prompts", type=int, default=None, help="use the first N prompts (default: all)")
    parser.add_argument("--target-agreement", type=float, default=None,
                        help="expected token agreement with full depth to guarantee, in (0, 1]")
    parser.add_argument("--target-task", default=None, help="a generate_until lm-eval task instead of --data")
    parser.add_argument("--target-metric", default=None, help="its per-document metric in [0, 1], e.g. rougeL")
    parser.add_argument("--max-drop", type=float, default=None, help="largest expected drop of that metric")
    parser.add_argument("--include-path", default=None, help="extra lm-eval task folder (default: the kjv pack)")
    parser.add_argument("--delta", type=float, default=0.1, help="allowed failure probability, in (0, 1)")
    parser.add_argument("--thresholds", type=float, nargs="+", default=DEFAULT_THRESHOLDS,
                        help="candidate thresholds in [0, 1] (tested from strict to loose)")
    parser.add_argument("--max-new-tokens", type=int, default=None, help="default: the task's, else 32")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=1, help="timing rounds for the printed speedup")
    parser.add_argument("--exit-confidence", default="max_prob", choices=("max_prob", "top2_margin"))
    parser.add_argument("--dtype", default="float32", choices=sorted(DTYPES))
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--out", type=Path, default=Path("eellm_calibration"), help="output folder")
    parser.add_argument("--write", action="store_true",
                        help="store the chosen threshold in MODEL_DIR/generation_config.json")
    return parser


def _check_args(args: argparse.Namespace) -> tuple[float, float, float]:
    """Validate; return (alpha, target shown in the plot, delta)."""
    def fail(message: str) -> None:
        raise SystemExit(f"eellm-calibrate: {message}")

    by_task = args.target_task is not None
    if by_task == (args.data is not None):
        fail("give either --data FILE (token agreement) or --target-task TASK (an lm-eval metric)")
    if not 0.0 < args.delta < 1.0:
        fail(f"--delta must be in (0, 1), got {args.delta}")
    if args.prompts is not None and args.prompts < 1:
        fail(f"--prompts must be >= 1, got {args.prompts}")
    try:
        for threshold in args.thresholds:
            check_threshold(threshold)
    except ValueError as exc:
        fail(f"--thresholds: {exc}")
    if by_task:
        if args.target_metric is None or args.max_drop is None:
            fail("--target-task needs --target-metric and --max-drop")
        if not 0.0 <= args.max_drop < 1.0:
            fail(f"--max-drop must be in [0, 1), got {args.max_drop}")
        return (args.max_drop + 1.0) / 2.0, args.max_drop, args.delta
    if args.target_agreement is None:
        fail("--data needs --target-agreement")
    if not 0.0 < args.target_agreement <= 1.0:
        fail(f"--target-agreement must be in (0, 1], got {args.target_agreement}")
    if args.target_agreement == 1.0:
        fail("--target-agreement 1.0 cannot be guaranteed from a finite sample; use early_exit_mode="
             "'speculative' for output identical to full depth")
    return 1.0 - args.target_agreement, args.target_agreement, args.delta


def calibrate_from_args(argv: list[str] | None = None) -> dict[str, Any]:
    """Run ``eellm-calibrate`` on ``argv``; returns what ``calibration.json`` holds."""
    args = build_parser().parse_args(argv)
    alpha, target, delta = _check_args(args)

    if args.target_task is not None:
        prompt_set = load_task(args.target_task, args.prompts, args.include_path)
    else:
        if not args.data.is_file():
            raise SystemExit(f"eellm-calibrate: --data {args.data} is not a file")
        try:
            prompt_set = load_prompts_file(args.data, args.prompts)
        except ValueError as error:
            raise SystemExit(f"eellm-calibrate: {error}") from None
    config_path = args.model_dir / "config.json"
    if not config_path.is_file():
        raise SystemExit(f"eellm-calibrate: {args.model_dir} has no config.json")
    if not json.loads(config_path.read_text()).get("exit_layers"):
        raise SystemExit(f"eellm-calibrate: {args.model_dir} has no early exits (config.exit_layers is empty)")

    tokenizer = load_tokenizer(args.model_dir)
    model = load_model(args.model_dir, args.dtype, args.device)
    check_settings("eellm-calibrate", model.config, {"exit_confidence": args.exit_confidence}, args.thresholds)
    max_new_tokens = args.max_new_tokens or prompt_set.max_new_tokens or 32
    result = calibrate(model, tokenizer, prompt_set, args.thresholds, alpha, delta, max_new_tokens,
                       args.batch_size, metric=args.target_metric if args.target_task else None,
                       early_exit_kwargs={"exit_confidence": args.exit_confidence}, repeats=args.repeats)
    result.update(model=str(args.model_dir), data=str(args.data or args.target_task), target=target,
                  max_new_tokens=max_new_tokens)

    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "calibration.json").write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    title = f"{args.model_dir.name}: {prompt_set.name}, {result['num_prompts']} prompts"
    plot_calibration(result, target, args.out / "calibration.png", title)

    name = result["metric"]
    print(f"{'threshold':>9} {name:>10} {'bound':>7} {'p-value':>8} {'speedup':>7}  (target {target:g}, "
          f"delta {delta:g}, {result['num_prompts']} prompts)")
    for point in result["points"]:
        mark = "ok" if point["passed"] else ""
        print(f"{point['threshold']:>9g} {point['quality']:>10.3f} {point['quality_bound']:>7.3f} "
              f"{point['p_value']:>8.3g} {point['speedup']:>6.2f}x  {mark}")
    if result["threshold"] is None:
        print("No threshold meets the target with this confidence (more prompts tighten the bound, "
              "or lower the target): the strictest candidate already fails.")
    else:
        print(f"chosen threshold: {result['threshold']:g}")
        if args.write:
            path = write_threshold(args.model_dir, result["threshold"])
            print(f"wrote early_exit_threshold={result['threshold']:g} to {path}")
    print(f"wrote {args.out / 'calibration.json'}, calibration.png")
    return result


def main(argv: list[str] | None = None) -> None:
    """``eellm-calibrate`` console entry point."""
    keep_freed_memory()
    calibrate_from_args(argv)


if __name__ == "__main__":
    main()


__all__ = [
    "CalibrationPoint",
    "binomial_cdf",
    "calibrate",
    "calibrate_from_args",
    "hoeffding_bentkus_p_value",
    "learn_then_test",
    "main",
    "risk_upper_bound",
    "write_threshold",
]
