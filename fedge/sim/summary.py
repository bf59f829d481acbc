"""``fedge report DIR``: a finished or running federation as a table and plots, from whatever it left behind.

DIR is a simulation's ``--out`` (its ``metrics.json``, ``fedge.sim.report``) or a server's ``--data`` (its
store, read through ``server.history``). Each holds different figures: a simulation evaluated every round
and knows where each device trained; a server knows when each update arrived, so its rounds' time splits
into waiting for the first update, the updates arriving, and closing. The summary keeps what exists and
leaves the rest empty, rather than inventing it.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.table import Table

from fedge.console import UserError, console, user_errors


@dataclass(frozen=True)
class SummaryRow:
    round: int
    state: str
    updates: int
    seconds: float
    bytes_up: int
    accuracy: float | None = None
    loss: float | None = None
    waiting: float | None = None  # open to the first update
    arriving: float | None = None  # first update to the last: clients training and uploading
    closing: float | None = None  # last update to close: aggregation
    cost: float | None = None  # what the round's updates were billed (fedge.pricing)
    federated_accuracy: float | None = None  # the asked clients', on their own held-out data
    federated_loss: float | None = None


@dataclass(frozen=True)
class Summary:
    source: str  # "simulation" or "server"
    rows: list[SummaryRow]
    placements: dict[str, int] = field(default_factory=dict)  # client-rounds by where they ran


def load(directory: Path) -> Summary:
    if not directory.is_dir():
        raise UserError(f"{directory} is not a directory")
    if (directory / "metrics.json").is_file():
        return _from_metrics(directory / "metrics.json")
    if (directory / "state.db").is_file():
        return _from_store(directory)
    raise UserError(f"{directory} holds neither a simulation's metrics.json nor a server's state.db")


def _from_metrics(path: Path) -> Summary:
    try:
        metrics = json.loads(path.read_text())
        rows = [
            SummaryRow(
                round=int(r["round"]), state="done", updates=int(r["updates"]), seconds=float(r["seconds"]),
                bytes_up=int(r["bytes_up"]), accuracy=_optional(r["accuracy"]), loss=float(r["loss"]),
                cost=_optional(r.get("cost")),
                federated_accuracy=_optional(r.get("federated_accuracy")),
                federated_loss=_optional(r.get("federated_loss")),
            )
            for r in metrics["rounds"]
        ]  # fmt: skip
        placements = {str(k): int(v) for k, v in metrics.get("placements", {}).items()}
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        why = f"no {exc} in it" if isinstance(exc, KeyError) else str(exc)
        raise UserError(f"{path} is not a simulation's metrics.json: {why}") from None
    return Summary("simulation", rows, placements)


def _from_store(directory: Path) -> Summary:
    from fedge.server.history import client_figures, open_ledger, round_figures

    ledger = open_ledger(directory)
    rows = [
        SummaryRow(
            round=f.round, state=f.state, updates=f.updates, seconds=f.seconds, bytes_up=f.bytes,
            waiting=f.waiting, arriving=f.arriving, closing=f.closing, cost=f.cost, accuracy=f.accuracy,
            loss=f.loss, federated_accuracy=f.federated_accuracy, federated_loss=f.federated_loss,
        )
        for f in round_figures(ledger, time.time())
    ]  # fmt: skip
    placements: dict[str, int] = {}
    for client in client_figures(ledger, [], {}, {}):
        for where, n in client.placements.items():
            placements[where] = placements.get(where, 0) + n
    return Summary("server", rows, placements)


def table(summary: Summary, title: str) -> Table:
    """A row per round; a column only for a figure some round has (a server evaluates none yet, a
    simulation does not split round time)."""
    cells: dict[str, list[str | None]] = {
        "round": [str(r.round) for r in summary.rows],
        "state": [r.state for r in summary.rows],
        "accuracy": [_figure(r.accuracy, 4) for r in summary.rows],
        "loss": [_figure(r.loss, 4) for r in summary.rows],
        "fed. accuracy": [_figure(r.federated_accuracy, 4) for r in summary.rows],
        "fed. loss": [_figure(r.federated_loss, 4) for r in summary.rows],
        "updates": [str(r.updates) for r in summary.rows],
        "seconds": [f"{r.seconds:.2f}" for r in summary.rows],
        "waiting": [_figure(r.waiting, 2) for r in summary.rows],
        "arriving": [_figure(r.arriving, 2) for r in summary.rows],
        "closing": [_figure(r.closing, 2) for r in summary.rows],
        "MB up": [f"{r.bytes_up / 1e6:.2f}" for r in summary.rows],
        "cost": [_figure(r.cost, 6) if r.cost else None for r in summary.rows],  # a run billed nothing: none
    }
    shown = {name: column for name, column in cells.items() if any(c is not None for c in column)}
    rendered = Table(title=title)
    for name in shown:
        rendered.add_column(name, justify="right")
    for values in zip(*shown.values(), strict=True):
        rendered.add_row(*(v if v is not None else "-" for v in values))
    return rendered


def _optional(value: object) -> float | None:
    """A figure a run may lack: an app without accuracy, a round not billed or not evaluated by clients."""
    return None if value is None else float(value)  # type: ignore[arg-type]


def _figure(value: float | None, digits: int) -> str | None:
    return None if value is None else f"{value:.{digits}f}"


def write_plots(summary: Summary, out: Path) -> list[Path]:
    """The plots the figures allow: accuracy and loss, the split of round time, placements."""
    from fedge.sim.plots import accuracy_plot, bar_plot, round_time_plot

    written = []
    evaluated = [r for r in summary.rows if r.accuracy is not None and r.loss is not None]
    if evaluated:
        written.append(out / "accuracy.png")
        accuracy_plot(
            [r.round for r in evaluated], [r.accuracy or 0.0 for r in evaluated],
            [r.loss or 0.0 for r in evaluated], written[-1],
        )  # fmt: skip
    split = [r for r in summary.rows if r.waiting is not None]
    if split:
        written.append(out / "round-time.png")
        parts: dict[str, list[Any]] = {
            "waiting for the first update": [r.waiting for r in split],
            "updates arriving (training, upload)": [r.arriving or 0.0 for r in split],
            "closing (aggregation)": [r.closing or 0.0 for r in split],
        }
        round_time_plot([r.round for r in split], parts, written[-1])
    if summary.placements:
        written.append(out / "placements.png")
        bar_plot(summary.placements, "client-rounds", written[-1])
    return written


def report(
    directory: Annotated[Path, typer.Argument(help="a simulation's --out or a server's --data")],
    out: Annotated[Path | None, typer.Option(help="where the PNG plots go [DIRECTORY]")] = None,
) -> None:
    """Summarize a run: a table of its rounds, and its plots as PNG (accuracy and loss, round time,
    placements), from what the run recorded."""
    with user_errors(OSError):
        summary = load(directory)
        target = out or directory
        target.mkdir(parents=True, exist_ok=True)
        plots = write_plots(summary, target)
    console.print(table(summary, f"fedge report: {directory} ({summary.source})"))
    if any(r.cost is not None for r in summary.rows):
        console.print(f"cost of the run: {sum(r.cost or 0.0 for r in summary.rows):.6f}")
    if summary.placements:
        where = ", ".join(f"{n} {kind}" for kind, n in sorted(summary.placements.items()))
        console.print(f"client-rounds: {where}")
    console.print("plots: " + (", ".join(str(p) for p in plots) if plots else "none (no rounds yet)"))
