"""What both demos share: phases that leave a JSON marker and are reused on a rerun, the settings record that
refuses to mix runs, the ``torchrun`` launch of the trainer, coloured and paired-timed generation, lm-eval runs
and the report's tables."""

from __future__ import annotations

import dataclasses
import json
import math
import os
import statistics
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from ..trainer.launch import threads_per_rank, torchrun_command

Phase = tuple[str, Callable[[], dict[str, Any]]]
LAYER_COLORS = ("bright_green", "yellow", "cyan", "magenta", "white")


class PhaseRunner:
    """Runs ``phases()`` in order under ``out``, skipping those whose ``<name>.json`` exists."""

    def __init__(self, out: Path, settings: Any):
        self.out = out.resolve()
        self.settings = settings
        self.results: dict[str, Any] = {}

    def phases(self) -> list[Phase]:
        raise NotImplementedError

    def run(self) -> None:
        from tqdm.auto import tqdm

        self._check_settings()
        with tqdm(self.phases(), desc="demo", unit="phase", file=sys.stdout) as bar:
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
        current = json.loads(json.dumps(dataclasses.asdict(self.settings), default=str))
        if path.exists():
            saved = json.loads(path.read_text())
            changed = {key: (saved.get(key), value) for key, value in current.items() if saved.get(key) != value}
            if changed:
                details = ", ".join(f"{key}: {old!r} there, {new!r} now" for key, (old, new) in changed.items())
                raise SystemExit(f"{self.out} holds a demo run made with other settings ({details}): pass another "
                                 f"--out, or remove {self.out} to start over.")
        else:
            path.write_text(json.dumps(current, indent=2))


def torchrun_trainer(config: Path, processes: int = 2) -> None:
    """``torchrun --nproc-per-node P -m eellm_hf.trainer --config CONFIG``, the machine's cores shared out."""
    env = {**os.environ, "OMP_NUM_THREADS": threads_per_rank(processes)}
    subprocess.run(torchrun_command(config, processes), check=True, env=env)


def load_model(model_dir: Path):
    """The exported model (remote code, as a user loads it) in eval mode, and its tokenizer."""
    from ..modeling.loading import load_model_and_tokenizer

    return load_model_and_tokenizer(model_dir, trust_remote_code=True)


def colored_generation(model: Any, tokenizer: Any, prompts: Sequence[str], new_tokens: int,
                       early_exit: dict[str, Any], rounds: int = 3) -> dict[str, Any]:
    """Greedy early-exit generation of each prompt, printed with each token coloured by the layer that produced
    it, and its speed per generated token against full depth, timed side by side (A B B A, alternating which is
    A) over ``rounds`` rounds; the median ratio is reported."""
    import torch
    from rich.console import Console
    from rich.text import Text

    from ..modeling.early_exit_settings import mean_exit_layer

    layers = [*model.config.exit_layers, model.config.num_hidden_layers]
    console = Console()
    legend = Text("layer that produced each token: ")
    for index, layer in enumerate(layers):
        legend.append(f"[{layer}] ", style=LAYER_COLORS[index % len(LAYER_COLORS)])
    console.print(legend)
    settings = {"full_depth": {"early_exit_threshold": None}, "early_exit": early_exit}
    seconds = {name: [0.0] * rounds for name in settings}
    tokens = {name: [0] * rounds for name in settings}
    samples = []
    with torch.inference_mode():
        for prompt in prompts:
            inputs = tokenizer(prompt, return_tensors="pt")
            common = dict(max_new_tokens=new_tokens, do_sample=False, pad_token_id=tokenizer.pad_token_id,
                          return_dict_in_generate=True)
            for extra in settings.values():  # warm-up, both decoding loops
                model.generate(**inputs, **common, **extra)
            for index in range(rounds):
                pair = ("full_depth", "early_exit") if index % 2 == 0 else ("early_exit", "full_depth")
                for name in (*pair, *reversed(pair)):
                    start = time.perf_counter()
                    output = model.generate(**inputs, **common, **settings[name])
                    seconds[name][index] += time.perf_counter() - start
                    tokens[name][index] += output.sequences.shape[1] - inputs["input_ids"].shape[1]
                    if name == "early_exit":
                        sample = output
            new = sample.sequences[0, inputs["input_ids"].shape[1]:].tolist()
            exits = sample.exit_layers[0].tolist()
            text = Text(prompt[-300:], style="bold")
            for token, layer in zip(new, exits):
                text.append(tokenizer.decode([token]), style=LAYER_COLORS[layers.index(layer) % len(LAYER_COLORS)])
            console.print(text)
            console.print()
            samples.append({"prompt": prompt, "text": tokenizer.decode(new), "exit_layers": exits})

    def throughput(name: str, index: int) -> float:  # per generated token: the two may stop at other lengths
        return tokens[name][index] / seconds[name][index]

    tokens_per_exit = Counter(layer for sample in samples for layer in sample["exit_layers"])
    result = {
        "settings": early_exit,
        "speedup": statistics.median(throughput("early_exit", i) / throughput("full_depth", i) for i in range(rounds)),
        "full_depth_tokens_per_s": statistics.median(throughput("full_depth", i) for i in range(rounds)),
        "mean_exit_layer": mean_exit_layer(tokens_per_exit),
        "tokens_per_exit": {str(layer): tokens_per_exit[layer] for layer in layers},
        "samples": samples,
    }
    console.print(f"{early_exit}: speedup {result['speedup']:.2f}x against full depth, "
                  f"mean exit layer {result['mean_exit_layer']:.2f} of {layers[-1]}")
    return result


def lm_eval_runs(model_dir: Path, runs: dict[str, tuple[str, list[str]]], limit: int, group: str
                 ) -> dict[str, Any]:
    """lm-eval on the offline task pack: ``runs`` maps a name to (extra ``model_args``, tasks). Per run, each
    task's metrics (stderr left out) and the ``eellm`` model's cost record."""
    from lm_eval.tasks import TaskManager

    from ..eval.lm_eval_model import simple_evaluate
    from ..eval.tasks import TASKS_DIR

    scores = {}
    for name, (extra, tasks) in runs.items():
        results = simple_evaluate(
            model="eellm", model_args=f"pretrained={model_dir},dtype=float32{extra}",
            tasks=tasks, task_manager=TaskManager(include_path=str(TASKS_DIR), include_defaults=False),
            limit=limit, device="cpu", batch_size=8, log_samples=False, bootstrap_iters=0,
        )
        metrics = {
            task: {key.split(",")[0]: value for key, value in values.items()
                   if isinstance(value, float) and "stderr" not in key}
            for task, values in results["results"].items() if task != group
        }
        scores[name] = {"metrics": metrics, "cost": results.get("eellm_cost", {})}
    return {"limit": limit, "runs": scores}


def fmt(value: Any, digits: int = 3) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.{digits}f}" if math.isfinite(value) else "n/a"
    return str(value)


def lm_eval_table(evaluation: dict[str, Any]) -> list[str]:
    """One row per lm-eval run, one column per task metric, then the mean exit layer."""
    flat_runs = {name: {f"{task}/{metric}": value for task, values in run["metrics"].items()
                        for metric, value in values.items()} for name, run in evaluation["runs"].items()}
    keys = sorted({key for flat in flat_runs.values() for key in flat})
    lines = ["| run | " + " | ".join(keys) + " | mean exit layer |", "|---|" + "---|" * (len(keys) + 1)]
    for name, flat in flat_runs.items():
        cost = evaluation["runs"][name]["cost"]
        lines.append(f"| {name} | " + " | ".join(fmt(flat.get(key)) for key in keys)
                     + f" | {fmt(cost.get('mean_exit_layer'))} |")
    return lines


def sweep_table(sweep: dict[str, Any]) -> list[str]:
    """One row per threshold of an ``eellm-sweep`` summary (full depth first)."""
    metric = sweep["quality_metric"]
    lines = [f"| threshold | speedup | mean exit layer | agreement with full depth | {metric} |",
             "|---|---|---|---|---|"]
    for row in sweep["runs"]:
        threshold = "full depth" if row["threshold"] is None else fmt(row["threshold"], 2)
        lines.append(f"| {threshold} | {row['speedup']:.2f}x | {fmt(row['mean_exit_layer'], 2)} | "
                     f"{fmt(row['agreement'])} | {fmt(row.get(metric))} |")
    return lines


def sample_lines(samples: Sequence[dict[str, Any]], prompt_chars: int = 120) -> list[str]:
    return [f"- `…{sample['prompt'][-prompt_chars:]!r}` → {sample['text']!r} (exit layers {sample['exit_layers']})"
            for sample in samples]


def demo_main(argv: list[str] | None, *, prog: str, description: str, settings_type: type, runner_type: type,
              default_out: str, default_minutes: float | None = None,
              add_arguments: Callable[[Any], None] | None = None) -> None:
    """The command line both demos share: ``--minutes`` (or ``$DEMO_MINUTES``), ``--out``, ``--smoke``.

    ``settings_type.from_args(args)`` gives the run's settings and ``settings_type.smoke(args)`` a tiny run; a
    budget other than the default goes to ``<default_out>-<N>min`` unless ``--out`` says otherwise, so runs never
    mix."""
    import argparse

    from ..host_memory import keep_freed_memory

    keep_freed_memory()  # lm-eval and the sweep run in this process
    default_minutes = default_minutes if default_minutes is not None else settings_type.minutes
    parser = argparse.ArgumentParser(prog=prog, description=description)
    parser.add_argument("--out", type=Path, default=None,
                        help=f"output folder (default {default_out}, or {default_out}-<N>min for other --minutes)")
    parser.add_argument("--minutes", type=float, default=float(os.environ.get("DEMO_MINUTES") or default_minutes),
                        help=f"training time budget (default {default_minutes:g}, or $DEMO_MINUTES)")
    parser.add_argument("--smoke", action="store_true", help="a tiny model and a few steps (seconds), for tests")
    if add_arguments is not None:
        add_arguments(parser)
    args = parser.parse_args(argv)
    if args.minutes <= 0:
        parser.error(f"--minutes must be > 0, got {args.minutes}")
    try:
        settings = settings_type.smoke(args) if args.smoke else settings_type.from_args(args)
    except ValueError as error:
        parser.error(str(error))
    out = args.out
    if out is None:
        out = Path(default_out if args.smoke or args.minutes == default_minutes
                   else f"{default_out}-{args.minutes:g}min")
    runner_type(out, settings).run()
