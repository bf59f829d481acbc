"""Plots of a run, for the results a curve says more about than a table."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    return plt


def accuracy_plot(
    rounds: Sequence[int], accuracy: Sequence[float], loss: Sequence[float], path: Path
) -> None:
    plt = _pyplot()
    fig, left = plt.subplots(figsize=(6, 3.5), dpi=120)
    left.plot(rounds, accuracy, marker="o", color="tab:blue")
    left.set_xlabel("round")
    left.set_ylabel("test accuracy", color="tab:blue")
    left.set_ylim(0, 1)
    left.grid(alpha=0.3)
    right = left.twinx()
    right.plot(rounds, loss, marker=".", color="tab:orange")
    right.set_ylabel("test loss", color="tab:orange")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def round_time_plot(rounds: Sequence[int], parts: Mapping[str, Sequence[float]], path: Path) -> None:
    """Each round's seconds as stacked bars, one colour per part of the round."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 3.5), dpi=120)
    bottom = [0.0] * len(rounds)
    for label, seconds in parts.items():
        ax.bar(rounds, seconds, bottom=bottom, label=label)
        bottom = [b + s for b, s in zip(bottom, seconds, strict=True)]
    ax.set_xlabel("round")
    ax.set_ylabel("seconds")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3, axis="y")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def bar_plot(counts: Mapping[str, int], ylabel: str, path: Path) -> None:
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 3.5), dpi=120)
    names = sorted(counts)
    ax.bar(names, [counts[n] for n in names], color="tab:green")
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3, axis="y")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
