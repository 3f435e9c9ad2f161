"""``make demo`` / ``python -m eellm_hf.demo``: the whole product end to end, on built-in defaults.

Phases (each leaves its result under ``runs/demo/``; a rerun reuses the phases that finished):

1. ``data``: the King James Bible minus the books held out for evaluation, and a byte-level BPE tokenizer;
2. ``train``: the nanotron trainer on 2 processes at pp=2 (``torchrun``) for a time budget, exporting an HF
   folder at the end;
3. ``generate``: a few prompts with early exit, showing the layer that produced each token, and the speedup
   against full depth measured side by side;
4. ``evaluate``: lm-eval on the offline task pack (``eellm_hf/eval/tasks``), at full depth, per exit and
   with early exit;
5. ``sweep``: speed against quality over thresholds 1.0 .. 0.0 (CSV, JSON and plots);
6. ``report``: ``runs/demo/report.md`` with the figures and plots.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import statistics
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

DEFAULT_PROMPTS = (
    "And God said unto Moses,",
    "The LORD is my shepherd;",
    "And it came to pass, when the king",
    "Blessed are the",
)


@dataclass
class DemoSettings:
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
    def smoke(cls) -> DemoSettings:
        """A few seconds of everything, for tests."""
        return cls(minutes=0.0, max_steps=4, vocab_size=512, seq_len=32, global_batch_size=8, micro_batch_size=2,
                   warmup_steps=1,
                   model=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=4, num_attention_heads=2,
                              max_position_embeddings=64, tie_word_embeddings=True, exit_layers=[1, 2],
                              exit_loss_weights=[0.5, 0.5]),
                   eval_limit=2, new_tokens=4, sweep_prompts=2, sweep_thresholds=(1.0, 0.0))


class Demo:
    """Runs the phases in order, skipping those whose result file exists."""

    def __init__(self, out: Path, settings: DemoSettings):
        self.out = out.resolve()
        self.settings = settings
        self.data_dir = self.out / "data"
        self.model_dir = self.out / "model"
        self.results: dict[str, Any] = {}

    # -- plumbing ---------------------------------------------------------------------------------------------
    def run(self) -> None:
        from tqdm.auto import tqdm

        phases: list[tuple[str, Callable[[], dict[str, Any]]]] = [
            ("data", self.data), ("train", self.train),
            ("generate", self.generate), ("evaluate", self.evaluate), ("sweep", self.sweep),
            ("report", self.report),
        ]
        self._check_settings()
        with tqdm(phases, desc="demo", unit="phase", file=sys.stdout) as bar:
            for name, phase in bar:
                bar.set_postfix_str(name)
                marker = self.out / f"{name}.json"
                if marker.exists():
                    self.results[name] = json.loads(marker.read_text())
                    tqdm.write(f"[demo] {name}: done before, reused ({marker})")
                    continue
                start = time.perf_counter()
                result = phase()
                result["seconds"] = round(time.perf_counter() - start, 1)
                self.results[name] = result
                tmp = marker.with_suffix(".json.tmp")
                tmp.write_text(json.dumps(result, indent=2))
                os.replace(tmp, marker)
                tqdm.write(f"[demo] {name}: {result['seconds']} s")
        print(f"\nReport: {self.out / 'report.md'}")

    def _check_settings(self) -> None:
        """Record the settings in ``settings.json``; refuse to reuse phases made with other settings."""
        self.out.mkdir(parents=True, exist_ok=True)
        path = self.out / "settings.json"
        current = json.loads(json.dumps(dataclasses.asdict(self.settings)))
        if path.exists():
            saved = json.loads(path.read_text())
            changed = {key: (saved.get(key), value) for key, value in current.items() if saved.get(key) != value}
            if changed:
                details = ", ".join(f"{key}: {old!r} there, {new!r} now" for key, (old, new) in changed.items())
                raise SystemExit(f"{self.out} holds a demo run made with other settings ({details}): pass another "
                                 f"--out, or remove {self.out} to start over.")
        else:
            path.write_text(json.dumps(current, indent=2))

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

    @staticmethod
    def _torchrun(config: Path) -> None:
        command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                   "-m", "eellm_hf.trainer", "--config", str(config)]
        env = {**os.environ, "OMP_NUM_THREADS": "1"}
        subprocess.run(command, check=True, env=env)

    # -- phases -----------------------------------------------------------------------------------------------
    def data(self) -> dict[str, Any]:
        from .trainer.data import train_bpe_tokenizer, write_bible_corpus

        corpus = write_bible_corpus(self.data_dir / "kjv.txt")
        tokenizer = train_bpe_tokenizer([corpus], self.settings.vocab_size, self.data_dir / "tokenizer")
        return {"corpus": str(corpus), "corpus_bytes": corpus.stat().st_size, "vocab_size": len(tokenizer)}

    def train(self) -> dict[str, Any]:
        from .trainer.metrics import read_metrics

        run_dir = self.out / "train"
        self._torchrun(self._train_config(run_dir))
        train_rows = read_metrics(run_dir, split="train")
        val_rows = read_metrics(run_dir, split="validation")
        steps = train_rows[-1]["step"]
        return {"steps": steps, "tokens": steps * self.settings.global_batch_size * self.settings.seq_len,
                "tokens_per_s": statistics.median(row["tokens_per_s"] for row in train_rows),
                "final_train": train_rows[-1], "final_validation": val_rows[-1] if val_rows else None}

    def _load_model(self):
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_pretrained(self.model_dir, trust_remote_code=True).eval()
        tokenizer = AutoTokenizer.from_pretrained(self.model_dir)
        return model, tokenizer

    def generate(self) -> dict[str, Any]:
        import torch
        from rich.console import Console
        from rich.text import Text

        from .modeling.early_exit_settings import mean_exit_layer

        threshold, new_tokens = self.settings.threshold, self.settings.new_tokens
        model, tokenizer = self._load_model()
        layers = [*model.config.exit_layers, model.config.num_hidden_layers]
        colors = ["bright_green", "yellow", "cyan", "magenta", "white"]
        console = Console()
        legend = Text("layer that produced each token: ")
        for index, layer in enumerate(layers):
            legend.append(f"[{layer}] ", style=colors[index % len(colors)])
        console.print(legend)
        samples, rounds = [], 3
        timings = {"full_depth": [0.0] * rounds, "early_exit": [0.0] * rounds}
        tokens = {"full_depth": [0] * rounds, "early_exit": [0] * rounds}
        with torch.inference_mode():
            for prompt in DEFAULT_PROMPTS:
                inputs = tokenizer(prompt, return_tensors="pt")
                common = dict(max_new_tokens=new_tokens, do_sample=False, pad_token_id=tokenizer.pad_token_id)
                model.generate(**inputs, **common)  # warm-up, both decoding loops
                model.generate(**inputs, **common, early_exit_threshold=threshold)
                for index in range(rounds):  # side by side, A B B A, alternating which side is A
                    pair = ("full_depth", "early_exit") if index % 2 == 0 else ("early_exit", "full_depth")
                    for name in (*pair, *reversed(pair)):
                        extra = dict(early_exit_threshold=threshold) if name == "early_exit" else {}
                        start = time.perf_counter()
                        output = model.generate(**inputs, **common, **extra, return_dict_in_generate=True)
                        timings[name][index] += time.perf_counter() - start
                        tokens[name][index] += output.sequences.shape[1] - inputs["input_ids"].shape[1]
                        if name == "early_exit":
                            out = output
                new = out.sequences[0, inputs["input_ids"].shape[1]:].tolist()
                exits = out.exit_layers[0].tolist()
                text = Text(prompt, style="bold")
                for token, layer in zip(new, exits):
                    text.append(tokenizer.decode([token]), style=colors[layers.index(layer) % len(colors)])
                console.print(text)
                samples.append({"prompt": prompt, "text": tokenizer.decode(new), "exit_layers": exits})
        def throughput(name: str, index: int) -> float:  # per generated token: the two may stop at other lengths
            return tokens[name][index] / timings[name][index]

        all_layers = [layer for sample in samples for layer in sample["exit_layers"]]
        result = {
            "threshold": threshold,
            "speedup": statistics.median(throughput("early_exit", i) / throughput("full_depth", i)
                                         for i in range(rounds)),
            "mean_exit_layer": mean_exit_layer(Counter(all_layers)),
            "tokens_per_exit": {str(layer): all_layers.count(layer) for layer in layers},
            "samples": samples,
        }
        console.print(f"threshold {threshold}: speedup {result['speedup']:.2f}x against full depth, "
                      f"mean exit layer {result['mean_exit_layer']:.2f} of {layers[-1]}")
        return result

    def evaluate(self) -> dict[str, Any]:
        from lm_eval.tasks import TaskManager

        from .eval.lm_eval_model import simple_evaluate
        from .eval.tasks import TASKS_DIR

        config = json.loads((self.model_dir / "config.json").read_text())
        pack, scoring = ["kjv_pack"], ["kjv_perplexity", "kjv_cloze"]  # per-exit runs score loglikelihood only
        runs = {"full depth": ("", pack), "early exit 0.8": (",early_exit_threshold=0.8", pack)}
        runs |= {f"exit {layer}": (f",exit_layer={layer}", scoring) for layer in config["exit_layers"]}
        scores = {}
        for name, (extra, tasks) in runs.items():
            results = simple_evaluate(
                model="eellm", model_args=f"pretrained={self.model_dir},dtype=float32{extra}",
                tasks=tasks, task_manager=TaskManager(include_path=str(TASKS_DIR), include_defaults=False),
                limit=self.settings.eval_limit, device="cpu", batch_size=8, log_samples=False, bootstrap_iters=0,
            )
            metrics = {
                task: {key.split(",")[0]: value for key, value in values.items()
                       if isinstance(value, float) and "stderr" not in key}
                for task, values in results["results"].items() if task != "kjv_pack"
            }
            scores[name] = {"metrics": metrics, "cost": results.get("eellm_cost", {})}
        return {"limit": self.settings.eval_limit, "runs": scores}

    def sweep(self) -> dict[str, Any]:
        from .eval.sweep import sweep_from_args

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


def _fmt(value: Any, digits: int = 3) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.{digits}f}" if math.isfinite(value) else "n/a"
    return str(value)


def write_report(out: Path, results: dict[str, Any]) -> int:
    """Write ``out/report.md`` from the phases' results; returns its number of lines."""
    data, train = results["data"], results["train"]
    gen, evaluation, sweep = results["generate"], results["evaluate"], results["sweep"]
    final = train["final_train"]
    val = train.get("final_validation") or {}
    lines = [
        "# eellm_hf demo report",
        "",
        f"KJV training text: {data['corpus_bytes'] / 1e6:.1f} MB; BPE vocabulary {data['vocab_size']}.",
        f"Trained {train['steps']} steps ({train['tokens'] / 1e6:.2f}M tokens) on 2 processes at pp=2 "
        f"(~{train['tokens_per_s']:.0f} tokens/s).",
        f"Final training loss {_fmt(final['loss'])} (weighted total); per head "
        f"(exits after layers {final['exit_layers']}, then the final head): training "
        f"{[round(x, 3) for x in final['exit_losses']]}, validation "
        f"{[round(x, 3) for x in val.get('exit_losses', [])]} nats/token.",
        "",
        "![training curves](train/metrics.png)",
        "",
        "## Early-exit generation",
        "",
        f"Threshold {gen['threshold']}: speedup {gen['speedup']:.2f}x against full depth, "
        f"mean exit layer {gen['mean_exit_layer']:.2f}; tokens per exit {gen['tokens_per_exit']}.",
        "",
    ]
    for sample in gen["samples"]:
        lines.append(f"- *{sample['prompt']}*{sample['text']!r} (exit layers {sample['exit_layers']})")
    lines += ["", f"## lm-eval on the task pack (first {evaluation['limit']} documents per task)", "",
              "Per-exit rows score the loglikelihood tasks with that exit's head.", ""]
    header_done = False
    for name, run in evaluation["runs"].items():
        flat = {f"{task}/{metric}": value
                for task, values in run["metrics"].items() for metric, value in values.items()}
        if not header_done:
            keys = sorted(flat)
            lines += ["| run | " + " | ".join(keys) + " | mean exit layer |",
                      "|---|" + "---|" * (len(keys) + 1)]
            header_done = True
        lines.append(f"| {name} | " + " | ".join(_fmt(flat.get(key, "-")) for key in keys)
                     + f" | {_fmt(run['cost'].get('mean_exit_layer'))} |")
    lines += ["", "## Speed against quality (kjv_completion)", "",
              "![speed and quality](sweep/speed_quality.png) ![exit layers](sweep/exit_histogram.png)", ""]
    metric = sweep["quality_metric"]
    lines += [f"| threshold | speedup | mean exit layer | agreement with full depth | {metric} |",
              "|---|---|---|---|---|"]
    for row in sweep["runs"]:
        threshold = "full depth" if row["threshold"] is None else _fmt(row["threshold"], 1)
        lines.append(f"| {threshold} | {row['speedup']:.2f}x | {_fmt(row['mean_exit_layer'], 2)} | "
                     f"{_fmt(row['agreement'])} | {_fmt(row.get(metric))} |")
    lines += ["", f"Full table: `{Path(sweep['dir']).name}/sweep.csv`."]
    (out / "report.md").write_text("\n".join(lines) + "\n")
    return len(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m eellm_hf.demo", description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=None,
                        help="output folder (default runs/demo, or runs/demo-<N>min for another --minutes)")
    parser.add_argument("--minutes", type=float, default=float(os.environ.get("DEMO_MINUTES", 5)),
                        help="training time budget (default 5, or $DEMO_MINUTES)")
    parser.add_argument("--smoke", action="store_true", help="a tiny model and a few steps (seconds), for tests")
    args = parser.parse_args(argv)
    if args.minutes <= 0:
        parser.error(f"--minutes must be > 0, got {args.minutes}")
    settings = DemoSettings.smoke() if args.smoke else DemoSettings(minutes=args.minutes)
    out = args.out
    if out is None:
        default = args.smoke or args.minutes == DemoSettings.minutes
        out = Path("runs/demo" if default else f"runs/demo-{args.minutes:g}min")
    Demo(out, settings).run()


if __name__ == "__main__":
    main()
