"""Runs the aggregation function under uvicorn with mutual TLS on a socket we bind ourselves.

Binding first turns a busy port into a clear error and lets ``--port 0`` pick a free one; the chosen
address is written to ``<data>/endpoint.json`` once the service accepts connections.
"""

from __future__ import annotations

import asyncio
import errno
import json
import os
import socket
import threading
import time
from pathlib import Path

import uvicorn
from fastapi import FastAPI

from fedge.console import UserError
from fedge.files import write_file
from fedge.security.http_limits import Limits, uvicorn_options
from fedge.security.pki import Credentials
from fedge.security.tls import server_context
from fedge.server.limits import body_caps

STOP_CHECK_SECONDS = 0.25


def bind(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    try:
        sock = socket.create_server((host, port), family=family, reuse_port=False)
    except OSError as exc:
        if exc.errno == errno.EADDRINUSE:
            raise UserError(f"port {port} on {host} is already in use") from None
        raise UserError(f"cannot listen on {host}:{port}: {exc.strerror}") from None
    # asyncio sets TCP_NODELAY only on sockets whose proto is IPPROTO_TCP, and create_server leaves it 0;
    # without it, Nagle holds a response's body behind its headers until the client's delayed ACK: 40 ms a
    # request. Accepted connections inherit the option from the listening socket.
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return sock


def serve(
    app: FastAPI,
    creds: Credentials,
    sock: socket.socket,
    endpoint_file: Path,
    limits: Limits | None = None,
    until: threading.Event | None = None,
) -> None:
    """Serve until stopped (SIGTERM, Ctrl-C) or, with ``until``, once it is set (the federation finished):
    then requests in flight get the graceful shutdown's seconds to finish, and this returns."""
    federation = app.state.federation
    config = uvicorn.Config(
        app,
        **uvicorn_options(limits or Limits(), body_caps(lambda: len(federation.model.body))),
        ssl_context_factory=lambda _config, _default: server_context(creds),
        log_level=os.environ.get("FEDGE_LOG_LEVEL", "warning"),
        timeout_graceful_shutdown=5,
    )
    server = uvicorn.Server(config)
    host, port = sock.getsockname()[:2]
    url = f"https://{f'[{host}]' if ':' in host else host}:{port}"

    async def stop_when_done(done: threading.Event) -> None:
        while not done.is_set():
            await asyncio.sleep(STOP_CHECK_SECONDS)
        server.should_exit = True
        # Requests in flight are answered (uvicorn stops accepting within its tick); an idle keep-alive
        # connection (every agent holds one) never answers TLS's close_notify, so waiting for it would only
        # run out the graceful shutdown's clock: once nothing is in flight, those are cut.
        await asyncio.sleep(STOP_CHECK_SECONDS)
        give_up = time.monotonic() + config.timeout_graceful_shutdown
        while server.server_state.tasks and time.monotonic() < give_up:
            await asyncio.sleep(STOP_CHECK_SECONDS / 5)
        for connection in list(server.server_state.connections):
            connection.transport.abort()

    async def run() -> None:
        task = asyncio.create_task(server.serve(sockets=[sock]))
        watcher = None if until is None else asyncio.create_task(stop_when_done(until))
        while not server.started and not task.done():
            await asyncio.sleep(0.02)
        if server.started:
            write_file(endpoint_file, json.dumps({"url": url, "pid": os.getpid()}).encode())
        await task
        if watcher is not None:
            watcher.cancel()

    try:
        asyncio.run(run())
    finally:
        endpoint_file.unlink(missing_ok=True)
