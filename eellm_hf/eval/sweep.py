"""``eellm-sweep``: speed against quality of early-exit generation over a range of confidence thresholds.

For one model and one prompt set (a ``generate_until`` lm-eval task, by default from the offline ``kjv_pack``, or
a prompt file) it generates greedily at each threshold and at full depth, in the same process, and records
per setting: wall time and speedup against full depth, tokens per exit and mean exit layer, recomputed tokens,
token agreement with the full-depth output (the fraction of positions, over the longer of the two outputs, whose
token equals the full-depth token), and quality (the task's own metrics, and ROUGE-L against the references).

It writes ``sweep.csv``, ``sweep.json``, ``speed_quality.png`` (quality and agreement against speedup, as in
EE-LLM's figure 9) and ``exit_histogram.png`` (the share of tokens produced at each layer, per threshold).
Each threshold is timed next to full depth on the same batch (A B B A), over ``--repeats`` rounds, so load from
other jobs slows both sides instead of faking a speedup; the speedup is per generated token (the median paired
time ratio times the ratio of generated tokens: an exit can end a text sooner or later than full depth)::

    eellm-sweep MODEL_DIR --task kjv_completion --limit 50 --thresholds 1.0 0.9 0.8 --out sweep/
    eellm-sweep MODEL_DIR --prompts-file prompts.jsonl --max-new-tokens 64 --batch-size 8 --out sweep/

Generation stops at EOS or after ``--max-new-tokens`` (the task's ``max_gen_toks`` by default); the task's stop
strings (``until``) only cut the text before it is scored.
A prompt file is JSON lines (``prompt``, optional ``reference``; ``text``/``context`` and
``continuation``/``target`` are accepted too) or plain text, one prompt per line.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import time
from collections import Counter, defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from ..host_memory import keep_freed_memory
from ..modeling.early_exit_settings import EXIT_CONFIDENCE_MEASURES, EarlyExitSettings, check_threshold, mean_exit_layer
from ..modeling.loading import DTYPES, load_model, load_tokenizer
from ..modeling.speculative_early_exit import (
    DEFAULT_SPECULATIVE_TOKENS,
    EARLY_EXIT_MODES,
    SPECULATIVE_GENERATION_KEYS,
    SpeculativeSettings,
)
from .sweep_report import label, plot_exit_histogram, plot_speed_quality, write_csv

DEFAULT_THRESHOLDS: list[float] = [round(1.0 - 0.1 * step, 1) for step in range(11)]


@dataclass
class Prompt:
    """One prompt, with its reference continuation and lm-eval document when known."""

    text: str
    reference: str | None = None
    doc: dict[str, Any] | None = None


@dataclass
class PromptSet:
    """Prompts plus how to score generated texts (metric name -> value over the whole set)."""

    name: str
    prompts: list[Prompt]
    stop: list[str] = field(default_factory=list)
    score: Callable[[list[Prompt], list[str]], dict[str, float]] | None = None
    max_new_tokens: int | None = None
    score_each: Callable[[list[Prompt], list[str]], dict[str, list[float]]] | None = None  # per prompt


@dataclass
class Generation:
    """Greedy outputs of one setting: real generated tokens and the layer that produced each."""

    tokens: list[list[int]]
    layers: list[list[int]]
    wall_time_s: float
    recomputed_tokens: int
    draft_tokens: int = 0  # speculative mode: tokens the exits drafted, and how many the final head accepted
    accepted_draft_tokens: int = 0


def real_token_layers(new_tokens: torch.Tensor, eos_token_ids: list[int], layer: int) -> torch.Tensor:
    """``exit_layers`` of a full-depth ``generate``: ``layer`` up to each row's first EOS (inclusive), then -1."""
    if not eos_token_ids:
        return torch.full_like(new_tokens, layer)
    is_eos = torch.isin(new_tokens, torch.tensor(eos_token_ids, device=new_tokens.device)).long()
    after_eos = (is_eos.cumsum(dim=1) - is_eos) > 0
    return torch.where(after_eos, torch.full_like(new_tokens, -1), torch.full_like(new_tokens, layer))


def eos_token_ids(generation_config: Any) -> list[int]:
    """The EOS ids of a generation config, as a list."""
    eos = getattr(generation_config, "eos_token_id", None)
    if eos is None:
        return []
    return [int(eos)] if isinstance(eos, int) else [int(token) for token in eos]


def _normalize(text: str) -> str:
    return " ".join(text.split())


def _rouge_l(prompts: list[Prompt], texts: list[str]) -> float:
    from eellm_hf.eval.tasks.utils import rouge_l

    pairs = [(text, p.reference) for p, text in zip(prompts, texts) if p.reference is not None]
    return sum(rouge_l(_normalize(text), _normalize(ref)) for text, ref in pairs) / len(pairs)


def load_prompts_file(path: str | Path, limit: int | None = None) -> PromptSet:
    """Prompts from a JSON-lines file (``prompt`` [+ ``reference``]) or a text file (one prompt per line)."""
    path = Path(path)
    lines = [line for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    prompts = []
    if path.suffix in (".jsonl", ".json"):
        for number, line in enumerate(lines, 1):
            row = json.loads(line)
            text = next((row[key] for key in ("prompt", "text", "context") if key in row), None)
            if not isinstance(text, str):
                raise ValueError(f"{path}:{number}: expected a 'prompt' string, got keys {sorted(row)}.")
            reference = next((row[key] for key in ("reference", "continuation", "target") if key in row), None)
            prompts.append(Prompt(text, reference))
    else:
        prompts = [Prompt(line) for line in lines]
    prompts = prompts[:limit] if limit is not None else prompts
    if not prompts:
        raise ValueError(f"No prompts in {path}.")
    has_references = all(p.reference is not None for p in prompts)
    return PromptSet(
        name=path.name,
        prompts=prompts,
        score=(lambda ps, texts: {"rougeL": _rouge_l(ps, texts)}) if has_references else None,
    )


def load_task(task_name: str, limit: int | None = None, include_path: str | Path | None = None) -> PromptSet:
    """The documents of a ``generate_until`` lm-eval task (the offline task pack is searched first)."""
    from lm_eval.tasks import TaskManager, get_task_dict

    from eellm_hf.eval.tasks import TASKS_DIR

    include = str(include_path or TASKS_DIR)
    manager = TaskManager(include_path=include, include_defaults=False)
    if task_name not in manager.all_tasks:
        manager = TaskManager(include_path=include)
    if hasattr(manager, "load"):  # lm-eval >= 0.4.10
        loaded = manager.load(task_name)
        tasks = {} if loaded["groups"] else loaded["tasks"]
    else:
        tasks = get_task_dict([task_name], manager)
    if len(tasks) != 1 or not hasattr(next(iter(tasks.values())), "process_results"):
        raise ValueError(f"--task takes a single generate_until task, got {task_name!r}.")
    task = next(iter(tasks.values()))
    if task.OUTPUT_TYPE != "generate_until":
        raise ValueError(f"Task {task_name!r} is {task.OUTPUT_TYPE}; the sweep needs a generate_until task.")
    docs = list(task.eval_docs)
    docs = docs[:limit] if limit is not None else docs
    prompts = []
    for doc in docs:
        context = task.fewshot_context(doc, num_fewshot=0)
        target = task.doc_to_target(doc)
        prompts.append(Prompt(str(context), target if isinstance(target, str) else None, doc))
    generation_kwargs = dict(task.config.generation_kwargs or {})
    until = generation_kwargs.get("until") or []
    aggregation = task.aggregation()

    def score_each(ps: list[Prompt], texts: list[str]) -> dict[str, list[float]]:
        values: dict[str, list[float]] = defaultdict(list)
        for prompt, text in zip(ps, texts):
            for metric, value in task.process_results(prompt.doc, [text]).items():
                values[metric].append(value)
        return dict(values)

    def score(ps: list[Prompt], texts: list[str]) -> dict[str, float]:
        values = score_each(ps, texts)
        scores = {
            metric: float(aggregation[metric](vals) if metric in aggregation else sum(vals) / len(vals))
            for metric, vals in values.items()
        }
        if "rougeL" not in scores and all(p.reference is not None for p in ps):
            scores["rougeL"] = _rouge_l(ps, texts)
        return scores

    return PromptSet(
        name=task_name,
        prompts=prompts,
        stop=[until] if isinstance(until, str) else list(until),
        score=score,
        max_new_tokens=generation_kwargs.get("max_gen_toks"),
        score_each=score_each,
    )


def _generation_kwargs(model: Any, tokenizer: Any, threshold: float | None, max_new_tokens: int,
                       early_exit_kwargs: dict[str, Any] | None) -> dict[str, Any]:
    eos = eos_token_ids(model.generation_config)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (eos[0] if eos else 0)
    kwargs: dict[str, Any] = dict(max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=pad,
                                  return_dict_in_generate=True)
    # explicit, so full depth stays full depth when the model's generation config recommends early exit
    kwargs["early_exit_threshold"] = threshold
    if threshold is not None:
        # a sweep measures early exit at its own batch size, whatever batch cap the export recommends
        kwargs["early_exit_max_batch_size"] = None
        kwargs.update(early_exit_kwargs or {})
    return kwargs


def generate_batch(
    model: Any,
    tokenizer: Any,
    prompts: Sequence[Prompt],
    threshold: float | None,
    max_new_tokens: int,
    early_exit_kwargs: dict[str, Any] | None = None,
) -> Generation:
    """Greedy generation for one batch of prompts at one threshold (``None``: full depth), timed."""
    kwargs = _generation_kwargs(model, tokenizer, threshold, max_new_tokens, early_exit_kwargs)
    batch = tokenizer([p.text for p in prompts], return_tensors="pt", padding=True).to(model.device)
    begin = time.perf_counter()
    with torch.no_grad():
        output = model.generate(**batch, **kwargs)
    if model.device.type == "cuda":
        torch.cuda.synchronize(model.device)
    seconds = time.perf_counter() - begin
    new = output.sequences[:, batch["input_ids"].shape[1]:]
    exit_layers = getattr(output, "exit_layers", None)
    if exit_layers is None:
        exit_layers = real_token_layers(new, eos_token_ids(model.generation_config), model.config.num_hidden_layers)
    stats = getattr(output, "early_exit_stats", None)
    recomputed = int(getattr(stats, "recomputed_tokens", 0) or 0)
    tokens, layers = [], []
    for row_tokens, row_layers in zip(new.tolist(), exit_layers.tolist()):
        keep = [i for i, layer in enumerate(row_layers) if layer >= 0]
        tokens.append([row_tokens[i] for i in keep])
        layers.append([row_layers[i] for i in keep])
    return Generation(tokens, layers, seconds, recomputed, int(getattr(stats, "draft_tokens", 0)),
                      int(getattr(stats, "accepted_draft_tokens", 0)))


def _concat(parts: Sequence[Generation]) -> Generation:
    return Generation(
        tokens=[row for part in parts for row in part.tokens],
        layers=[row for part in parts for row in part.layers],
        wall_time_s=sum(part.wall_time_s for part in parts),
        recomputed_tokens=sum(part.recomputed_tokens for part in parts),
        draft_tokens=sum(part.draft_tokens for part in parts),
        accepted_draft_tokens=sum(part.accepted_draft_tokens for part in parts),
    )


def generate(
    model: Any,
    tokenizer: Any,
    prompts: Sequence[Prompt],
    threshold: float | None,
    max_new_tokens: int,
    batch_size: int,
    early_exit_kwargs: dict[str, Any] | None = None,
    progress: tqdm | None = None,
) -> Generation:
    """Greedy generation for every prompt at one threshold (``None``: full depth), timed batch by batch."""
    parts = []
    for start in range(0, len(prompts), batch_size):
        parts.append(generate_batch(model, tokenizer, prompts[start:start + batch_size], threshold, max_new_tokens,
                                    early_exit_kwargs))
        if progress is not None:
            progress.update(1)
    return _concat(parts)


def prompt_agreements(tokens: list[list[int]], reference: list[list[int]]) -> list[float]:
    """Per prompt: matching positions over the longer of the two token sequences (1.0 when both are empty)."""
    return [sum(a == b for a, b in zip(x, y)) / max(len(x), len(y)) if (x or y) else 1.0
            for x, y in zip(tokens, reference)]


def agreement(tokens: list[list[int]], reference: list[list[int]]) -> float:
    """Matching positions over the longer of each pair of token sequences, summed over prompts."""
    matches = sum(sum(a == b for a, b in zip(x, y)) for x, y in zip(tokens, reference))
    positions = sum(max(len(x), len(y)) for x, y in zip(tokens, reference))
    return matches / positions if positions else 1.0


def _cut(text: str, stop: list[str]) -> str:
    for sequence in stop:
        if sequence:
            text = text.split(sequence)[0]
    return text


def run_sweep(
    model: Any,
    tokenizer: Any,
    prompt_set: PromptSet,
    thresholds: Sequence[float],
    max_new_tokens: int,
    batch_size: int = 8,
    early_exit_kwargs: dict[str, Any] | None = None,
    warmup: int = 1,
    repeats: int = 3,
    outputs: dict[float | None, Generation] | None = None,
) -> list[dict[str, Any]]:
    """One row per setting (full depth first, then each threshold) with speed, exit and quality statistics.

    Timing is paired so that a busy machine cannot fake a speedup: each threshold is timed batch by batch right
    next to full depth on the same batch, in the order A B B A (full depth and early exit alternating as A), for
    ``repeats`` rounds. ``wall_time_speedup`` is the median over rounds of (full-depth time / early-exit time),
    each summed over the batches of the round; ``speedup`` is the throughput ratio, ``wall_time_speedup`` times
    (early-exit tokens / full-depth tokens): outputs may differ in length (an exit can miss or add an EOS), and
    the speedup counts time per generated token. Outputs (greedy, deterministic) come from the first round; a
    dict passed as ``outputs`` receives them (threshold, or ``None`` for full depth, to ``Generation``).
    """
    prompts = prompt_set.prompts
    batches = [prompts[start:start + batch_size] for start in range(0, len(prompts), batch_size)]
    if warmup > 0:  # first calls pay one-off costs: warm up both decoding loops, untimed
        head = prompts[: warmup * batch_size]
        generate(model, tokenizer, head, None, max_new_tokens, batch_size)
        if thresholds:
            middle = sorted(thresholds)[len(thresholds) // 2]
            generate(model, tokenizer, head, middle, max_new_tokens, batch_size, early_exit_kwargs)

    def timed(threshold: float | None, batch: Sequence[Prompt]) -> Generation:
        return generate_batch(model, tokenizer, batch, threshold, max_new_tokens, early_exit_kwargs)

    outputs = {} if outputs is None else outputs
    full_times: dict[float | None, list[float]] = defaultdict(list)  # per setting: full-depth time of each round
    own_times: dict[float | None, list[float]] = defaultdict(list)
    settings: list[float | None] = list(thresholds) or [None]
    with tqdm(total=repeats * len(settings) * len(batches) * (4 if thresholds else 1), desc="eellm-sweep",
              unit="batch") as progress:
        for round_index in range(repeats):
            for threshold in settings:
                progress.set_postfix_str(f"round={round_index + 1} threshold={label(threshold)}")
                full_parts, own_parts = [], []
                for index, batch in enumerate(batches):
                    if threshold is None:
                        full_parts.append(timed(None, batch))
                        progress.update(1)
                        continue
                    # A B B A: each side runs once early and once late in the pair, so neither drift nor being
                    # first costs one side more than the other; a side's time is the mean of its two runs
                    first, second = (None, threshold) if (index + round_index) % 2 == 0 else (threshold, None)
                    runs: dict[float | None, list[Generation]] = {None: [], threshold: []}
                    for setting in (first, second, second, first):
                        runs[setting].append(timed(setting, batch))
                    full_parts.append(_mean_time(runs[None]))
                    own_parts.append(_mean_time(runs[threshold]))
                    progress.update(4)
                full, own = _concat(full_parts), _concat(own_parts or full_parts)
                outputs.setdefault(None, full)
                outputs.setdefault(threshold, own)
                full_times[threshold].append(full.wall_time_s)
                own_times[threshold].append(own.wall_time_s)

    all_full_times = [t for times in full_times.values() for t in times]
    rows = [_row(model, tokenizer, prompt_set, None, outputs[None], outputs[None], statistics.median(all_full_times),
                 1.0, 1.0)]
    full_tokens = _num_tokens(outputs[None])
    for threshold in thresholds:
        wall_ratios = [f / o if o > 0 else float("nan") for f, o in zip(full_times[threshold], own_times[threshold])]
        token_ratio = _num_tokens(outputs[threshold]) / full_tokens if full_tokens else float("nan")
        rows.append(_row(model, tokenizer, prompt_set, threshold, outputs[threshold], outputs[None],
                         statistics.median(own_times[threshold]), token_ratio * statistics.median(wall_ratios),
                         statistics.median(wall_ratios)))
        rows[-1]["full_depth_wall_time_s"] = statistics.median(full_times[threshold])
    return rows


def _num_tokens(generation: Generation) -> int:
    return sum(len(row) for row in generation.tokens)


def _mean_time(runs: Sequence[Generation]) -> Generation:
    """The first of identical (greedy) generations, with the mean wall time of all of them."""
    return dataclasses.replace(runs[0], wall_time_s=sum(run.wall_time_s for run in runs) / len(runs))


def _row(model: Any, tokenizer: Any, prompt_set: PromptSet, threshold: float | None, result: Generation,
         full: Generation, wall_time_s: float, speedup: float, wall_time_speedup: float) -> dict[str, Any]:
    counts = Counter(layer for row in result.layers for layer in row)
    num_tokens = sum(counts.values())
    mean_layer = mean_exit_layer(counts)
    texts = [_cut(tokenizer.decode(row, skip_special_tokens=True), prompt_set.stop) for row in result.tokens]
    row: dict[str, Any] = {
        "threshold": threshold,
        "wall_time_s": wall_time_s,
        "speedup": speedup,
        "wall_time_speedup": wall_time_speedup,
        "tokens": num_tokens,
        "tokens_per_s": num_tokens / wall_time_s if wall_time_s > 0 else float("nan"),
        "mean_exit_layer": mean_layer,
        "mean_depth_fraction": None if mean_layer is None else mean_layer / model.config.num_hidden_layers,
        "recomputed_tokens": result.recomputed_tokens,
        "agreement": agreement(result.tokens, full.tokens),
        "tokens_per_exit": {str(layer): counts[layer] for layer in sorted(counts)},
    }
    if result.draft_tokens:
        row["acceptance_rate"] = result.accepted_draft_tokens / result.draft_tokens
    if prompt_set.score is not None:
        row.update(prompt_set.score(prompt_set.prompts, texts))
    return row


def build_parser() -> argparse.ArgumentParser:
    """The ``eellm-sweep`` argument parser."""
    parser = argparse.ArgumentParser(
        prog="eellm-sweep", description="Sweep early-exit thresholds: speedup against quality, in one run."
    )
    parser.add_argument("model", help="folder (or Hub id) of an EarlyExitGPT model and its tokenizer")
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--prompts-file", type=Path, help="JSON lines (prompt[, reference]) or one prompt a line")
    source.add_argument("--task", help="a generate_until lm-eval task, e.g. kjv_completion")
    parser.add_argument("--include-path", default=None, help="extra lm-eval task folder (default: the kjv pack)")
    parser.add_argument("--limit", type=int, default=None, help="use the first N prompts")
    parser.add_argument("--thresholds", type=float, nargs="+", default=DEFAULT_THRESHOLDS,
                        help="confidence thresholds in [0, 1] (default: 1.0 down to 0.0 in steps of 0.1)")
    parser.add_argument("--exit-confidence", default="max_prob", choices=EXIT_CONFIDENCE_MEASURES)
    parser.add_argument("--exit-gate-threshold", type=float, default=None,
                        help="gate_max_prob: the gate probability that screens (--thresholds then sweep the "
                             "largest probability)")
    parser.add_argument("--active-exits", type=int, nargs="+", default=None, help="exit layers allowed to fire")
    parser.add_argument("--max-recompute-tokens", type=int, default=None)
    parser.add_argument("--early-exit-mode", default="lossy", choices=EARLY_EXIT_MODES,
                        help="speculative: the exits draft, the whole model verifies (output equals full depth)")
    parser.add_argument("--num-speculative-tokens", type=int, default=None,
                        help=f"speculative: most tokens drafted per round (default {DEFAULT_SPECULATIVE_TOKENS})")
    parser.add_argument("--stop-draft-when-unsure", action="store_true",
                        help="speculative: end a draft at a token no exit is confident about")
    parser.add_argument("--max-new-tokens", type=int, default=None,
                        help="tokens to generate per prompt (default: the task's max_gen_toks, else 32)")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--quality-metric", default="rougeL", help="metric plotted against speedup")
    parser.add_argument("--warmup", type=int, default=1, help="untimed warm-up batches per decoding loop")
    parser.add_argument("--repeats", type=int, default=3,
                        help="timing rounds (A B B A next to full depth on each batch); the median is reported")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default="float32", choices=sorted(DTYPES))
    parser.add_argument("--trust-remote-code", action="store_true")
    parser.add_argument("--out", type=Path, default=Path("eellm_sweep"), help="output folder")
    return parser


def sweep_from_args(argv: list[str] | None = None) -> dict[str, Any]:
    """Run ``eellm-sweep`` on ``argv``; returns what ``sweep.json`` holds."""
    args = build_parser().parse_args(argv)
    try:  # before loading anything; the model's own checks follow (check_settings)
        for threshold in args.thresholds:
            check_threshold(threshold)
    except ValueError as exc:
        raise SystemExit(f"eellm-sweep: --thresholds: {exc}") from None
    if args.batch_size < 1 or args.repeats < 1 or args.warmup < 0:
        raise SystemExit("eellm-sweep: --batch-size and --repeats must be >= 1, --warmup >= 0")

    if args.task is not None:
        prompt_set = load_task(args.task, args.limit, args.include_path)
        source: dict[str, Any] = {"task": args.task}
    else:
        prompt_set = load_prompts_file(args.prompts_file, args.limit)
        source = {"prompts_file": str(args.prompts_file)}
    max_new_tokens = args.max_new_tokens or prompt_set.max_new_tokens or 32

    tokenizer = load_tokenizer(args.model, trust_remote_code=args.trust_remote_code)
    model = load_model(args.model, args.dtype, args.device, trust_remote_code=args.trust_remote_code)
    config = model.config
    exits = [int(layer) for layer in getattr(config, "exit_layers", None) or []]
    if not exits:
        raise SystemExit(f"eellm-sweep: {args.model} has no early exits (config.exit_layers).")

    early_exit_kwargs: dict[str, Any] = {"exit_confidence": args.exit_confidence}
    if args.exit_gate_threshold is not None:
        early_exit_kwargs["exit_gate_threshold"] = args.exit_gate_threshold
    if args.active_exits is not None:
        early_exit_kwargs["active_exits"] = args.active_exits
    if args.max_recompute_tokens is not None:
        early_exit_kwargs["max_recompute_tokens"] = args.max_recompute_tokens
    if args.early_exit_mode != "lossy":
        early_exit_kwargs["early_exit_mode"] = args.early_exit_mode
        early_exit_kwargs["stop_draft_when_unsure"] = args.stop_draft_when_unsure
        if args.num_speculative_tokens is not None:
            early_exit_kwargs["num_speculative_tokens"] = args.num_speculative_tokens
    elif args.num_speculative_tokens is not None or args.stop_draft_when_unsure:
        raise SystemExit("eellm-sweep: --num-speculative-tokens and --stop-draft-when-unsure need "
                         "--early-exit-mode speculative")
    check_settings("eellm-sweep", config, early_exit_kwargs, args.thresholds)

    rows = run_sweep(model, tokenizer, prompt_set, args.thresholds, max_new_tokens, args.batch_size,
                     early_exit_kwargs, warmup=args.warmup, repeats=args.repeats)

    num_layers = int(config.num_hidden_layers)
    active = sorted(set(args.active_exits)) if args.active_exits is not None else exits
    layers = sorted({*active, num_layers} | {int(k) for row in rows for k in row["tokens_per_exit"]})
    metric = args.quality_metric if any(args.quality_metric in row for row in rows) else None
    summary = {
        "model": str(args.model),
        **source,
        "num_prompts": len(prompt_set.prompts),
        "max_new_tokens": max_new_tokens,
        "batch_size": args.batch_size,
        "device": args.device,
        "dtype": args.dtype,
        "num_hidden_layers": num_layers,
        "exit_layers": exits,
        "active_exits": active,
        **{key: value for key, value in early_exit_kwargs.items() if key != "active_exits"},
        "stop": prompt_set.stop,
        "quality_metric": metric,
        "runs": rows,
    }
    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    (out / "sweep.json").write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
    write_csv(rows, out / "sweep.csv", layers)
    title = f"{Path(str(args.model)).name} on {prompt_set.name} ({len(prompt_set.prompts)} prompts)"
    plot_speed_quality(rows, out / "speed_quality.png", metric, title)
    plot_exit_histogram(rows, out / "exit_histogram.png", layers, num_layers, title)

    for row in rows:
        quality = f", {metric} {row[metric]:.3f}" if metric else ""
        if "acceptance_rate" in row:
            quality += f", drafts accepted {row['acceptance_rate']:.3f}"
        mean = f"{row['mean_exit_layer']:.2f}" if row["mean_exit_layer"] is not None else "-"
        print(f"threshold {label(row['threshold']):>4}: speedup {row['speedup']:.2f}x, mean exit layer {mean}, "
              f"agreement {row['agreement']:.3f}{quality}")
    print(f"wrote {out / 'sweep.csv'}, sweep.json, speed_quality.png, exit_histogram.png")
    return summary


def check_settings(prog: str, model_config: Any, early_exit_kwargs: dict[str, Any], thresholds: Sequence[float]
                   ) -> None:
    """Every threshold with ``early_exit_kwargs`` is a valid setting of the model (``EarlyExitSettings.resolve``,
    as ``generate`` checks it), or the command ends naming the bad value."""
    speculative_kwargs = {key: value for key, value in early_exit_kwargs.items() if key in SPECULATIVE_GENERATION_KEYS}
    lossy_kwargs = {key: value for key, value in early_exit_kwargs.items() if key not in speculative_kwargs}
    try:
        for threshold in thresholds:
            settings = EarlyExitSettings.resolve(model_config, {**lossy_kwargs, "early_exit_threshold": threshold})
            SpeculativeSettings.resolve(settings, speculative_kwargs, [])
    except ValueError as exc:
        raise SystemExit(f"{prog}: {exc}") from None


def main(argv: list[str] | None = None) -> None:
    """``eellm-sweep`` console entry point."""
    keep_freed_memory()
    sweep_from_args(argv)


if __name__ == "__main__":
    main()


__all__ = [
    "DEFAULT_THRESHOLDS",
    "Generation",
    "Prompt",
    "PromptSet",
    "agreement",
    "build_parser",
    "check_settings",
    "generate",
    "generate_batch",
    "load_prompts_file",
    "load_task",
    "main",
    "prompt_agreements",
    "plot_exit_histogram",
    "plot_speed_quality",
    "real_token_layers",
    "run_sweep",
    "sweep_from_args",
    "write_csv",
]
