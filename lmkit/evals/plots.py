"""PNG charts for eval results (matplotlib, headless)."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (backend must be chosen first)


def grouped_bars(
    path: Path, title: str, labels: list[str], series: dict[str, list[float]], ylabel: str
) -> Path:
    """One group of bars per label, one bar per series (e.g. per run)."""
    fig, ax = plt.subplots(figsize=(max(6, 1.2 * len(labels) * max(1, len(series))), 4))
    width = 0.8 / max(1, len(series))
    for index, (name, values) in enumerate(series.items()):
        positions = [i + index * width for i in range(len(labels))]
        ax.bar(positions, values, width, label=name)
    ax.set_xticks(
        [i + width * (len(series) - 1) / 2 for i in range(len(labels))], labels, rotation=20, ha="right"
    )
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    if len(series) > 1:
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def quality_bars(
    path: Path, title: str, cells: list[tuple[str, str]], series: dict[str, list[float]]
) -> None:
    """Scores per (task, metric) cell, one bar per run; nothing is drawn when there is no cell."""
    if cells:
        grouped_bars(path, title, [f"{task}\n{metric}" for task, metric in cells], series, "score")


def lines(
    path: Path, title: str, x: list[float], series: dict[str, list[float]], xlabel: str, ylabel: str
) -> Path:
    fig, ax = plt.subplots(figsize=(6, 4))
    for name, values in series.items():
        ax.plot(x, values, marker="o", label=name)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
