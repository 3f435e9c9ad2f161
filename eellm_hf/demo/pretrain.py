"""``make demo-pretrain`` / ``python -m eellm_hf.demo.pretrain``: an early-exit model trained from scratch.

Phases (each leaves its result under ``runs/demo-pretrain/``; a rerun reuses the phases that finished):

1. ``data``: the King James Bible minus the books held out for evaluation, and a byte-level BPE tokenizer;
2. ``train``: the nanotron trainer on 2 processes at pp=2 (``torchrun``) for a time budget, exporting an HF
   folder at the end;
3. ``generate``: a few prompts with early exit, showing the layer that produced each token, and the speedup
   against full depth measured side by side;
4. ``evaluate``: lm-eval on the offline KJV task pack (``eellm_hf/eval/tasks``), at full depth, per exit and
   with early exit;
5. ``sweep``: speed against quality over thresholds 1.0 .. 0.0 (CSV, JSON and plots);
6. ``report``: ``report.md`` with the figures and plots.
"""

from __future__ import annotations

import json
import statistics
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from .phases import (
    Phase,
    PhaseRunner,
    colored_generation,
    demo_main,
    fmt,
    lm_eval_runs,
    lm_eval_table,
    load_model,
    sample_lines,
    sweep_table,
    torchrun_trainer,
)

DEFAULT_PROMPTS = (
    "And God said unto Moses,",
    "The LORD is my shepherd;",
    "And it came to pass, when the king",
    "Blessed are the",
)


@dataclass
class PretrainDemoSettings:
    """What the demo trains and measures. The defaults are the ``make demo`` run; :meth:`smoke` is a tiny one."""

    minutes: float = 5.0
    max_steps: int = 100_000
    vocab_size: int = 4096
    model: dict[str, Any] = field(default_factory=lambda: dict(
        hidden_size=256, intermediate_size=688, num_hidden_layers=8, num_attention_heads=4, num_key_value_heads=4,
        max_position_embeddings=256, tie_word_embeddings=True, tie_exit_heads=False,
        exit_layers=[2, 4], exit_loss_weights=[0.5, 0.5],
    ))
    seq_len: int = 128
    global_batch_size: int = 32
    micro_batch_size: int = 8
    lr: float = 2.0e-3
    warmup_steps: int = 10
    train_extra: dict[str, Any] = field(default_factory=dict)  # more ``train:`` keys (e.g. a weight schedule)
    eval_limit: int = 16
    new_tokens: int = 48
    threshold: float = 0.8
    sweep_prompts: int = 16
    sweep_repeats: int = 2
    sweep_thresholds: tuple[float, ...] = (1.0, 0.9, 0.8, 0.6, 0.4, 0.2, 0.0)

    @classmethod
    def from_args(cls, args: Any) -> PretrainDemoSettings:
        return cls(minutes=args.minutes)

    @classmethod
    def smoke(cls, args: Any = None) -> PretrainDemoSettings:
        """A few seconds of everything, for tests."""
        return cls(minutes=0.0, max_steps=4, vocab_size=512, seq_len=32, global_batch_size=8, micro_batch_size=2,
                   warmup_steps=1,
                   model=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=4, num_attention_heads=2,
                              max_position_embeddings=64, tie_word_embeddings=True, exit_layers=[1, 2],
                              exit_loss_weights=[0.5, 0.5]),
                   eval_limit=2, new_tokens=4, sweep_prompts=2, sweep_thresholds=(1.0, 0.0))


class PretrainDemo(PhaseRunner):
    """Runs the phases in order, skipping those whose result file exists."""

    def __init__(self, out: Path, settings: PretrainDemoSettings):
        super().__init__(out, settings)
        self.data_dir = self.out / "data"
        self.model_dir = self.out / "model"

    def phases(self) -> list[Phase]:
        return [("data", self.data), ("train", self.train), ("generate", self.generate),
                ("evaluate", self.evaluate), ("sweep", self.sweep), ("report", self.report)]

    def _train_config(self, run_dir: Path) -> Path:
        settings = self.settings
        train = {"steps": settings.max_steps, "global_batch_size": settings.global_batch_size,
                 "micro_batch_size": settings.micro_batch_size, "lr": settings.lr, "min_lr": settings.lr / 10,
                 "warmup_steps": settings.warmup_steps, "weight_decay": 0.01, "seed": 0,
                 "val_interval": 50, "val_batches": 2, **settings.train_extra}
        if settings.minutes:
            train["time_budget_minutes"] = settings.minutes
        config = {
            "model": {**settings.model, "vocab_size": self.results["data"]["vocab_size"],
                      "bos_token_id": 0, "eos_token_id": 0, "pad_token_id": 1},
            "parallelism": {"tp": 1, "pp": 2, "dp": 1},
            "data": {"files": [str(self.data_dir / "kjv.txt")], "tokenizer": str(self.data_dir / "tokenizer"),
                     "seq_len": settings.seq_len, "validation_sequences": 2 * settings.global_batch_size,
                     "shuffle_seed": 0},
            "train": train,
            "run_dir": str(run_dir),
            "export_hf": str(self.model_dir),
        }
        path = run_dir / "config.yaml"
        run_dir.mkdir(parents=True, exist_ok=True)
        path.write_text(yaml.safe_dump(config, sort_keys=False))
        return path

    # -- phases -----------------------------------------------------------------------------------------------
    def data(self) -> dict[str, Any]:
        from ..trainer.data import train_bpe_tokenizer, write_bible_corpus

        corpus = write_bible_corpus(self.data_dir / "kjv.txt")
        tokenizer = train_bpe_tokenizer([corpus], self.settings.vocab_size, self.data_dir / "tokenizer")
        return {"corpus": str(corpus), "corpus_bytes": corpus.stat().st_size, "vocab_size": len(tokenizer)}

    def train(self) -> dict[str, Any]:
        from ..trainer.metrics import read_metrics

        run_dir = self.out / "train"
        torchrun_trainer(self._train_config(run_dir))
        train_rows = read_metrics(run_dir, split="train")
        val_rows = read_metrics(run_dir, split="validation")
        steps = train_rows[-1]["step"]
        return {"steps": steps, "tokens": steps * self.settings.global_batch_size * self.settings.seq_len,
                "tokens_per_s": statistics.median(row["tokens_per_s"] for row in train_rows),
                "final_train": train_rows[-1], "final_validation": val_rows[-1] if val_rows else None}

    def generate(self) -> dict[str, Any]:
        model, tokenizer = load_model(self.model_dir)
        return colored_generation(model, tokenizer, DEFAULT_PROMPTS, self.settings.new_tokens,
                                  {"early_exit_threshold": self.settings.threshold})

    def evaluate(self) -> dict[str, Any]:
        config = json.loads((self.model_dir / "config.json").read_text())
        pack, scoring = ["kjv_pack"], ["kjv_perplexity", "kjv_cloze"]  # per-exit runs score loglikelihood only
        threshold = self.settings.threshold
        runs = {"full depth": ("", pack), f"early exit {threshold}": (f",early_exit_threshold={threshold}", pack)}
        runs |= {f"exit {layer}": (f",exit_layer={layer}", scoring) for layer in config["exit_layers"]}
        return lm_eval_runs(self.model_dir, runs, self.settings.eval_limit, "kjv_pack")

    def sweep(self) -> dict[str, Any]:
        from ..eval.sweep import sweep_from_args

        out = self.out / "sweep"
        summary = sweep_from_args([
            str(self.model_dir), "--task", "kjv_completion", "--limit", str(self.settings.sweep_prompts),
            "--max-new-tokens", str(self.settings.new_tokens), "--batch-size", "8", "--out", str(out),
            "--repeats", str(self.settings.sweep_repeats),
            "--thresholds", *map(str, self.settings.sweep_thresholds),
        ])
        return {"dir": str(out), "quality_metric": summary["quality_metric"], "runs": summary["runs"]}

    def report(self) -> dict[str, Any]:
        lines = write_report(self.out, self.results)
        return {"report": str(self.out / "report.md"), "lines": lines}


def write_report(out: Path, results: dict[str, Any]) -> int:
    """Write ``out/report.md`` from the phases' results; returns its number of lines."""
    data, train = results["data"], results["train"]
    gen, evaluation, sweep = results["generate"], results["evaluate"], results["sweep"]
    final = train["final_train"]
    val = train.get("final_validation") or {}
    lines = [
        "# eellm_hf demo report: an early-exit model trained from scratch",
        "",
        f"KJV training text: {data['corpus_bytes'] / 1e6:.1f} MB; BPE vocabulary {data['vocab_size']}.",
        f"Trained {train['steps']} steps ({train['tokens'] / 1e6:.2f}M tokens) on 2 processes at pp=2 "
        f"(~{train['tokens_per_s']:.0f} tokens/s).",
        f"Final training loss {fmt(final['loss'])} (weighted total); per head "
        f"(exits after layers {final['exit_layers']}, then the final head): training "
        f"{[round(x, 3) for x in final['exit_losses']]}, validation "
        f"{[round(x, 3) for x in val.get('exit_losses', [])]} nats/token.",
        "",
        "![training curves](train/metrics.png)",
        "",
        "## Early-exit generation",
        "",
        f"{gen['settings']}: speedup {gen['speedup']:.2f}x against full depth, "
        f"mean exit layer {gen['mean_exit_layer']:.2f}; tokens per exit {gen['tokens_per_exit']}.",
        "",
        *sample_lines(gen["samples"]),
        "", f"## lm-eval on the task pack (first {evaluation['limit']} documents per task)", "",
        "Per-exit rows score the loglikelihood tasks with that exit's head.", "",
        *lm_eval_table(evaluation),
        "", "## Speed against quality (kjv_completion)", "",
        "![speed and quality](sweep/speed_quality.png) ![exit layers](sweep/exit_histogram.png)", "",
        *sweep_table(sweep),
        "", f"Full table: `{Path(sweep['dir']).name}/sweep.csv`.",
    ]
    (out / "report.md").write_text("\n".join(lines) + "\n")
    return len(lines)


def main(argv: list[str] | None = None) -> None:
    demo_main(argv, prog="python -m eellm_hf.demo.pretrain", description=__doc__.split("\n\n")[0],
              settings_type=PretrainDemoSettings, runner_type=PretrainDemo, default_out="runs/demo-pretrain")


if __name__ == "__main__":
    main()
