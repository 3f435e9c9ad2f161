"""``eellm-eval``: lm-eval's own command line, with the ``eellm`` model registered and the cost recorded.

It takes exactly ``lm_eval``'s arguments (``eellm-eval --model eellm --model_args pretrained=DIR,... --tasks ...``;
``eellm-eval ls tasks`` and ``eellm-eval validate`` work too). For each evaluation run it adds
``results["eellm_cost"]`` (mean exit layer, tokens per exit, recomputed tokens, wall times; see
``eellm_hf.eval.lm_eval_model``) to the results that lm-eval saves under ``--output_path`` and shows with
``--show_config``, and prints it after lm-eval's tables.
"""

from __future__ import annotations

import sys
from typing import Any

from eellm_hf.host_memory import keep_freed_memory


def format_cost(cost: dict[str, Any]) -> str:
    """A short human-readable summary of ``results["eellm_cost"]``."""
    lines = ["eellm cost:"]
    settings = [f"{key}={cost[key]}" for key in ("early_exit_threshold", "exit_confidence", "active_exits",
                                                 "max_recompute_tokens", "exit_layer") if cost.get(key) is not None]
    if settings:
        lines.append("  settings: " + ", ".join(settings))
    if cost.get("generated_tokens"):
        layers = cost.get("num_hidden_layers")
        lines.append(f"  generated tokens: {cost['generated_tokens']} in {cost.get('generate_calls', 0)} generate "
                     f"calls, mean exit layer {cost['mean_exit_layer']:.3f} of {layers}")
        per_exit = ", ".join(f"layer {layer}: {count}" for layer, count in cost["tokens_per_exit"].items())
        lines.append(f"  tokens per exit: {per_exit}; recomputed tokens: {cost.get('recomputed_tokens', 0)}")
    if cost.get("scoring_layer") is not None:
        lines.append(f"  loglikelihood scored at layer {cost['scoring_layer']}")
    times = ", ".join(f"{name} {seconds:.2f}s" for name, seconds in cost.get("wall_time_s", {}).items())
    lines.append(f"  wall time: {times}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    """Run lm-eval's CLI (``lm_eval.__main__.cli_evaluate``) on ``argv`` (default ``sys.argv[1:]``)."""
    keep_freed_memory()  # a batch's logits over a large vocabulary reuse freed pages (see eellm_hf.host_memory)
    from lm_eval.__main__ import cli_evaluate

    from eellm_hf.eval.lm_eval_model import recording_cost  # importing registers the "eellm" model

    args = sys.argv[1:] if argv is None else list(argv)
    saved_argv = sys.argv
    sys.argv = ["eellm-eval", *args]  # lm-eval's parser reads (and edits) sys.argv
    try:
        with recording_cost() as costs:
            cli_evaluate()
    except FileNotFoundError as exc:  # e.g. a mistyped model folder: the message says it all
        raise SystemExit(f"eellm-eval: {exc}") from exc
    finally:
        sys.argv = saved_argv
    for cost in costs:
        print(format_cost(cost))


if __name__ == "__main__":
    main()
