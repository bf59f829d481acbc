"""``fedge agent``: what a device owner runs: enroll, renew, run the agent, see its status."""

from __future__ import annotations

import datetime as dt
import logging
import math
import signal
import ssl
import time
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from fedge import pricing
from fedge.console import UserError, command_group, console, fail, user_errors, warn
from fedge.security.pki import PKIError

if TYPE_CHECKING:
    from fedge.client.agent import AgentConfig
    from fedge.client.settings import AgentSettings
    from fedge.edge_functions.containers import ContainerSettings
    from fedge.mqtt import BrokerAddress

app = command_group("The edge agent a device runs: enroll, renew, run, status.")
StateDir = Annotated[
    Path, typer.Option("--dir", file_okay=False, help="the agent's state directory (credentials)")
]


@app.command()
def run(
    state_dir: Annotated[
        Path | None, typer.Option("--dir", file_okay=False, help="the agent's state directory")
    ] = None,
    data: Annotated[
        Path | None,
        typer.Option(
            help="this device's examples: .npz (x, y), .csv, or a folder of class folders of images"
        ),
    ] = None,
    label: Annotated[str | None, typer.Option(help="a CSV's label column [the last]")] = None,
    eval_data: Annotated[
        Path | None,
        typer.Option(help="held-out examples (as --data) to score the models the server asks about [--data]"),
    ] = None,
    app_: Annotated[
        str | None, typer.Option("--app", help="the owner's app: module:attr, or an entry point name")
    ] = None,
    flower_app: Annotated[
        Path | None, typer.Option(help="a Flower app directory whose ClientApp trains here, unmodified")
    ] = None,
    run_config: Annotated[str | None, typer.Option(help='the app\'s run config: "k=v k=v"')] = None,
    node_config: Annotated[
        str | None, typer.Option(help='the Flower client\'s node: "partition-id=0 num-partitions=1"')
    ] = None,
    server: Annotated[str | None, typer.Option(help="aggregation service [the one enrolled with]")] = None,
    broker: Annotated[str | None, typer.Option(help="MQTT broker HOST:PORT [long-poll the server]")] = None,
    ca: Annotated[Path | None, typer.Option(help="federation CA [DIR/ca.pem]")] = None,
    cert: Annotated[Path | None, typer.Option(help="client certificate [DIR/client.pem]")] = None,
    key: Annotated[Path | None, typer.Option(help="client key [DIR/client.key]")] = None,
    keep_alive: Annotated[float | None, typer.Option(help="seconds an idle worker stays warm [300]")] = None,
    runtime: Annotated[
        str | None, typer.Option(help="what hosts the warm function: process or container [process]")
    ] = None,
    image: Annotated[
        str | None, typer.Option(help="with --runtime container: the image [fedge/agent:VERSION]")
    ] = None,
    function_memory_mb: Annotated[
        float | None, typer.Option(help="with --runtime container: the function's memory limit [2048]")
    ] = None,
    function_cpus: Annotated[
        float | None, typer.Option(help="with --runtime container: the function's CPU limit [all cores]")
    ] = None,
    poll_wait: Annotated[float | None, typer.Option(help="long-poll seconds without a broker [10]")] = None,
    offload: Annotated[
        str | None,
        typer.Option(help="send training, sealed, to an executor: never, when-short, always [never]"),
    ] = None,
    executor: Annotated[
        list[str] | None, typer.Option(help="an executor the owner allows: ID=https://HOST:PORT (repeatable)")
    ] = None,
    train_memory_mb: Annotated[
        float | None, typer.Option(help="memory a training run needs here; less free: not here [0]")
    ] = None,
    prices: Annotated[
        Path | None,
        typer.Option(dir_okay=False, help="price table (TOML) to price placements [examples]"),
    ] = None,
    max_cost: Annotated[
        float | None, typer.Option(min=0.0, help="budget per round: past it fewer steps or a skip [none]")
    ] = None,
) -> None:
    """Train for the federation whenever a round is announced, until SIGTERM or Ctrl-C."""
    from fedge.client.agent import Agent
    from fedge.client.settings import AgentSettings
    from fedge.edge_functions.containers import ContainerError

    with user_errors(ValueError, OSError, ContainerError):
        settings = AgentSettings.from_flags(
            dir=state_dir, data=data, server=server, broker=broker, ca=ca, cert=cert, key=key,
            keep_alive=keep_alive, runtime=runtime, image=image, function_memory_mb=function_memory_mb,
            function_cpus=function_cpus, poll_wait=poll_wait, offload=offload, executor=executor,
            train_memory_mb=train_memory_mb, label=label, eval_data=eval_data, app=app_,
            flower_app=flower_app, run_config=run_config, node_config=node_config, prices=prices,
            max_cost=max_cost,
        )  # fmt: skip
        agent = Agent(_config(settings))
    # The handlers stop whichever agent runs: after renewing its certificate, a fresh one on the new files.
    signal.signal(signal.SIGTERM, lambda *_: agent.stop())
    signal.signal(signal.SIGINT, lambda *_: agent.stop())
    console.print(f"fedge agent {agent.config.identity.id} for {agent.config.server}")
    placement_log = logging.getLogger("fedge.placement")  # each decision: predicted and actual seconds
    placement_log.addHandler(logging.StreamHandler())
    placement_log.setLevel(logging.INFO)
    stamped = logging.Formatter("%(asctime)s %(message)s", "%Y-%m-%d %H:%M:%S")
    stamped.converter = time.gmtime  # UTC, as the server's round log
    rounds = logging.StreamHandler()  # heard, placed where and why, trained, sent: a line each
    rounds.setFormatter(stamped)
    logging.getLogger("fedge.agent").addHandler(rounds)
    logging.getLogger("fedge.agent").setLevel(logging.INFO)
    agent.run()
    while agent.renewed and not agent.stopping:
        with user_errors(ValueError, OSError, ContainerError):
            agent = Agent(_config(settings))
        console.print(f"renewed the certificate of {agent.config.identity.id}: going on with the new one")
        agent.run()
    if agent.refused:
        fail(agent.refused)


def _config(settings: AgentSettings) -> AgentConfig:
    """Check everything a user gave before the agent starts, so mistakes are one line, not a crash."""
    from cryptography import x509
    from cryptography.hazmat.primitives import serialization

    from fedge.client.agent import AgentConfig
    from fedge.client.planner import ExecutorTarget
    from fedge.client.policy import OffloadSetting
    from fedge.edge_functions import datafiles
    from fedge.edge_functions.datafiles import DataError
    from fedge.security import pki
    from fedge.security.tls import client_context

    creds = pki.Credentials(
        ca=settings.ca or settings.dir / "ca.pem",
        cert=settings.cert or settings.dir / "client.pem",
        key=settings.key or settings.dir / "client.key",
    )
    for path in (creds.ca, creds.cert, creds.key):
        if not path.is_file():
            raise UserError(f"{path} does not exist: enroll the device or pass --ca, --cert and --key")
    try:
        client_context(creds)  # what every connection loads: a wrong file is said here, once
    except ssl.SSLError as exc:
        raise UserError(
            f"cannot use {creds.ca}, {creds.cert} and {creds.key} as the CA, certificate and key: {exc}"
        ) from None
    try:
        certificate = x509.load_pem_x509_certificate(creds.cert.read_bytes())
        identity = pki.identity_of(certificate.public_bytes(serialization.Encoding.DER))
    except (ValueError, pki.PKIError) as exc:
        raise UserError(f"{creds.cert} is not a fedge certificate: {exc}") from None
    if identity.role is not pki.Role.CLIENT:
        raise UserError(f"{creds.cert} is a {identity.role} certificate, not a client's")
    if certificate.not_valid_after_utc < dt.datetime.now(dt.UTC):
        raise UserError(
            f"{creds.cert} expired on {certificate.not_valid_after_utc:%Y-%m-%d %H:%M} UTC: "
            "enroll the device again (`fedge agent enroll`) or issue it a new certificate"
        )
    server = settings.server or _enrolled_server(settings.dir)
    if not server.startswith("https://"):
        raise UserError(f"--server must be an https:// URL, not {server!r}")
    app, run_config, partition = _app(settings)
    if settings.label is not None and (settings.data is None or settings.data.suffix.lower() != ".csv"):
        raise UserError(
            f"--label names a CSV's label column, and --data {settings.data or '(none)'} is no .csv"
        )
    if settings.data is not None:
        with user_errors(DataError):
            datafiles.load(settings.data, settings.label)  # a file that cannot be read is said now, once
    elif settings.flower_app is None and settings.app is None:
        raise UserError("--data is needed: this device's examples (.npz, .csv or a folder of images)")
    if settings.eval_data is not None:
        with user_errors(DataError):
            datafiles.load(settings.eval_data, settings.label)
    if settings.offload is not OffloadSetting.NEVER and (app is not None or settings.data is None):
        raise UserError("--offload trains the federation's task on --data: it cannot send an app's rounds")
    return AgentConfig(
        containers=_containers(settings),
        state_dir=settings.dir,
        data=None if settings.data is None else settings.data.resolve(),
        eval_data=None if settings.eval_data is None else settings.eval_data.resolve(),
        app=app,
        run_config=run_config,
        partition=partition,
        label=settings.label,
        server=server,
        broker=_broker(settings.broker) if settings.broker else None,
        creds=pki.Credentials(creds.ca.resolve(), creds.cert.resolve(), creds.key.resolve()),
        identity=identity,
        keep_alive=settings.keep_alive,
        poll_wait=settings.poll_wait,
        offload=settings.offload,
        executors=tuple(ExecutorTarget.parse(e) for e in settings.executor),
        train_memory=int(settings.train_memory_mb * 2**20),
        prices=_prices(settings.prices),
        max_cost=math.inf if settings.max_cost is None else settings.max_cost,
        expires=certificate.not_valid_after_utc,
        # Enrolled credentials renew themselves; files given as flags belong to whoever issued them.
        renew_at=None
        if settings.cert or not (settings.dir / "agent.json").is_file()
        else pki.renewal_time(certificate.not_valid_before_utc, certificate.not_valid_after_utc),
    )


def _containers(settings: AgentSettings) -> ContainerSettings | None:
    """With ``--runtime container``: the instance's image and limits, and what it may see (the data and a
    Flower app's directory, read-only; never the state directory)."""
    from fedge.edge_functions import containers

    if settings.runtime != "container":
        return None
    return containers.ContainerSettings(
        image=settings.image or containers.DEFAULT_IMAGE,
        memory=int(settings.function_memory_mb * 2**20),
        cpus=settings.function_cpus,
        data=containers.data_mounts((settings.data, settings.eval_data, settings.flower_app), settings.dir),
    )


def _prices(path: Path | None) -> pricing.Prices:
    try:
        return pricing.prices_from(path)
    except pricing.PriceError as exc:
        raise UserError(str(exc)) from None


def _app(settings: AgentSettings) -> tuple[str | None, dict, tuple[int, int]]:
    """The app that trains here (``--app``, ``--flower-app``), its run config and the client's partition."""
    from fedge.edge_functions.app import AppError, parse_run_config

    if settings.app is not None and settings.flower_app is not None:
        raise UserError("--app and --flower-app name the app twice: give one")
    if settings.flower_app is not None and not (settings.flower_app / "pyproject.toml").is_file():
        raise UserError(f"--flower-app {settings.flower_app} has no pyproject.toml: it is not a Flower app")
    with user_errors(AppError):
        run_config = parse_run_config(settings.run_config)
        node = parse_run_config(settings.node_config)
    unknown = sorted(set(node) - {"partition-id", "num-partitions"})
    if unknown:
        raise UserError(f"--node-config knows partition-id and num-partitions, not {unknown[0]!r}")
    partition = (node.get("partition-id", 0), node.get("num-partitions", 1))
    if not all(isinstance(n, int) and not isinstance(n, bool) for n in partition):
        raise UserError("--node-config: partition-id and num-partitions are whole numbers")
    if not 0 <= partition[0] < partition[1]:
        raise UserError("--node-config: partition-id must be at least 0 and below num-partitions")
    if settings.app is not None and ":" in settings.app and not _findable(settings.app.partition(":")[0]):
        raise UserError(f"--app {settings.app}: no module {settings.app.partition(':')[0]!r} on this device")
    if settings.flower_app is not None:
        return f"flower:{settings.flower_app.resolve()}", run_config, partition  # type: ignore[return-value]
    return settings.app, run_config, partition  # type: ignore[return-value]


def _findable(module: str) -> bool:
    """Whether the module is on the path, without running it here (the agent's process stays free of
    torch; a worker imports the app)."""
    import importlib.util

    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        return False


def _broker(address: str) -> BrokerAddress:
    """The broker to hear rounds on; a host that does not resolve now is said once (paho then retries it,
    with backoff, without a word, and the agent long-polls the server meanwhile)."""
    from fedge.mqtt import BrokerAddress, unresolved

    broker = BrokerAddress.parse(address)
    if (why := unresolved(broker)) is not None:
        warn(f"{why}; retrying with backoff, long-polling the server meanwhile")
    return broker


def _enrolled_server(state_dir: Path) -> str:
    from fedge.client.enrollment import EnrollmentError, load_state

    try:
        return load_state(state_dir).server
    except EnrollmentError:
        raise UserError("no --server given and the device is not enrolled (`fedge agent enroll`)") from None


@app.command("status")
def show_status(state_dir: StateDir) -> None:
    """What the agent is doing now (or did last, if it is not running)."""
    from fedge.client import status

    with user_errors(status.StatusError):
        current = status.read(state_dir)
    age = time.time() - current.updated
    line = f"{current.client}: {current.state}"
    if current.round is not None:
        line += f" (round {current.round})"
    console.print(f"{line} via {current.transport}, {age:.0f} s ago: {current.detail}")
    if current.last_invocation is not None:
        last = current.last_invocation
        kind = f"cold, {last.startup_seconds:.2f} s start-up" if last.cold else "warm"
        console.print(f"last train: {kind}, {last.seconds:.2f} s")
    if current.placements:
        where = ", ".join(f"{n} {place}" for place, n in sorted(current.placements.items()))
        console.print(
            f"rounds: {where}; raw data sent (sealed) to executors: {current.raw_bytes_offloaded} bytes"
        )
    if current.fallback:
        console.print(f"last fallback: {current.fallback}")


@app.command()
def enroll(
    server: Annotated[str, typer.Option(help="URL of the aggregation service, https://HOST:PORT")],
    token: Annotated[str, typer.Option(help="one-time token from `fedge pki token`")],
    ca_fingerprint: Annotated[str, typer.Option(help="sha256 of the federation CA (`fedge pki list`)")],
    state: StateDir,
) -> None:
    """Make this device's key, check the server's CA against the fingerprint, and get a certificate."""
    from fedge.client.enrollment import EnrollmentError
    from fedge.client.enrollment import enroll as run

    with user_errors(EnrollmentError, PKIError, OSError):
        enrolled = run(server, token, ca_fingerprint, state)
    console.print(
        f"enrolled as [bold]{enrolled.client}[/] in federation {enrolled.federation}; credentials in {state}"
    )


@app.command()
def renew(state: StateDir) -> None:
    """Replace this device's key and certificate with fresh ones while the current certificate is valid."""
    from fedge.client.enrollment import EnrollmentError
    from fedge.client.enrollment import renew as run

    with user_errors(EnrollmentError, PKIError, OSError):
        renewed = run(state)
    console.print(f"renewed the certificate of {renewed.client}; credentials in {state}")
