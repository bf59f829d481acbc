"""The ``fedge`` command. Each part brings its own commands; heavy imports wait until a command runs."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from fedge.client.cli import app as agent_app
from fedge.console import console, user_errors
from fedge.security.broker_cli import app as broker_app
from fedge.security.cli import app as pki_app
from fedge.server.cli import server
from fedge.settings import SimulationSettings

app = typer.Typer(
    help="fedge: federated learning across edge devices, the serverless way.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)
app.add_typer(pki_app, name="pki")
app.add_typer(broker_app, name="broker")
app.add_typer(agent_app, name="agent")
app.command()(server)


@app.command()
def simulate(
    clients: Annotated[int | None, typer.Option(help="simulated clients [10]")] = None,
    rounds: Annotated[int | None, typer.Option(help="rounds of FedAvg [10]")] = None,
    local_epochs: Annotated[int | None, typer.Option(help="local epochs per round [1]")] = None,
    dataset: Annotated[str | None, typer.Option(help="mnist, digits or shakespeare [mnist]")] = None,
    partition: Annotated[
        str | None, typer.Option(help="iid, natural or dirichlet:ALPHA [dirichlet:0.5]")
    ] = None,
    seed: Annotated[int | None, typer.Option(help="seed of model and partition [0]")] = None,
    out: Annotated[Path | None, typer.Option(help="where results go [fedge-run]")] = None,
    workers: Annotated[int | None, typer.Option(help="warm worker processes [one per core]")] = None,
    batch_size: Annotated[int | None, typer.Option(help="client batch size [32]")] = None,
    lr: Annotated[float | None, typer.Option(help="client learning rate [0.05]")] = None,
    round_timeout: Annotated[float | None, typer.Option(help="seconds a round stays open [600]")] = None,
) -> None:
    """Run a federation on this machine: real mTLS, a real server process, warm client functions."""
    from fedge.plots import accuracy_plot
    from fedge.simulation import simulate as run

    with user_errors():
        settings = SimulationSettings.from_flags(
            clients=clients, rounds=rounds, local_epochs=local_epochs, dataset=dataset, partition=partition,
            seed=seed, out=out, workers=workers, batch_size=batch_size, lr=lr, round_timeout=round_timeout,
        )  # fmt: skip
        columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
        with Progress(*columns, console=console, transient=True) as progress:
            bar = progress.add_task("round 1", total=settings.rounds)

            def advance(metrics: object) -> None:
                progress.update(
                    bar,
                    advance=1,
                    description=f"round {metrics.round + 1} (accuracy {metrics.accuracy:.3f})",  # type: ignore[attr-defined]
                )

            report = run(settings, on_round=advance)
    table = Table(
        title=f"fedge simulate: {settings.clients} clients, {settings.dataset}, {settings.partition}"
    )
    for column in ("round", "accuracy", "loss", "updates", "seconds", "MB up", "MB down"):
        table.add_column(column, justify="right")
    for r in report.rounds:
        table.add_row(
            str(r.round), f"{r.accuracy:.4f}", f"{r.loss:.4f}", str(r.updates), f"{r.seconds:.2f}",
            f"{r.bytes_up / 1e6:.2f}", f"{r.bytes_down / 1e6:.2f}",
        )  # fmt: skip
    console.print(table)
    accuracy_plot(
        [r.round for r in report.rounds],
        [r.accuracy for r in report.rounds],
        [r.loss for r in report.rounds],
        settings.out / "accuracy.png",
    )
    console.print(
        f"{report.seconds:.1f} s in all; metrics.json, model.safetensors, accuracy.png in {settings.out}/"
    )
