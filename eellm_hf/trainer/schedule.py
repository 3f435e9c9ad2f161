"""An analytic model of pipeline schedules with early exits: 1F1B training, and pipeline-parallel decoding.

Training (nanotron's one-forward-one-backward engine, as the trainer runs it): stage ``s`` of ``P`` runs
``P - s - 1`` warm-up forwards, then alternates one forward and one backward, then the remaining backwards. A
forward of micro-batch ``m`` on stage ``s`` waits for stage ``s - 1``'s forward of ``m``, a backward for stage
``s + 1``'s backward of ``m``, plus ``p2p`` seconds per hop. The model replays that schedule event by event with
the given durations (exact for the schedule, not a closed-form approximation), then adds the optimizer step.

Per stage, the inputs are the backbone's forward and backward times per micro-batch and those of the exits on
that stage (head, loss; block and MLP when the model has them). EE-LLM's options:

* ``defer_exit_forward`` (paper figure 3c): a middle stage runs its exits' forward inside the backward step, so
  their activations are not held from forward to backward; the work moves from forward to backward steps;
* ``fill_bubbles`` (paper figure 4): extra micro-batches that run only as far as the last stage with an exit
  (before the last stage) and train only the exits, placed as the trainer runs them (:mod:`.exit_schedule`): on
  each of those stages, just before its first backward (the idle time while the first gradient travels back),
  the backbone forwards of the extra micro-batches (``X``, no-grad; each waits for the previous stage's), then
  their exits' forward and backward (``E``); the stage's pending activation goes downstream after them.
  ``bubble_microbatches=K`` places K of them; ``fill_bubbles=True`` places as many as keep the pipeline time.

Outputs: iteration time and bubble fraction (1 - busy time / (P x pipeline time)).

Decoding (`simulate_pipeline_decoding`, `eellm_hf.pipeline_decoding`): token ``t`` starts on stage 0 once token
``t - 1`` is decided; stage ``s`` runs it after its own previous token and after stage ``s - 1`` handed it on; the
token is decided when the stage of its exit finishes it. Given each stage's measured compute per token, this is
the latency with free communication and no driver overhead: the pipeline's ideal.

    python -m eellm_hf.trainer.schedule --pp 4 --microbatches 8 --forward 1 1 1 1 --backward 2 2 2 2 \\
        --exit-forward 0.3 0.3 0 0 --exit-backward 0.6 0.6 0 0 --head-forward 0 0 0 0.3 --head-backward 0 0 0 0.6
    python -m eellm_hf.trainer.schedule --ee-llm        # predicted exit overhead of EE-LLM's GPU configurations
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import sys
from collections.abc import Sequence

__all__ = [
    "EE_LLM_CONFIGS",
    "ScheduleResult",
    "StageTimes",
    "bubble_stage_count",
    "ee_llm_stage_times",
    "max_bubble_microbatches",
    "one_f_one_b_order",
    "simulate_1f1b",
    "simulate_pipeline_decoding",
]


@dataclasses.dataclass(frozen=True)
class StageTimes:
    """Seconds per micro-batch on one pipeline stage.

    ``forward``/``backward``: its decoder layers (plus the embedding on the first stage and the final norm, head
    and loss on the last: put those in ``head_forward``/``head_backward`` to keep them apart, or fold them in);
    ``exit_forward``/``exit_backward``: its exits (block, norm, MLP, head, loss); ``optimizer``: its optimizer
    step (and gradient clipping), after the pipeline.
    """

    forward: float
    backward: float
    exit_forward: float = 0.0
    exit_backward: float = 0.0
    head_forward: float = 0.0
    head_backward: float = 0.0
    optimizer: float = 0.0

    def __post_init__(self) -> None:
        for field in dataclasses.fields(self):
            value = getattr(self, field.name)
            if not (isinstance(value, (int, float)) and math.isfinite(value) and value >= 0):
                raise ValueError(f"StageTimes.{field.name} must be a finite number >= 0, got {value!r}")


@dataclasses.dataclass(frozen=True)
class ScheduleResult:
    """What `simulate_1f1b` predicts for one iteration."""

    iteration_time: float  # pipeline + optimizer
    pipeline_time: float
    bubble_fraction: float
    busy: tuple[float, ...]  # per stage
    extra_exit_microbatches: int = 0  # with fill_bubbles


def one_f_one_b_order(stage: int, num_stages: int, microbatches: int,
                      bubble_microbatches: int = 0) -> list[tuple[str, int]]:
    """The operations of `stage` in nanotron's 1F1B order: ``("F", m)`` and ``("B", m)``; with
    `bubble_microbatches` K, ``("X", k)`` then ``("E", k)`` for k < K just before ``("B", 0)``."""
    warmup = min(num_stages - stage - 1, microbatches)
    order = [("F", m) for m in range(warmup)]
    for i in range(microbatches - warmup):
        order += [("F", warmup + i), ("B", i)]
    order += [("B", m) for m in range(microbatches - warmup, microbatches)]
    if bubble_microbatches:
        first_backward = order.index(("B", 0))
        order[first_backward:first_backward] = ([("X", k) for k in range(bubble_microbatches)]
                                                + [("E", k) for k in range(bubble_microbatches)])
    return order


def bubble_stage_count(stages: Sequence[StageTimes]) -> int:
    """How many leading stages the exit-only micro-batches run on: up to the last stage with exits before the
    last stage (0: none has any)."""
    with_exits = [s for s, stage in enumerate(stages[:-1]) if stage.exit_forward > 0 or stage.exit_backward > 0]
    return with_exits[-1] + 1 if with_exits else 0


def _step_durations(stage: StageTimes, is_last: bool, defer_exit_forward: bool) -> tuple[float, float]:
    forward = stage.forward + stage.head_forward
    backward = stage.backward + stage.head_backward + stage.exit_backward
    if defer_exit_forward and not is_last:
        backward += stage.exit_forward
    else:
        forward += stage.exit_forward
    return forward, backward


def simulate_1f1b(
    stages: Sequence[StageTimes],
    microbatches: int,
    p2p: float = 0.0,
    defer_exit_forward: bool = False,
    fill_bubbles: bool = False,
    bubble_microbatches: int = 0,
) -> ScheduleResult:
    """Replay one 1F1B iteration of ``len(stages)`` stages over `microbatches` micro-batches (plus
    `bubble_microbatches` exit-only ones; with `fill_bubbles`, as many as keep the pipeline time)."""
    num_stages = len(stages)
    if num_stages < 1:
        raise ValueError("at least one stage is needed")
    if not isinstance(microbatches, int) or microbatches < 1:
        raise ValueError(f"microbatches must be an integer >= 1, got {microbatches!r}")
    if not isinstance(bubble_microbatches, int) or bubble_microbatches < 0:
        raise ValueError(f"bubble_microbatches must be an integer >= 0, got {bubble_microbatches!r}")
    if p2p < 0:
        raise ValueError(f"p2p must be >= 0, got {p2p!r}")
    if fill_bubbles:
        bubble_microbatches = max_bubble_microbatches(stages, microbatches, p2p, defer_exit_forward)
    pipeline_time, busy = _replay(stages, microbatches, p2p, defer_exit_forward, bubble_microbatches)
    bubble = 1.0 - sum(busy) / (num_stages * pipeline_time) if pipeline_time > 0 else 0.0
    optimizer = max(s.optimizer for s in stages)
    extra = bubble_microbatches if bubble_stage_count(stages) else 0
    return ScheduleResult(pipeline_time + optimizer, pipeline_time, bubble, busy, extra)


def max_bubble_microbatches(stages: Sequence[StageTimes], microbatches: int, p2p: float = 0.0,
                            defer_exit_forward: bool = False, limit: int = 256) -> int:
    """The most exit-only micro-batches (at most `limit`) whose placement leaves the pipeline time as it is."""
    if not bubble_stage_count(stages):
        return 0
    plain = _replay(stages, microbatches, p2p, defer_exit_forward, 0)[0]
    count = 0
    while count < limit and _replay(stages, microbatches, p2p, defer_exit_forward, count + 1)[0] <= plain * (
            1 + 1e-9):
        count += 1
    return count


def _replay(stages: Sequence[StageTimes], microbatches: int, p2p: float, defer_exit_forward: bool,
            bubble_microbatches: int) -> tuple[float, tuple[float, ...]]:
    """Event-by-event replay: ``(pipeline_time, busy time per stage)``."""
    num_stages = len(stages)
    filled = bubble_stage_count(stages) if bubble_microbatches else 0
    durations = [_step_durations(s, i == num_stages - 1, defer_exit_forward) for i, s in enumerate(stages)]
    extra = [(s.forward, s.exit_forward + s.exit_backward) for s in stages]  # X (no-grad backbone), E (exits)
    orders = [one_f_one_b_order(s, num_stages, microbatches, bubble_microbatches if s < filled else 0)
              for s in range(num_stages)]
    # the activation a filled stage sends last before its bubble work leaves after that work
    held = {s: orders[s][orders[s].index(("X", 0)) - 1][1] for s in range(filled)}
    done: dict[tuple[str, int, int], float] = {}
    position, free_at = [0] * num_stages, [0.0] * num_stages
    busy = [0.0] * num_stages
    remaining = sum(len(order) for order in orders)
    while remaining:
        progressed = False
        for s in range(num_stages):
            while position[s] < len(orders[s]):
                kind, m = orders[s][position[s]]
                dependencies = _dependencies(kind, s, m, num_stages, held, bubble_microbatches)
                if any(d not in done for d in dependencies):
                    break
                ready = max((done[d] + p2p for d in dependencies), default=0.0)
                duration = {"F": durations[s][0], "B": durations[s][1], "X": extra[s][0], "E": extra[s][1]}[kind]
                free_at[s] = max(free_at[s], ready) + duration
                busy[s] += duration
                done[(kind, s, m)] = free_at[s]
                position[s] += 1
                remaining -= 1
                progressed = True
        if not progressed:  # pragma: no cover - the order has no cycles
            raise RuntimeError("the schedule deadlocked")
    return max(free_at), tuple(busy)


def _dependencies(kind: str, s: int, m: int, num_stages: int, held: dict[int, int],
                  bubble_microbatches: int) -> list[tuple[str, int, int]]:
    if kind == "F":
        if s == 0:
            return []
        if held.get(s - 1) == m:
            return [("F", s - 1, m), ("E", s - 1, bubble_microbatches - 1)]
        return [("F", s - 1, m)]
    if kind == "B":
        return [] if s == num_stages - 1 else [("B", s + 1, m)]
    if kind == "X":
        return [] if s == 0 else [("X", s - 1, m)]
    return []  # "E": after this stage's own X (its order)


def simulate_pipeline_decoding(stage_costs: Sequence[Sequence[float]], exit_stages: Sequence[int],
                               p2p: float = 0.0) -> float:
    """Time to decode ``len(stage_costs)`` tokens: ``stage_costs[t][s]`` is stage ``s``'s compute for token ``t``,
    ``exit_stages[t]`` the stage that decides it (the last stage for the final head)."""
    if len(stage_costs) != len(exit_stages):
        raise ValueError(f"{len(stage_costs)} tokens of stage costs but {len(exit_stages)} exit stages")
    decided, finished = 0.0, None
    for costs, exit_stage in zip(stage_costs, exit_stages):
        if not 0 <= exit_stage < len(costs):
            raise ValueError(f"exit stage {exit_stage} is outside [0, {len(costs)})")
        now = []
        for s, cost in enumerate(costs):
            previous_token = finished[s] if finished is not None else 0.0
            handed_on = decided if s == 0 else now[s - 1] + p2p
            now.append(max(previous_token, handed_on) + cost)
        finished = now
        decided = now[exit_stage] + (p2p if exit_stage > 0 else 0.0)
    return decided


# ------------------------------------------------------------------------------------------------------------
# EE-LLM's GPU configurations, timed by FLOPs
# ------------------------------------------------------------------------------------------------------------

EE_LLM_CONFIGS = {
    # name: (layers, hidden, intermediate, vocab, exit layers, pipeline stages)
    "1.3B": (24, 2048, 5632, 32000, (6, 12), 4),
    "7B": (32, 4096, 11008, 32000, (8, 16), 4),
    "13B": (40, 5120, 13824, 32000, (10, 20), 4),
    "30B": (60, 6656, 17920, 32000, (15, 30), 4),
}


def ee_llm_stage_times(name: str, microbatch_tokens: int = 4 * 2048, seq_len: int = 2048,
                       flops_per_second: float = 150e12, with_exits: bool = True) -> list[StageTimes]:
    """Per-stage times of one of `EE_LLM_CONFIGS` (layers split evenly, each exit on its layer's stage, norm + head
    exits), from FLOPs at `flops_per_second`: forward = 2 x parameters x tokens plus causal attention
    (2 x seq x hidden per token and layer), backward = 2 x forward."""
    layers, hidden, intermediate, vocab, exits, num_stages = EE_LLM_CONFIGS[name]
    layer = 2 * (4 * hidden * hidden + 3 * hidden * intermediate) + 2 * seq_len * hidden
    head = 2 * hidden * vocab
    per_stage = layers // num_stages
    scale = microbatch_tokens / flops_per_second
    stages = []
    for s in range(num_stages):
        exits_here = sum(1 for e in exits if s * per_stage < e <= (s + 1) * per_stage) if with_exits else 0
        forward = per_stage * layer * scale
        exit_forward = exits_here * head * scale
        head_forward = head * scale if s == num_stages - 1 else 0.0
        stages.append(StageTimes(forward, 2 * forward, exit_forward, 2 * exit_forward, head_forward,
                                 2 * head_forward))
    return stages


def ee_llm_table(microbatches: Sequence[int] = (8, 32, 128)) -> list[dict]:
    """Predicted iteration time with and without exits (same layout) for each configuration and micro-batch
    count."""
    rows = []
    for name in EE_LLM_CONFIGS:
        for m in microbatches:
            with_exits = simulate_1f1b(ee_llm_stage_times(name), m)
            backbone = simulate_1f1b(ee_llm_stage_times(name, with_exits=False), m)
            filled = simulate_1f1b(ee_llm_stage_times(name), m, fill_bubbles=True)
            rows.append({"model": name, "microbatches": m, "iteration_s": with_exits.iteration_time,
                         "backbone_s": backbone.iteration_time,
                         "overhead": with_exits.iteration_time / backbone.iteration_time - 1.0,
                         "bubble": with_exits.bubble_fraction,
                         "extra_exit_microbatches": filled.extra_exit_microbatches})
    return rows


def _parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m eellm_hf.trainer.schedule", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ee-llm", action="store_true", help="print the table for EE-LLM's GPU configurations")
    parser.add_argument("--pp", type=int, help="pipeline stages")
    parser.add_argument("--microbatches", type=int, help="micro-batches per iteration (M)")
    for name in ("forward", "backward", "exit-forward", "exit-backward", "head-forward", "head-backward",
                 "optimizer"):
        parser.add_argument(f"--{name}", type=float, nargs="+", default=None,
                            help="seconds per micro-batch, one value per stage (or one for all)")
    parser.add_argument("--p2p", type=float, default=0.0, help="seconds per pipeline hop")
    parser.add_argument("--defer-exit-forward", action="store_true")
    parser.add_argument("--fill-bubbles", action="store_true",
                        help="place as many exit-only micro-batches as keep the pipeline time")
    parser.add_argument("--bubble-microbatches", type=int, default=0, help="place this many exit-only micro-batches")
    parser.add_argument("--json", action="store_true")
    return parser.parse_args(argv)


def _per_stage(values: list[float] | None, pp: int, name: str) -> list[float]:
    if values is None:
        return [0.0] * pp
    if len(values) == 1:
        return values * pp
    if len(values) != pp:
        raise SystemExit(f"--{name} needs 1 or --pp ({pp}) values, got {len(values)}")
    return values


def main(argv: Sequence[str] | None = None) -> int:
    args = _parse_args(argv)
    if args.ee_llm:
        rows = ee_llm_table()
        if args.json:
            print(json.dumps(rows))
            return 0
        print("| model | micro-batches | iteration (s) | without exits (s) | exit overhead | bubble | "
              "exit-only micro-batches that fit before the first backward |")
        print("|---|---|---|---|---|---|---|")
        for row in rows:
            print(f"| {row['model']} | {row['microbatches']} | {row['iteration_s']:.2f} | {row['backbone_s']:.2f} "
                  f"| {row['overhead']:+.1%} | {row['bubble']:.1%} | {row['extra_exit_microbatches']} |")
        return 0
    if args.pp is None or args.microbatches is None or args.forward is None or args.backward is None:
        raise SystemExit("give --pp, --microbatches, --forward and --backward (or --ee-llm)")
    columns = {name: _per_stage(getattr(args, name.replace("-", "_")), args.pp, name)
               for name in ("forward", "backward", "exit-forward", "exit-backward", "head-forward",
                            "head-backward", "optimizer")}
    stages = [StageTimes(*(columns[name][s] for name in columns)) for s in range(args.pp)]
    result = simulate_1f1b(stages, args.microbatches, args.p2p, args.defer_exit_forward, args.fill_bubbles,
                           args.bubble_microbatches)
    if args.json:
        print(json.dumps(dataclasses.asdict(result)))
    else:
        print(f"iteration time {result.iteration_time:.6g} s (pipeline {result.pipeline_time:.6g} s), "
              f"bubble fraction {result.bubble_fraction:.1%}"
              + (f", exit-only micro-batches in the bubbles: {result.extra_exit_microbatches}"
                 if args.fill_bubbles or args.bubble_microbatches else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
