"""The ``fedge`` command. Each part brings its own commands; heavy imports wait until a command runs."""

from __future__ import annotations

import math
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from fedge import extras
from fedge.client.cli import app as agent_app
from fedge.console import command_group, console, user_errors
from fedge.edge_functions.cli import executor
from fedge.files import made_dir
from fedge.security.broker_cli import app as broker_app
from fedge.security.cli import app as pki_app
from fedge.server.cli import (
    Buffer,
    EvaluateEvery,
    Fraction,
    FractionEvaluate,
    MaxStaleness,
    StalenessExponent,
    server,
    strategy_of,
    strategy_options,
)
from fedge.server.dashboard_cli import dashboard
from fedge.server.history import runs
from fedge.server.strategies.registry import settings_fields
from fedge.settings import SimulationSettings
from fedge.sim.summary import report

if TYPE_CHECKING:
    from fedge.sim.report import Report

app = command_group("fedge: federated learning across edge devices, the serverless way.")
app.add_typer(pki_app, name="pki")
app.add_typer(broker_app, name="broker")
app.add_typer(agent_app, name="agent")
app.command()(server)
app.command()(executor)
app.command()(dashboard)
app.command()(runs)
app.command()(report)


@app.command()
@strategy_options
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
    attack: Annotated[
        str | None, typer.Option(help="malicious clients' attack: sign-flip, scale, noise")
    ] = None,
    attackers: Annotated[float | None, typer.Option(help="share of clients that attack [0]")] = None,
    attack_scale: Annotated[float | None, typer.Option(help="how far attackers push [4.0]")] = None,
    fraction: Fraction = None,
    fraction_evaluate: FractionEvaluate = None,
    evaluate_every: EvaluateEvery = None,
    buffer: Buffer = None,
    max_staleness: MaxStaleness = None,
    staleness_exponent: StalenessExponent = None,
    compression: Annotated[
        str | None, typer.Option(help="clients' updates: none, float16, int8 [none]")
    ] = None,
    stragglers: Annotated[float | None, typer.Option(help="share of clients that are slow [0]")] = None,
    straggler_delay: Annotated[float | None, typer.Option(help="seconds a straggler lags [5]")] = None,
    profile: Annotated[
        Path | None, typer.Option(help="device profiles (TOML): slowdown, memory, dropout, bandwidth")
    ] = None,
    placement: Annotated[
        str | None,
        typer.Option(
            help="with --profile: fedge, or a baseline: edge-only, cloud-only, stoic, oracle [fedge]"
        ),
    ] = None,
    train_memory_mb: Annotated[
        float | None, typer.Option(help="with --profile: memory a training run needs on a device [256]")
    ] = None,
    prices: Annotated[
        Path | None,
        typer.Option(dir_okay=False, help="price table (TOML) rounds are billed at [example rates]"),
    ] = None,
    max_cost: Annotated[
        float | None, typer.Option(min=0.0, help="with --profile: each device's budget per round [none]")
    ] = None,
    dashboard: Annotated[
        int | None,
        typer.Option(
            min=1, max=65535, help="serve the live dashboard on this port of 127.0.0.1 during the run"
        ),
    ] = None,
    backend: Annotated[
        str | None, typer.Option(help="where clients run: local (warm workers) or ray [local]")
    ] = None,
    ray_address: Annotated[
        str | None, typer.Option(help="with --backend ray: a cluster's address [a local one]")
    ] = None,
    runtime: Annotated[
        str | None, typer.Option(help="what hosts each warm client function: process or container [process]")
    ] = None,
    image: Annotated[
        str | None, typer.Option(help="with --runtime container: the image [fedge/agent:VERSION]")
    ] = None,
    app_: Annotated[
        str | None, typer.Option("--app", help="the clients' own app: module:attr or an entry point name")
    ] = None,
    flower_app: Annotated[
        Path | None, typer.Option(help="a Flower app directory (its pyproject.toml), run unmodified")
    ] = None,
    run_config: Annotated[
        str | None, typer.Option(help='with --flower-app: "k=v k=v" over [tool.flwr.app.config]')
    ] = None,
    **knobs: Any,
) -> None:
    """Run a federation on this machine: real mTLS, a real server process, warm client functions."""
    from fedge.sim.run import simulate as run

    with user_errors(OSError):
        settings = SimulationSettings.with_knobs(settings_fields()).from_flags(
            clients=clients, rounds=rounds, local_epochs=local_epochs, dataset=dataset, partition=partition,
            seed=seed, out=out, workers=workers, batch_size=batch_size, lr=lr, round_timeout=round_timeout,
            attack=attack, attackers=attackers, attack_scale=attack_scale, fraction=fraction, buffer=buffer,
            fraction_evaluate=fraction_evaluate, evaluate_every=evaluate_every, max_staleness=max_staleness,
            staleness_exponent=staleness_exponent, stragglers=stragglers,
            straggler_delay=straggler_delay, compression=compression, profile=profile, placement=placement,
            train_memory_mb=train_memory_mb, backend=backend, ray_address=ray_address, runtime=runtime,
            image=image, app=app_,
            flower_app=flower_app, run_config=run_config, prices=prices, max_cost=max_cost, **knobs,
        )  # fmt: skip
        strategy_of(settings)  # a bad strategy is refused here, not by the server it would start
        columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
        with made_dir(settings.out), Progress(*columns, console=console, transient=True) as progress:
            bar = progress.add_task("round 1", total=settings.rounds)

            def advance(metrics: object) -> None:
                progress.update(
                    bar,
                    advance=1,
                    description=f"round {metrics.round + 1} (accuracy {_figure(metrics.accuracy)})",  # type: ignore[attr-defined]
                )

            report = run(settings, on_round=advance, dashboard=dashboard)
    _show(report, settings)


def _figure(value: float | None) -> str:
    """A figure a run may lack (an app that reports no accuracy): a dash then."""
    return "-" if value is None else f"{value:.4f}"


def _cost(value: float | None) -> str:
    return "-" if value is None else f"{value:.6f}"


def _show(report: Report, settings: SimulationSettings) -> None:
    """What a person reads after a simulation: a table per round, the plot, and the run's totals."""
    from fedge.sim.plots import accuracy_plot

    attacked = f", {len(report.attackers)} attacking ({settings.attack})" if report.attackers else ""
    table = Table(
        title=f"fedge simulate: {settings.clients} clients{attacked}, {settings.dataset}, "
        f"{settings.partition}, {settings.strategy}"
    )
    federated = settings.fraction_evaluate > 0  # the asked clients' figures, beside the central ones
    for column in ("round", "accuracy", "loss", *(("fed. accuracy", "fed. loss") if federated else ()),
                   "updates", "seconds", "MB up", "MB down", "cost", "fit metrics"):  # fmt: skip
        table.add_column(column, justify="right")
    for r in report.rounds:
        fitted = " ".join(f"{k}={v:.4g}" for k, v in sorted(r.train_metrics.items()))
        beside = (_figure(r.federated_accuracy), _figure(r.federated_loss)) if federated else ()
        table.add_row(
            str(r.round), _figure(r.accuracy), f"{r.loss:.4f}", *beside, str(r.updates), f"{r.seconds:.2f}",
            f"{r.bytes_up / 1e6:.2f}", f"{r.bytes_down / 1e6:.2f}", _cost(r.cost), fitted,
        )  # fmt: skip
    console.print(table)
    accuracy_plot(
        [r.round for r in report.rounds],
        [math.nan if r.accuracy is None else r.accuracy for r in report.rounds],
        [r.loss for r in report.rounds],
        settings.out / "accuracy.png",
    )
    if "dp_epsilon" in report.model_metadata:
        meta = report.model_metadata
        console.print(f"privacy spent: epsilon {meta['dp_epsilon']} at delta {meta['dp_delta']}")
    if report.completion_rate is not None:
        where = ", ".join(f"{n} {place}" for place, n in sorted(report.placements.items()))
        console.print(
            f"updates arrived before the deadline: {report.arrived} of {report.asked} "
            f"({report.completion_rate:.1%}); client-rounds: {where}"
        )
    if settings.profile is not None:
        agreement = (
            "" if report.oracle_agreement is None else f"; {report.oracle_agreement:.1%} as the oracle"
        )
        console.print(f"raw data offloaded: {report.raw_bytes_offloaded / 1e6:.2f} MB (sealed){agreement}")
    if report.cost is not None:
        rates = settings.prices or "the example rates (--prices to set your own)"
        console.print(f"cost of the run: {report.cost:.6f} at {rates}")
    sent = sum(r.bytes_up for r in report.rounds)
    console.print(f"updates sent: {sent / 1e6:.2f} MB ({settings.compression} compression)")
    console.print(
        f"{report.seconds:.1f} s in all; metrics.json, model.safetensors, accuracy.png in {settings.out}/"
    )


extras.guard(app)  # last, once every command is wired: those needing an extra say which when it is missing
