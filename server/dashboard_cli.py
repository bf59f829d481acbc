"""``fedge dashboard``: the live page for an operator, on this machine's loopback only."""

from __future__ import annotations

import contextlib
import threading
from pathlib import Path
from typing import Annotated

import typer

from fedge.console import console, user_errors
from fedge.security.pki import Credentials


def dashboard(
    server: Annotated[str, typer.Option(help="the aggregation service, e.g. https://fl.example.org:8443")],
    ca: Annotated[Path, typer.Option(help="the federation's CA certificate")],
    cert: Annotated[Path, typer.Option(help="an admin certificate (fedge pki issue --role admin)")],
    key: Annotated[Path, typer.Option(help="its private key")],
    port: Annotated[
        int, typer.Option(min=1, max=65535, help="port on 127.0.0.1 to serve the page on")
    ] = 8500,
    refresh: Annotated[float, typer.Option(help="seconds between refreshes within a round", min=0.1)] = 1.0,
) -> None:
    """Serve a live page of the federation on 127.0.0.1: rounds, curves, clients, stragglers, expiring
    certificates. Only this process holds the admin certificate; the browser talks to loopback."""
    from fedge.server.dashboard import Watch, serving  # FastAPI and uvicorn: the server extra

    with user_errors(OSError):
        watch = Watch(server.rstrip("/"), Credentials(ca=ca, cert=cert, key=key), refresh)
        watch.check()
        with serving(watch, port) as url:
            console.print(f"dashboard of {server} on {url} (Ctrl-C stops it)")
            with contextlib.suppress(KeyboardInterrupt):
                threading.Event().wait()
