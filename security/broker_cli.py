"""``fedge broker config``: write the mosquitto configuration and ACL of a federation."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated

import typer

from fedge.console import command_group, console, user_errors
from fedge.security import broker, pki
from fedge.security.names import ip_address, san_entry

app = command_group("The federation's MQTT broker (mosquitto).")


@app.command()
def config(
    pki_dir: Annotated[Path, typer.Option("--pki", file_okay=False, help="PKI directory (fedge pki init)")],
    out: Annotated[Path, typer.Option(file_okay=False, help="folder for mosquitto.conf, acl and TLS files")],
    port: Annotated[int, typer.Option(help="TLS port of the broker")] = 8883,
    bind: Annotated[
        str, typer.Option(help="address the broker listens on (0.0.0.0: every interface)")
    ] = "127.0.0.1",
    host: Annotated[
        list[str], typer.Option(help="name or IP devices dial, for the broker certificate when first issued")
    ] = [],  # noqa: B006
    mount: Annotated[
        Path | None, typer.Option(help="where --out is mounted in the broker's container [--out]")
    ] = None,
    persistence: Annotated[
        Path | None, typer.Option(help="where the broker keeps retained messages, writable [MOUNT/data]")
    ] = None,
    run_as: Annotated[
        str | None,
        typer.Option(help="user mosquitto drops to when started as root [root when written by root]"),
    ] = None,
) -> None:
    """Generate mosquitto.conf (TLS, client certificates required, ACL, CRL when the PKI has one).

    Issuing, enrolling or revoking a client later rewrites the ACL and CRL and reloads the broker."""
    user = run_as or broker.default_user(mounted=mount is not None, euid=os.geteuid())
    with user_errors(pki.PKIError, OSError, ValueError):
        address = ip_address(bind, "--bind")
        hosts = tuple(san_entry(h) for h in host) or ("localhost", "127.0.0.1")
        files = broker.write_config(pki_dir, out, port, address, hosts, mount, persistence, user)
    crl = "with" if files.crl else "without"
    console.print(
        f"mosquitto config written to {files.conf} ({crl} a CRL), listening on {bind}:{port}; "
        f"run: mosquitto -c {files.conf}",
        soft_wrap=True,
    )
