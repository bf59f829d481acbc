"""``fedge agent``: what a device owner runs. Enrollment now; running the agent comes with the agent."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from fedge.console import console, user_errors
from fedge.security.pki import PKIError

app = typer.Typer(help="The edge agent a device runs: enroll, renew.", no_args_is_help=True)
StateDir = Annotated[Path, typer.Option("--dir", help="the agent's state directory (credentials)")]


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
