"""``fedge pki``: make the federation's CA, issue and revoke certificates, mint enrollment tokens."""

from __future__ import annotations

import datetime as dt
from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from fedge.console import command_group, console, errors, user_errors, warn
from fedge.security import broker, pki, tokens
from fedge.security.names import ip_address, san_entry

app = command_group("Certificates of a federation: its CA, the server's, each client's; tokens; revocation.")
PkiDir = Annotated[Path, typer.Option("--dir", file_okay=False, help="PKI directory")]
# A leaf's lifetime: bounded, so a typo cannot mint a certificate that outlives every rotation plan.
Days = Annotated[
    int, typer.Option("--days", min=1, max=365, help=f"lifetime in days [{pki.LEAF_LIFETIME.days}]")
]


@app.command()
def init(directory: PkiDir, federation: Annotated[str, typer.Option(help="federation name")]) -> None:
    """Create the federation CA."""
    with user_errors(pki.PKIError):
        ca = pki.init_ca(directory, federation)
    console.print(f"CA for federation [bold]{federation}[/] written to {ca}")
    console.print(f"CA fingerprint (sha256): {pki.ca_fingerprint(directory)}", soft_wrap=True)


@app.command("server-cert")
def server_cert(
    directory: PkiDir,
    host: Annotated[list[str], typer.Option(help="DNS name of the server (repeatable)")] = [],  # noqa: B006
    ip: Annotated[list[str], typer.Option(help="IP address of the server (repeatable)")] = [],  # noqa: B006
    days: Days = pki.LEAF_LIFETIME.days,
) -> None:
    """Issue the aggregation server's certificate for the names and addresses clients will dial."""
    if not host and not ip:
        typer.echo("error: give at least one --host or --ip", err=True)
        raise typer.Exit(2)
    with user_errors(pki.PKIError, ValueError):
        names = (*(san_entry(h) for h in host), *(ip_address(a) for a in ip))
        creds = pki.issue(directory, pki.Role.SERVER, "server", hosts=names, lifetime=dt.timedelta(days=days))
    console.print(f"server certificate written to {creds.cert}")


@app.command("client-cert")
def client_cert(
    directory: PkiDir,
    client: Annotated[str, typer.Option(help="client id")],
    days: Days = pki.LEAF_LIFETIME.days,
) -> None:
    """Issue a client's certificate (its id goes in the SAN: spiffe://<federation>/client/<id>).

    Running it again for the same id renews it: a new key and certificate; the old one is superseded at once
    (put on the CRL), so it counts nowhere."""
    with user_errors(pki.PKIError):
        creds = pki.issue(directory, pki.Role.CLIENT, client, lifetime=dt.timedelta(days=days))
    console.print(f"client certificate written to {creds.cert} (key {creds.key})")
    _refresh_broker(directory)


@app.command("admin-cert")
def admin_cert(
    directory: PkiDir,
    admin: Annotated[str, typer.Option(help="admin id")],
    days: Days = pki.LEAF_LIFETIME.days,
) -> None:
    """Issue an operator's certificate for the /v1/admin/ routes."""
    _issue(directory, pki.Role.ADMIN, admin, days=days)


@app.command("executor-cert")
def executor_cert(
    directory: PkiDir,
    executor: Annotated[str, typer.Option(help="executor id")],
    host: Annotated[list[str], typer.Option(help="DNS name or IP clients dial it at (repeatable)")] = [],  # noqa: B006
    days: Days = pki.LEAF_LIFETIME.days,
) -> None:
    """Issue a cloud executor's certificate: it submits only in the slot a client's grant gives it."""
    _issue(directory, pki.Role.EXECUTOR, executor, tuple(host), days)


def _issue(directory: Path, role: pki.Role, id_: str, hosts: tuple[str, ...] = (), days: int = 30) -> None:
    with user_errors(pki.PKIError, ValueError):
        hosts = tuple(san_entry(h) for h in hosts)
        creds = pki.issue(directory, role, id_, hosts=hosts, lifetime=dt.timedelta(days=days))
    console.print(f"{role} certificate written to {creds.cert} (key {creds.key})")
    if role is pki.Role.ADMIN:
        _refresh_broker(directory)


@app.command()
def token(
    directory: PkiDir,
    client: Annotated[str, typer.Option(help="the id the enrolling device will get")],
    ttl: Annotated[float, typer.Option(min=0.001, help="hours the token stays usable")] = 24.0,
) -> None:
    """Mint a one-time enrollment token for a device (only its sha256 is kept); prints the token."""
    with user_errors(pki.PKIError, tokens.TokenError):
        minted = tokens.mint(directory, client, dt.timedelta(hours=ttl))
        fingerprint = pki.ca_fingerprint(directory)
    typer.echo(minted)
    errors.print(
        f"[dim]one use, expires in {ttl:g} h; on the device: fedge agent enroll --server URL "
        f"--token {minted} --ca-fingerprint {fingerprint} --dir STATE[/]",
        soft_wrap=True,
    )


@app.command()
def revoke(
    directory: PkiDir,
    client: Annotated[str | None, typer.Option(help="client id to revoke")] = None,
    admin: Annotated[str | None, typer.Option(help="admin id to revoke")] = None,
    executor: Annotated[str | None, typer.Option(help="executor id to revoke")] = None,
) -> None:
    """Revoke an id: its certificate and every one it held before; crl.pem is rewritten, and a running
    server or executor on this PKI refuses them within seconds (the broker once its config is regenerated)."""
    chosen = [(role, id_) for role, id_ in ((pki.Role.CLIENT, client), (pki.Role.ADMIN, admin),
                                            (pki.Role.EXECUTOR, executor)) if id_ is not None]  # fmt: skip
    if len(chosen) != 1:
        typer.echo("error: give exactly one of --client, --admin, --executor", err=True)
        raise typer.Exit(2)
    role, id_ = chosen[0]
    with user_errors(pki.PKIError):
        info = pki.revoke(directory, role, id_)
    console.print(f"revoked {role} {id_} (serial {info.serial:x}); CRL written to {directory / 'crl.pem'}")
    _refresh_broker(directory)


def _refresh_broker(directory: Path) -> None:
    """Who may use the broker changed: its ACL and CRL follow, and it is reloaded (or the user is told to)."""
    with user_errors(pki.PKIError, OSError):
        done = broker.refresh(directory)
    if done is not None:
        (console.print if done.reloaded else warn)(done.detail)


@app.command()
def fingerprint(directory: PkiDir) -> None:
    """Print the CA fingerprint (sha256) a device pins when it enrolls (`fedge agent enroll`)."""
    with user_errors(pki.PKIError):
        pki.federation_of(directory)
        typer.echo(pki.ca_fingerprint(directory))


@app.command("list")
def list_(directory: PkiDir) -> None:
    """Every certificate of the federation with its status, and the CA fingerprint devices pin."""
    with user_errors(pki.PKIError):
        federation = pki.federation_of(directory)
        revoked = pki.revoked(directory)
        found = [c for role in pki.Role for c in pki.certificates(directory, role)]
        fingerprint = pki.ca_fingerprint(directory)
    now = dt.datetime.now(dt.UTC)
    table = Table(title=f"federation {federation}")
    for column in ("role", "id", "serial", "expires", "status"):
        table.add_column(column)
    for c in found:
        status = c.status(revoked, now)
        if status == "valid" and pki.renewal_due(c.not_before, c.not_after, now):
            status = "[yellow]valid, renew now[/]"  # past two thirds of its life
        table.add_row(c.role, c.id, f"{c.serial:x}", f"{c.not_after:%Y-%m-%d %H:%M}", status)
    console.print(table)
    console.print(f"CA fingerprint (sha256): {fingerprint}", soft_wrap=True)
