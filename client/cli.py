"""``fedge agent``: what a device owner runs: enroll, renew, run the agent, see its status."""

from __future__ import annotations

import datetime as dt
import logging
import signal
import ssl
import time
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from fedge.console import UserError, command_group, console, fail, user_errors, warn
from fedge.security.pki import PKIError

if TYPE_CHECKING:
    from fedge.client.agent import AgentConfig
    from fedge.client.settings import AgentSettings
    from fedge.mqtt import BrokerAddress

app = command_group("The edge agent a device runs: enroll, renew, run, status.")
ZIP_MAGIC = b"PK\x03\x04"  # an .npz is a zip archive of .npy files
StateDir = Annotated[
    Path, typer.Option("--dir", file_okay=False, help="the agent's state directory (credentials)")
]


@app.command()
def run(
    state_dir: Annotated[
        Path | None, typer.Option("--dir", file_okay=False, help="the agent's state directory")
    ] = None,
    data: Annotated[
        Path | None, typer.Option(help="this device's examples: .npz with arrays x and y")
    ] = None,
    server: Annotated[str | None, typer.Option(help="aggregation service [the one enrolled with]")] = None,
    broker: Annotated[str | None, typer.Option(help="MQTT broker HOST:PORT [long-poll the server]")] = None,
    ca: Annotated[Path | None, typer.Option(help="federation CA [DIR/ca.pem]")] = None,
    cert: Annotated[Path | None, typer.Option(help="client certificate [DIR/client.pem]")] = None,
    key: Annotated[Path | None, typer.Option(help="client key [DIR/client.key]")] = None,
    keep_alive: Annotated[float | None, typer.Option(help="seconds an idle worker stays warm [300]")] = None,
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
) -> None:
    """Train for the federation whenever a round is announced, until SIGTERM or Ctrl-C."""
    from fedge.client.agent import Agent
    from fedge.client.settings import AgentSettings

    with user_errors(ValueError, OSError):
        settings = AgentSettings.from_flags(
            dir=state_dir, data=data, server=server, broker=broker, ca=ca, cert=cert, key=key,
            keep_alive=keep_alive, poll_wait=poll_wait, offload=offload, executor=executor,
            train_memory_mb=train_memory_mb,
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
        with user_errors(ValueError, OSError):
            agent = Agent(_config(settings))
        console.print(f"renewed the certificate of {agent.config.identity.id}: going on with the new one")
        agent.run()
    if agent.refused:
        fail(agent.refused)


def _config(settings: AgentSettings) -> AgentConfig:
    """Check everything a user gave before the agent starts, so mistakes are one line, not a crash."""
    import numpy as np
    from cryptography import x509
    from cryptography.hazmat.primitives import serialization

    from fedge.client.agent import AgentConfig
    from fedge.client.planner import ExecutorTarget
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
    if settings.data.is_file() and _head(settings.data) != ZIP_MAGIC:
        raise UserError(f"{settings.data} is not an .npz archive (numpy.savez) with arrays x and y")
    try:
        with np.load(settings.data, allow_pickle=False) as arrays:
            if "x" not in arrays or "y" not in arrays or len(arrays["x"]) != len(arrays["y"]):
                raise UserError(f"{settings.data} needs arrays x and y of the same length")
    except (OSError, ValueError) as exc:
        raise UserError(f"cannot read data {settings.data}: {exc}") from None
    return AgentConfig(
        state_dir=settings.dir,
        data=settings.data.resolve(),
        server=server,
        broker=_broker(settings.broker) if settings.broker else None,
        creds=pki.Credentials(creds.ca.resolve(), creds.cert.resolve(), creds.key.resolve()),
        identity=identity,
        keep_alive=settings.keep_alive,
        poll_wait=settings.poll_wait,
        offload=settings.offload,
        executors=tuple(ExecutorTarget.parse(e) for e in settings.executor),
        train_memory=int(settings.train_memory_mb * 2**20),
        expires=certificate.not_valid_after_utc,
        # Enrolled credentials renew themselves; files given as flags belong to whoever issued them.
        renew_at=None
        if settings.cert or not (settings.dir / "agent.json").is_file()
        else pki.renewal_time(certificate.not_valid_before_utc, certificate.not_valid_after_utc),
    )


def _broker(address: str) -> BrokerAddress:
    """The broker to hear rounds on; a host that does not resolve now is said once (paho then retries it,
    with backoff, without a word, and the agent long-polls the server meanwhile)."""
    from fedge.mqtt import BrokerAddress, unresolved

    broker = BrokerAddress.parse(address)
    if (why := unresolved(broker)) is not None:
        warn(f"{why}; retrying with backoff, long-polling the server meanwhile")
    return broker


def _head(path: Path) -> bytes:
    with path.open("rb") as f:
        return f.read(len(ZIP_MAGIC))


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
