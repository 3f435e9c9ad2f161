"""Training metrics: a JSON-lines log, a progress bar and a loss plot.

Only the logging rank (the one that has the reduced losses, typically the last pipeline stage's first TP/DP
rank) should create an enabled logger; on the others ``MetricsLogger(..., enabled=False)`` does nothing::

    logger = MetricsLogger(cfg.run_dir, cfg.train.steps, enabled=is_logging_rank,
                           exit_layers=model_config.exit_layers, resume_step=start_step if resumed else None)
    for step in range(start_step + 1, cfg.train.steps + 1):
        ...
        logger.log_train(step, loss, exit_losses=[l_exit1, l_exit2, l_final], lr=lr,
                         tokens=cfg.train.global_batch_size * cfg.data.seq_len)
        if validating:
            logger.log_validation(step, val_loss, exit_losses=[...])
    logger.close()   # also writes RUN_DIR/metrics.png

Everything goes to one file, ``RUN_DIR/metrics.jsonl``, one JSON object per line, flushed line by line:

* training: ``{"step", "split": "train", "loss", "exit_layers", "exit_losses", "lr", "tokens_per_s",
  "elapsed_s", ...}``
* validation: ``{"step", "split": "validation", "loss", "exit_layers", "exit_losses", "elapsed_s", ...}``
* events (no ``split``): ``{"event": NAME, "step", ...}``, e.g. ``{"event": "time_budget", "step": 4, "steps":
  1200, "step_time_s": 0.41, ...}`` when a time budget fixed the total number of steps after step 4.

``step`` counts completed optimizer steps (1 after the first update). ``loss`` is the training objective (the
weighted sum over heads). ``exit_losses`` is a list of each head's own cross-entropy, aligned with
``exit_layers`` (the early exits, in order), then the final head: ``exit_losses[i]`` belongs to the exit after
layer ``exit_layers[i]`` and ``exit_losses[-1]`` to the final head (:func:`head_losses` names them). Extra
keyword arguments (``grad_norm=...``) are stored as they are. Non-finite numbers are written as ``null``.

Resuming from the checkpoint of step ``k``: ``resume_step=k`` keeps the lines with ``step <= k`` and drops the
later ones (written after that checkpoint by the interrupted run), so that the file stays one consistent
history. Without ``resume_step`` an existing file is replaced.
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

__all__ = ["METRICS_FILE", "PLOT_FILE", "MetricsLogger", "head_losses", "head_names", "plot_metrics", "read_metrics"]

METRICS_FILE = "metrics.jsonl"
PLOT_FILE = "metrics.png"


def _number(value: Any) -> float | None:
    """A float (0-dim tensors and numpy scalars included), or None when not finite."""
    if value is None:
        return None
    if hasattr(value, "item"):
        value = value.item()
    value = float(value)
    return value if math.isfinite(value) else None


def _plain(value: Any) -> Any:
    if isinstance(value, (str, bool)) or value is None:
        return value
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, int):
        return value
    return _number(value)


def head_names(exit_layers: Sequence[int]) -> list[str]:
    """Names of the entries of ``exit_losses``: ``exit_<layer>`` for each exit, then ``final``."""
    return [f"exit_{int(layer)}" for layer in exit_layers] + ["final"]


def head_losses(entry: Mapping[str, Any]) -> dict[str, float | None]:
    """``{"exit_<layer>": ..., "final": ...}`` from a metrics line's ``exit_layers`` and ``exit_losses``."""
    losses = entry.get("exit_losses") or []
    return dict(zip(head_names(entry.get("exit_layers") or []), losses, strict=True))


def read_metrics(run_dir: str | os.PathLike[str], split: str | None = None) -> list[dict[str, Any]]:
    """The entries of ``RUN_DIR/metrics.jsonl`` (only those of ``split`` if given, e.g. ``"train"``; events have
    no split); a torn last line is skipped."""
    path = Path(run_dir) / METRICS_FILE
    if not path.is_file():
        return []
    entries = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            try:
                entry = json.loads(line)
            except json.JSONDecodeError:
                continue
            if split is None or entry.get("split") == split:
                entries.append(entry)
    return entries


class MetricsLogger:
    """Appends metrics to ``RUN_DIR/metrics.jsonl`` and shows a tqdm progress bar (see the module docstring).

    ``total_steps``: the bar's length (:meth:`set_total_steps` changes it). ``enabled``: False on every rank but
    the logging one (then every method is a no-op). ``exit_layers``: the layers of the early exits, which
    ``exit_losses`` lists (then the final head) and every line records. ``resume_step``: the step
    of the checkpoint resumed from (None: a fresh run). ``progress``: show the bar (on stderr). ``plot``:
    write ``metrics.png`` on :meth:`close`.
    """

    def __init__(
        self,
        run_dir: str | os.PathLike[str],
        total_steps: int,
        enabled: bool = True,
        *,
        exit_layers: Sequence[int] = (),
        resume_step: int | None = None,
        progress: bool = True,
        plot: bool = True,
    ) -> None:
        self.run_dir = Path(run_dir)
        self.path = self.run_dir / METRICS_FILE
        self.enabled = enabled
        self.exit_layers = [int(layer) for layer in exit_layers]
        self.plot = plot
        self._file = None
        self._bar = None
        self._start = time.perf_counter()
        self._last_time = self._start
        self._last_step = resume_step or 0
        if not enabled:
            return
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self._truncate(resume_step)
        self._file = open(self.path, "a", encoding="utf-8")  # noqa: SIM115 (closed in close())
        if progress:
            from tqdm.auto import tqdm

            self._bar = tqdm(total=total_steps, initial=self._last_step, desc="train", unit="step",
                             dynamic_ncols=True, file=sys.stderr)

    def _truncate(self, resume_step: int | None) -> None:
        if resume_step is None or not self.path.exists():
            self.path.write_text("", encoding="utf-8")
            return
        kept = [json.dumps(e) for e in read_metrics(self.run_dir) if e.get("step", 0) <= resume_step]
        tmp = self.path.with_name(self.path.name + ".tmp")
        tmp.write_text("".join(line + "\n" for line in kept), encoding="utf-8")
        os.replace(tmp, self.path)

    def exit_loss_list(self, exit_losses: Sequence[Any] | None) -> list[float | None] | None:
        """``exit_losses`` as stored: one number per exit of ``exit_layers``, then the final head's."""
        if exit_losses is None:
            return None
        if isinstance(exit_losses, (Mapping, str)) or not isinstance(exit_losses, Sequence):
            raise TypeError(f"exit_losses must be a list (exits in exit_layers order, then the final head), got "
                            f"{type(exit_losses).__name__}")
        values = [_number(v) for v in exit_losses]
        if len(values) != len(self.exit_layers) + 1:
            raise ValueError(
                f"got {len(values)} exit losses for exit_layers {self.exit_layers} (expected "
                f"{len(self.exit_layers) + 1}: one per exit, then the final head)"
            )
        return values

    def _heads(self, entry: dict[str, Any]) -> dict[str, float | None]:
        return {} if entry["exit_losses"] is None else head_losses(entry)

    def set_total_steps(self, total_steps: int) -> None:
        """Change the progress bar's length (e.g. when a time budget fixed the number of steps)."""
        if self._bar is not None:
            self._bar.total = int(total_steps)
            self._bar.refresh()

    def log_event(self, event: str, step: int, **fields: Any) -> None:
        """Write an event line ``{"event": event, "step": step, **fields}`` (kept on resume if ``step`` is)."""
        if not self.enabled:
            return
        entry: dict[str, Any] = {"event": str(event), "step": int(step)}
        entry.update({k: _plain(v) for k, v in fields.items()})
        entry["elapsed_s"] = round(time.perf_counter() - self._start, 3)
        self._write(entry)
        details = " ".join(f"{k}={v}" for k, v in entry.items() if k not in ("event", "step", "elapsed_s"))
        message = f"step {step} {event}: {details}".rstrip()
        if self._bar is not None:
            self._bar.write(message, file=sys.stderr)
        else:
            print(message, file=sys.stderr, flush=True)

    def _write(self, entry: dict[str, Any]) -> None:
        assert self._file is not None
        self._file.write(json.dumps(entry, allow_nan=False) + "\n")
        self._file.flush()

    def log_train(
        self,
        step: int,
        loss: Any,
        *,
        exit_losses: Sequence[Any] | None = None,
        lr: float | None = None,
        tokens: int | None = None,
        **extra: Any,
    ) -> None:
        """Log optimizer step ``step``. ``exit_losses``: each exit's loss in ``exit_layers`` order, then the final
        head's. ``tokens``: tokens processed per step (all ranks together), for the throughput over the steps
        since the previous call."""
        if not self.enabled:
            return
        now = time.perf_counter()
        steps_done = max(step - self._last_step, 0)
        elapsed = now - self._last_time
        tokens_per_s = tokens * steps_done / elapsed if tokens and steps_done and elapsed > 0 else None
        entry: dict[str, Any] = {
            "step": int(step), "split": "train", "loss": _number(loss), "exit_layers": list(self.exit_layers),
            "exit_losses": self.exit_loss_list(exit_losses), "lr": _number(lr),
            "tokens_per_s": _number(tokens_per_s), "elapsed_s": round(now - self._start, 3),
        }
        entry.update({k: _plain(v) for k, v in extra.items()})
        self._write(entry)
        self._last_time, self._last_step = now, step
        if self._bar is not None:
            self._bar.update(steps_done)
            postfix = {"loss": _fmt(entry["loss"])}
            postfix.update({k.replace("exit_", "e"): _fmt(v) for k, v in self._heads(entry).items()})
            postfix["lr"] = "-" if entry["lr"] is None else f"{entry['lr']:.2e}"
            if entry["tokens_per_s"] is not None:
                postfix["tok/s"] = f"{entry['tokens_per_s']:.0f}"
            self._bar.set_postfix(postfix, refresh=False)

    def log_validation(
        self, step: int, loss: Any, *, exit_losses: Sequence[Any] | None = None, **extra: Any
    ) -> None:
        """Log a validation result at ``step`` (also printed above the progress bar); ``exit_losses`` as in
        :meth:`log_train`."""
        if not self.enabled:
            return
        entry: dict[str, Any] = {
            "step": int(step), "split": "validation", "loss": _number(loss), "exit_layers": list(self.exit_layers),
            "exit_losses": self.exit_loss_list(exit_losses),
            "elapsed_s": round(time.perf_counter() - self._start, 3),
        }
        entry.update({k: _plain(v) for k, v in extra.items()})
        self._write(entry)
        heads = " ".join(f"{k}={_fmt(v)}" for k, v in self._heads(entry).items())
        message = f"step {step} validation loss={_fmt(entry['loss'])} {heads}".rstrip()
        if self._bar is not None:
            self._bar.write(message, file=sys.stderr)
        else:
            print(message, file=sys.stderr, flush=True)

    def close(self) -> Path | None:
        """Close the file and the bar; write the plot (returns its path, or None)."""
        if not self.enabled:
            return None
        if self._bar is not None:
            self._bar.close()
            self._bar = None
        if self._file is not None:
            self._file.close()
            self._file = None
        return plot_metrics(self.run_dir) if self.plot else None

    def __enter__(self) -> MetricsLogger:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def _fmt(value: float | None) -> str:
    return "nan" if value is None else f"{value:.4f}"


def plot_metrics(run_dir: str | os.PathLike[str], out: str | os.PathLike[str] | None = None) -> Path | None:
    """Plot ``RUN_DIR/metrics.jsonl`` to ``out`` (default ``RUN_DIR/metrics.png``): training loss per head (and
    the total objective), validation loss per head, and the learning rate. None when there is nothing to plot."""
    train, val = read_metrics(run_dir, "train"), read_metrics(run_dir, "validation")
    if not train and not val:
        return None
    from matplotlib.figure import Figure  # no pyplot: no global backend state, Agg is used for files

    has_lr = any(e.get("lr") is not None for e in train)
    panels = [("train", train), ("validation", val)]
    panels = [(name, entries) for name, entries in panels if entries]
    fig = Figure(figsize=(5.5 * (len(panels) + has_lr), 4))
    axes = fig.subplots(1, len(panels) + has_lr, squeeze=False)[0]
    for ax, (name, entries) in zip(axes, panels, strict=False):
        per_head = [head_losses(e) for e in entries]
        heads = list(dict.fromkeys(k for losses in per_head for k in losses))
        for head in heads:
            points = [(e["step"], losses[head]) for e, losses in zip(entries, per_head, strict=True)
                      if losses.get(head) is not None]
            if points:
                ax.plot(*zip(*points, strict=True), label=head, marker="o" if name == "validation" else None,
                        markersize=3)
        total = [(e["step"], e["loss"]) for e in entries if e.get("loss") is not None]
        if total:
            ax.plot(*zip(*total, strict=True), label="loss (objective)" if heads else "loss", color="black",
                    linestyle="--", linewidth=1)
        ax.set_title(f"{name} loss")
        ax.set_xlabel("step")
        ax.set_ylabel("cross-entropy")
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
    if has_lr:
        ax = axes[-1]
        points = [(e["step"], e["lr"]) for e in train if e.get("lr") is not None]
        ax.plot(*zip(*points, strict=True))
        ax.set_title("learning rate")
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    fig.tight_layout()
    path = Path(out) if out is not None else Path(run_dir) / PLOT_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    return path
