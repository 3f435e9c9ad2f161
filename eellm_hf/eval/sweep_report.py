"""``eellm-sweep``'s outputs: the CSV table and the two figures (speed against quality, exits per threshold)."""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Any

FULL = "full"
"""The ``threshold`` label of the full-depth run."""


def write_csv(rows: list[dict[str, Any]], path: Path, layers: list[int]) -> None:
    """``rows`` as CSV: ``tokens_per_exit`` becomes one ``tokens_layer_<L>`` column per layer."""
    scalar = [key for key in rows[0] if key != "tokens_per_exit"]
    extra = sorted({key for row in rows for key in row} - set(scalar) - {"tokens_per_exit"})
    fields = scalar + extra + [f"tokens_layer_{layer}" for layer in layers]
    with path.open("w", newline="", encoding="utf-8") as fh:
        writer = csv.DictWriter(fh, fieldnames=fields)
        writer.writeheader()
        for row in rows:
            flat = {key: row.get(key) for key in scalar + extra}
            flat["threshold"] = FULL if row["threshold"] is None else row["threshold"]
            flat.update({f"tokens_layer_{layer}": row["tokens_per_exit"].get(str(layer), 0) for layer in layers})
            writer.writerow(flat)


def label(threshold: float | None) -> str:
    """How a threshold is written in the table and figures (``full`` for full depth)."""
    return FULL if threshold is None else f"{threshold:g}"


def plot_speed_quality(rows: list[dict[str, Any]], path: Path, metric: str | None, title: str) -> None:
    """Quality (``metric``) and token agreement against speedup, one point per setting."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.4))
    speedups = [row["speedup"] for row in rows]
    series = [("agreement", "token agreement with full depth", "s--")]
    if metric is not None and all(row.get(metric) is not None for row in rows):
        series.insert(0, (metric, metric, "o-"))
    for key, name, style in series:
        values = [row[key] for row in rows]
        ax.plot(speedups, values, style, label=name)
        for x, y, row in zip(speedups, values, rows):
            ax.annotate(label(row["threshold"]), (x, y), textcoords="offset points", xytext=(3, 4), fontsize=7)
    ax.axvline(1.0, color="grey", linewidth=0.5)
    ax.set_xlabel("speedup against full depth (per generated token, paired wall clock)")
    ax.set_ylabel("quality")
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_exit_histogram(rows: list[dict[str, Any]], path: Path, layers: list[int], num_layers: int,
                        title: str) -> None:
    """Stacked bars: per setting, the share of generated tokens produced at each layer."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(max(5.0, 0.55 * len(rows) + 2.5), 4.4))
    labels = [label(row["threshold"]) for row in rows]
    bottoms = [0.0] * len(rows)
    colors = plt.get_cmap("viridis")
    for position, layer in enumerate(layers):
        shares = [row["tokens_per_exit"].get(str(layer), 0) / row["tokens"] if row["tokens"] else 0.0
                  for row in rows]
        name = f"layer {layer}" + (" (final head)" if layer == num_layers else "")
        ax.bar(labels, shares, bottom=bottoms, label=name, color=colors(position / max(1, len(layers) - 1)))
        bottoms = [b + s for b, s in zip(bottoms, shares)]
    ax.set_xlabel("early-exit threshold")
    ax.set_ylabel("share of generated tokens")
    ax.set_ylim(0, 1)
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize=8, loc="lower left")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


__all__ = ["FULL", "label", "plot_exit_histogram", "plot_speed_quality", "write_csv"]
