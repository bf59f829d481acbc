"""``fedge pki``: make the federation's CA and issue certificates."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from fedge.console import console, user_errors
from fedge.security import pki

app = typer.Typer(
    help="Certificates of a federation: its CA, the server's, each client's.", no_args_is_help=True
)
PkiDir = Annotated[Path, typer.Option("--dir", help="PKI directory")]


@app.command()
def init(directory: PkiDir, federation: Annotated[str, typer.Option(help="federation name")]) -> None:
    """Create the federation CA."""
    with user_errors(pki.PKIError):
        ca = pki.init_ca(directory, federation)
    console.print(f"CA for federation [bold]{federation}[/] written to {ca}")


@app.command("server-cert")
def server_cert(
    directory: PkiDir,
    host: Annotated[list[str], typer.Option(help="DNS name of the server (repeatable)")] = [],  # noqa: B006
    ip: Annotated[list[str], typer.Option(help="IP address of the server (repeatable)")] = [],  # noqa: B006
) -> None:
    """Issue the aggregation server's certificate for the names and addresses clients will dial."""
    if not host and not ip:
        typer.echo("error: give at least one --host or --ip", err=True)
        raise typer.Exit(2)
    with user_errors(pki.PKIError, ValueError):
        creds = pki.issue(directory, pki.Role.SERVER, "server", hosts=(*host, *ip))
    console.print(f"server certificate written to {creds.cert}")


@app.command("client-cert")
def client_cert(directory: PkiDir, client: Annotated[str, typer.Option(help="client id")]) -> None:
    """Issue a client's certificate (its id goes in the SAN: spiffe://<federation>/client/<id>)."""
    with user_errors(pki.PKIError):
        creds = pki.issue(directory, pki.Role.CLIENT, client)
    console.print(f"client certificate written to {creds.cert} (key {creds.key})")
