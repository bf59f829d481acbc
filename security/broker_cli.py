"""``fedge broker config``: write the mosquitto configuration and ACL of a federation."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from fedge.console import command_group, console, user_errors
from fedge.security import broker, pki

app = command_group("The federation's MQTT broker (mosquitto).")


@app.command()
def config(
    pki_dir: Annotated[Path, typer.Option("--pki", help="PKI directory (fedge pki init)")],
    out: Annotated[Path, typer.Option(help="folder for mosquitto.conf, acl and TLS files")],
    port: Annotated[int, typer.Option(help="TLS port of the broker")] = 8883,
    bind: Annotated[str, typer.Option(help="address the broker listens on")] = "0.0.0.0",  # noqa: S104
    host: Annotated[
        list[str], typer.Option(help="name or IP devices dial, for the broker certificate when first issued")
    ] = [],  # noqa: B006
    mount: Annotated[
        Path | None, typer.Option(help="where --out is mounted in the broker's container [--out]")
    ] = None,
    persistence: Annotated[
        Path | None, typer.Option(help="where the broker keeps retained messages, writable [MOUNT/data]")
    ] = None,
    run_as: Annotated[str | None, typer.Option(help="user mosquitto drops to when started as root")] = None,
) -> None:
    """Generate mosquitto.conf (TLS, client certificates required, ACL, CRL when the PKI has one)."""
    with user_errors(pki.PKIError, OSError):
        files = broker.write_config(
            pki_dir, out, port, bind, tuple(host) or ("localhost", "127.0.0.1"), mount, persistence, run_as
        )
    crl = "with" if files.crl else "without"
    console.print(f"mosquitto config written to {files.conf} ({crl} a CRL); run: mosquitto -c {files.conf}")
