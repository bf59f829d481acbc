"""``fedge executor``: serve the cloud executor over HTTPS with its executor certificate (mutual TLS)."""

from __future__ import annotations

import os
import signal
import socket
import ssl
import sys
import tempfile
from pathlib import Path
from typing import Annotated

import typer

from fedge.console import console, fail, user_errors
from fedge.security import pki


def executor(
    pki_dir: Annotated[Path, typer.Option("--pki", help="directory with ca.pem and the executor's cert")],
    id_: Annotated[str, typer.Option("--id", help="executor id (fedge pki executor-cert --executor)")],
    server: Annotated[str, typer.Option(help="the aggregation server's URL")],
    port: Annotated[int, typer.Option(min=0, max=65535, help="port to listen on (0: a free one)")] = 8443,
    host: Annotated[str, typer.Option(help="address to listen on")] = "127.0.0.1",
    memory_gb: Annotated[
        float | None,
        typer.Option(min=0.0, help="memory size a job is billed for (GB-s); default: the process's peak"),
    ] = None,
) -> None:
    """Train clients' rounds for them on this machine's GPU (CPU without one), under their grants."""
    if not server.startswith("https://"):
        fail(f"--server must be an https:// URL, not {server!r}")
    # torch makes its compile-cache directory on import; the executor never compiles, so the directory
    # stays empty, and it is the process's own, gone when the process ends. Nothing else touches the disk.
    # uvicorn re-raises SIGTERM once it has shut down: exit then, so the directory is removed.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    with tempfile.TemporaryDirectory(prefix="fedge-executor-") as scratch:
        os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", scratch)
        _serve(pki_dir, id_, server, port, host, memory_gb)


def _serve(pki_dir: Path, id_: str, server: str, port: int, host: str, memory_gb: float | None) -> None:
    import torch
    import uvicorn

    from fedge.edge_functions.executor import MAX_JOB, Executor, make_app
    from fedge.security.http_limits import BodyCap, Limits, uvicorn_options
    from fedge.security.revocation import Standing
    from fedge.security.tls import TLS12_CIPHERS

    if not torch.cuda.is_available():
        # Jobs run side by side, one per thread: torch's own intra-op threads on top of them only fight
        # over the cores (a step took 50x as long on two loaded cores).
        torch.set_num_threads(1)
    with user_errors(pki.PKIError, OSError):
        creds = pki.credentials(pki_dir, pki.Role.EXECUTOR, id_)
        federation = pki.federation_of(pki_dir)
        standing = Standing(pki_dir)
        listener = socket.create_server((host, port))
    config = uvicorn.Config(
        make_app(Executor(id_, federation, server, creds, standing, memory_gb)),
        # A job carries a sealed shard; a calibration request is a small JSON.
        **uvicorn_options(
            Limits(), lambda _method, path: BodyCap(MAX_JOB if path == "/v1/jobs" else 1 << 20)
        ),
        ssl_certfile=str(creds.cert),
        ssl_keyfile=str(creds.key),
        ssl_ca_certs=str(creds.ca),
        ssl_cert_reqs=ssl.CERT_REQUIRED,
        ssl_ciphers=TLS12_CIPHERS,
        log_level="warning",
        lifespan="off",
    )
    console.print(f"executor {id_} listening on https://{host}:{listener.getsockname()[1]}", soft_wrap=True)
    uvicorn.Server(config).run(sockets=[listener])
