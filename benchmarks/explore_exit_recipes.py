"""What makes exits confident sooner on a small CPU budget? Trains the demo's model under several recipes.

Every recipe trains the same number of optimizer steps (so a busy machine changes the wall time, not the
result) with the demo's trainer (nanotron, 2 processes, pp=2), then sweeps early-exit thresholds on the held-out
``kjv_completion`` prompts with ``eellm-sweep``'s paired timing (one round). Printed per recipe: validation loss
per head, and at each threshold the speedup against full depth, mean exit layer and token agreement with full depth.
Writes ``explore.json``, ``explore.md`` and ``explore.png`` (agreement against speedup, one curve per recipe)::

    python benchmarks/explore_exit_recipes.py --steps 100 --out runs/explore
    python benchmarks/explore_exit_recipes.py --recipes baseline tied_exit_heads --steps 40
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import sys
from dataclasses import replace
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from eellm_hf.demo.pretrain import PretrainDemo, PretrainDemoSettings  # noqa: E402


def _model(**changes: Any) -> dict[str, Any]:
    return {**PretrainDemoSettings().model, **changes}


RECIPES: dict[str, tuple[str, dict[str, Any]]] = {
    "baseline": ("the demo's defaults: exits after layers 2 and 4 with their own heads, weights 0.5/0.5", {}),
    "vocab_2048": ("a 2,048-token BPE vocabulary instead of 4,096 (more, easier tokens per word)",
                   {"vocab_size": 2048}),
    "tied_exit_heads": ("exits share the final head (tied to the embedding), as LayerSkip and CALM do",
                        {"model": _model(tie_exit_heads=True)}),
    "exit_cooldown": ("EE-LLM weight schedule: exit weights start at 1.0 and fall to 0.5 over the first half",
                      {"train_extra": {"exit_loss_weight_schedule": {"init": 1.0, "warmup_steps": "HALF"}}}),
    "exit_warmup": ("early-exit curriculum: exit weights start at 0 and rise to 0.5 over the first half",
                    {"train_extra": {"exit_loss_weight_schedule": {"init": 0.0, "warmup_steps": "HALF"}}}),
    "layer_dropout": ("LayerSkip's layer dropout: sequences skip layer l with rate 0.2 * (2^((l-1)/7) - 1)",
                      {"train_extra": {"layer_dropout": {"max_rate": 0.2}}}),
    "deeper_exits": ("exits after layers 3 and 5 (of 8) instead of 2 and 4", {"model": _model(exit_layers=[3, 5])}),
}
THRESHOLDS = (1.0, 0.9, 0.8, 0.7, 0.6, 0.4, 0.2, 0.0)


def recipe_settings(name: str, steps: int, prompts: int) -> PretrainDemoSettings:
    """The demo's settings changed by recipe ``name``, for a fixed number of steps."""
    changes = dict(RECIPES[name][1])
    extra = changes.pop("train_extra", {})
    schedule = extra.get("exit_loss_weight_schedule")
    if schedule and schedule.get("warmup_steps") == "HALF":
        extra = {**extra, "exit_loss_weight_schedule": {**schedule, "warmup_steps": steps // 2}}
    return replace(PretrainDemoSettings(), minutes=0.0, max_steps=steps, warmup_steps=min(10, steps // 5),
                   sweep_prompts=prompts, sweep_thresholds=THRESHOLDS, sweep_repeats=1,
                   train_extra={"val_interval": steps, "val_batches": 8, **extra}, **changes)


def run_recipe(name: str, out: Path, steps: int, prompts: int, data: dict[int, tuple[Path, dict]]) -> dict[str, Any]:
    """Train and sweep one recipe (reusing its finished phases); returns its summary."""
    settings = recipe_settings(name, steps, prompts)
    demo = PretrainDemo(out / name, settings)
    if settings.vocab_size not in data:
        shared = PretrainDemo(out / f"data_{settings.vocab_size}", settings)
        marker = shared.out / "data.json"
        if not marker.exists():
            shared.data_dir = shared.out
            shared.out.mkdir(parents=True, exist_ok=True)
            marker.write_text(json.dumps(shared.data()))
        data[settings.vocab_size] = (shared.out, json.loads(marker.read_text()))
    demo.data_dir, demo.results["data"] = data[settings.vocab_size]
    bytes_per_token = _bytes_per_token(demo.data_dir)
    for phase in ("train", "sweep"):
        marker = demo.out / f"{phase}.json"
        if marker.exists():
            demo.results[phase] = json.loads(marker.read_text())
            continue
        demo.results[phase] = getattr(demo, phase)()
        marker.parent.mkdir(parents=True, exist_ok=True)
        marker.write_text(json.dumps(demo.results[phase], indent=2))
    train, sweep = demo.results["train"], demo.results["sweep"]
    val = train["final_validation"] or {}
    return {
        "recipe": name,
        "description": RECIPES[name][0],
        "steps": train["steps"],
        "tokens_per_s": train["tokens_per_s"],
        "exit_layers": train["final_train"]["exit_layers"],
        "validation_loss_per_head": val.get("exit_losses"),
        "bytes_per_token": bytes_per_token,
        "validation_bits_per_byte": [loss / math.log(2) / bytes_per_token for loss in val.get("exit_losses", [])],
        "sweep": [{key: row[key] for key in ("threshold", "speedup", "mean_exit_layer", "agreement")}
                  | {"rougeL": row.get("rougeL")} for row in sweep["runs"]],
    }


@functools.cache
def _bytes_per_token(data_dir: Path) -> float:
    """UTF-8 bytes per token of the corpus under its tokenizer (to compare losses across vocabularies)."""
    from transformers import AutoTokenizer

    text = (data_dir / "kjv.txt").read_text(encoding="utf-8")
    tokenizer = AutoTokenizer.from_pretrained(data_dir / "tokenizer")
    lines = text.splitlines()
    tokens = sum(len(ids) for ids in tokenizer(lines)["input_ids"])
    return len("\n".join(lines).encode("utf-8")) / tokens


def best_speedup(summary: dict[str, Any], min_agreement: float) -> tuple[float, float | None]:
    """The fastest threshold whose agreement with full depth is at least ``min_agreement``."""
    rows = [row for row in summary["sweep"] if row["threshold"] is not None and row["agreement"] >= min_agreement]
    if not rows:
        return 1.0, None
    best = max(rows, key=lambda row: row["speedup"])
    return best["speedup"], best["threshold"]


def write_outputs(out: Path, summaries: list[dict[str, Any]]) -> None:
    """``explore.json``, ``explore.md`` and ``explore.png``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    (out / "explore.json").write_text(json.dumps(summaries, indent=2) + "\n")
    lines = ["| recipe | validation bits/byte per head (exits, final) | ROUGE-L full depth | mean exit layer @0.8 "
             "| agreement @0.8 | speedup @0.8 | best speedup, agreement >= 0.9 |", "|---|---|---|---|---|---|---|"]
    fig, (ax, depth_ax) = plt.subplots(1, 2, figsize=(12.0, 4.6))
    for summary in summaries:
        at = {row["threshold"]: row for row in summary["sweep"]}
        row = at.get(0.8, {})
        speedup, threshold = best_speedup(summary, 0.9)
        losses = [round(x, 3) for x in summary["validation_bits_per_byte"]]
        full_rouge = at[None]["rougeL"]
        lines.append(f"| {summary['recipe']} | {losses} | {full_rouge:.3f} | "
                     f"{row.get('mean_exit_layer', float('nan')):.2f} | "
                     f"{row.get('agreement', float('nan')):.3f} | {row.get('speedup', float('nan')):.2f}x | "
                     f"{speedup:.2f}x (threshold {threshold}) |")
        points = [r for r in summary["sweep"] if r["threshold"] is not None]
        ax.plot([r["speedup"] for r in points], [r["agreement"] for r in points], "o-", label=summary["recipe"],
                markersize=3)
        depth_ax.plot([r["threshold"] for r in points], [r["mean_exit_layer"] for r in points], "o-",
                      label=summary["recipe"], markersize=3)
    ax.axvline(1.0, color="grey", linewidth=0.5)
    ax.set_xlabel("speedup against full depth (paired wall clock)")
    ax.set_ylabel("token agreement with full depth")
    ax.set_title("Early-exit recipes, same steps each (thresholds 1.0 .. 0.0)", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    depth_ax.set_xlabel("early-exit threshold")
    depth_ax.set_ylabel("mean exit layer (lower: exits confident more often)")
    depth_ax.invert_xaxis()
    depth_ax.set_title("How deep tokens go, per threshold", fontsize=10)
    depth_ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out / "explore.png", dpi=120)
    plt.close(fig)
    (out / "explore.md").write_text("\n".join(lines) + "\n")
    print(lines[-1], flush=True)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--recipes", nargs="+", default=list(RECIPES), choices=list(RECIPES))
    parser.add_argument("--steps", type=int, default=100, help="optimizer steps per recipe (32 x 128 tokens each)")
    parser.add_argument("--prompts", type=int, default=16, help="held-out kjv_completion prompts in each sweep")
    parser.add_argument("--out", type=Path, default=Path("runs/explore"))
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    data: dict[int, tuple[Path, dict]] = {}
    summaries = []
    for name in args.recipes:
        print(f"== {name}: {RECIPES[name][0]}", flush=True)
        summaries.append(run_recipe(name, args.out.resolve(), args.steps, args.prompts, data))
        write_outputs(args.out, summaries)
    print((args.out / "explore.md").read_text())


if __name__ == "__main__":
    main()
