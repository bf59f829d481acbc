"""Plots of a run, for the results a curve says more about than a table."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path


def accuracy_plot(
    rounds: Sequence[int], accuracy: Sequence[float], loss: Sequence[float], path: Path
) -> None:
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

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
