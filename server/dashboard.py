"""The live dashboard: a page on 127.0.0.1 showing a federation as it runs, fed from the server's admin API.

It runs on the operator's machine, as ``kubectl proxy`` does: only this process holds the admin certificate
and talks mutual TLS to the server; the browser talks plain HTTP to loopback and never sees a key. One
thread (``Watch``) keeps the latest overview (``GET /v1/admin/overview``, long-polled on the round), so a
round that closes reaches the page at once, and what changes inside a round (updates arriving, clients
seen) at least every ``refresh`` seconds: one request a second in all. The page gets each new overview by
server-sent events, and renders it in the browser with no library (``dashboard.html``, package data).

A simulation (``fedge simulate --dashboard PORT``) adds what only it knows, through ``local``: the
evaluation of every round, and where each device trained and how much raw data it offloaded.
"""

from __future__ import annotations

import contextlib
import json
import socket
import ssl
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator
from importlib import resources
from typing import Any

import httpx
from fastapi import FastAPI, Request
from fastapi.middleware.trustedhost import TrustedHostMiddleware
from fastapi.responses import HTMLResponse, Response, StreamingResponse

from fedge.console import UserError
from fedge.security.pki import Credentials
from fedge.security.tls import client_context
from fedge.server.feed import ChangeFeed
from fedge.transport import ServerError, raise_for_error

HOST = "127.0.0.1"  # never another address: the page carries the admin's view with no login of its own
POLL_SECONDS = 1.0  # the longest a long poll waits: how soon ``Watch.stop`` is heard
Local = Callable[[], dict[str, Any]]


class Watch:
    """The latest overview of one federation, as JSON, with a version that rises each time it is fetched."""

    def __init__(
        self, url: str, creds: Credentials, refresh: float = 1.0, local: Local | None = None
    ) -> None:
        self.refresh = refresh
        self._local = local
        try:
            context = client_context(creds)
        except (OSError, ssl.SSLError) as exc:
            raise UserError(f"cannot load the admin certificate {creds.cert}: {exc}") from None
        self._http = httpx.Client(base_url=url, verify=context, timeout=10 + refresh)
        self._url = url
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self.version = 0
        self.state = "{}"
        self._listeners: list[Callable[[], None]] = []

    def check(self) -> None:
        """Fetch once, so a certificate that is not an admin's, or a server that cannot be reached, stops the
        dashboard at start with one line instead of an empty page."""
        try:
            self._publish(self._overview()[0])
        except ServerError as exc:
            if exc.code == "wrong_role":
                raise UserError(
                    f"the dashboard needs an admin certificate: the server says {exc.detail}"
                ) from None
            raise UserError(f"the server at {self._url} refused the dashboard: {exc}") from None
        except httpx.HTTPError as exc:
            raise UserError(f"cannot reach the server at {self._url}: {exc}") from None

    def subscribe(self, listener: Callable[[], None]) -> None:
        self._listeners.append(listener)

    def run(self) -> None:
        """Until ``stop``: long-poll the overview a second at a time, and publish it when the round changed
        or ``refresh`` seconds have passed. A server that is briefly unreachable keeps the last overview on
        the page."""
        etag: str | None = None
        published = time.monotonic()
        while not self._stop.is_set():
            try:
                overview, seen = self._overview(etag, min(self.refresh, POLL_SECONDS))
            except (httpx.HTTPError, ServerError):
                self._stop.wait(POLL_SECONDS)
                continue
            changed, etag = seen != etag, seen
            if changed or time.monotonic() - published >= self.refresh:
                self._publish(overview)
                published = time.monotonic()

    def stop(self) -> None:
        self._stop.set()

    def close(self) -> None:
        self._http.close()

    def _overview(self, etag: str | None = None, wait: float = 0) -> tuple[dict[str, Any], str | None]:
        """The overview, and the ETag of the round it shows; with ``etag`` and ``wait``, once the round
        changes from ``etag`` or ``wait`` seconds have passed."""
        response = self._http.get(
            "/v1/admin/overview", params={"wait": wait}, headers={"If-None-Match": etag} if etag else {}
        )
        raise_for_error(response)
        local = self._local() if self._local is not None else {}
        return with_local(response.json(), local), response.headers.get("ETag")

    def _publish(self, overview: dict[str, Any]) -> None:
        with self._lock:
            self.state = json.dumps(overview)
            self.version += 1
        for listener in self._listeners:
            listener()


def with_local(overview: dict[str, Any], local: dict[str, Any]) -> dict[str, Any]:
    """The server's overview with what a simulation adds: its own ``evaluations`` (round, accuracy, loss) in
    place of the server's (a simulation evaluates centrally; a server only with ``--eval-data``), and per
    client its ``placements`` (edge, fewer-steps, offload, skip, dropout) and ``raw_bytes_offloaded``."""
    clients = local.get("clients", {})
    merged = []
    for client in overview["clients"]:
        mine = clients.get(client["id"], {})
        merged.append({**client, **{k: v for k, v in mine.items() if v}})
    return {**overview, "clients": merged, "evaluations": local.get("evaluations") or overview["evaluations"]}


def create_app(watch: Watch) -> FastAPI:
    page = resources.files("fedge.server").joinpath("dashboard.html").read_text()

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        app.state.feed = ChangeFeed()
        watch.subscribe(app.state.feed.notify_threadsafe)
        yield

    app = FastAPI(title="fedge dashboard", docs_url=None, redoc_url=None, openapi_url=None, lifespan=lifespan)
    # A web page elsewhere could reach 127.0.0.1 through a name it rebinds there (DNS rebinding): only a
    # request addressed to loopback by name or number is answered.
    app.add_middleware(TrustedHostMiddleware, allowed_hosts=["127.0.0.1", "localhost"])

    @app.get("/", response_class=HTMLResponse)
    def index() -> str:
        """The page with the latest overview inside it, so it shows the federation on its first paint."""
        return page.replace("__STATE__", watch.state.replace("<", "\\u003c"))

    @app.get("/api/state")
    def state() -> Response:
        return Response(watch.state, media_type="application/json")

    @app.get("/api/events")
    async def events(request: Request) -> StreamingResponse:
        return StreamingResponse(_stream(watch, request.app.state.feed), media_type="text/event-stream")

    return app


async def _stream(watch: Watch, feed: ChangeFeed) -> AsyncIterator[str]:
    """Each new overview as one server-sent event; a comment when 15 s pass without one keeps idle proxies
    from closing the stream."""
    sent = -1
    while True:
        if watch.version > sent:
            sent = watch.version
            yield f"id: {sent}\ndata: {watch.state}\n\n"
        else:
            yield ": idle\n\n"
        await feed.wait(15)


@contextlib.contextmanager
def serving(watch: Watch, port: int) -> Iterator[str]:
    """Serve the page on 127.0.0.1:``port`` from a background thread while the block runs; yields its URL.
    The socket is bound here, so a port in use is one line, not a server thread's log."""
    import uvicorn

    listener = socket.socket()
    try:
        listener.bind((HOST, port))
    except OSError as exc:
        listener.close()
        raise UserError(f"the dashboard cannot listen on {HOST}:{port}: {exc.strerror}") from None
    config = uvicorn.Config(create_app(watch), log_level="warning", lifespan="on")
    server = uvicorn.Server(config)
    feeder = threading.Thread(target=watch.run, name="dashboard-watch", daemon=True)
    web = threading.Thread(target=server.run, args=([listener],), name="dashboard-web", daemon=True)
    feeder.start()
    web.start()
    try:
        while not server.started:
            if not web.is_alive():
                raise UserError(f"the dashboard's web server on {HOST}:{port} stopped as it started")
            web.join(0.05)
        yield f"http://{HOST}:{port}/"
    finally:
        watch.stop()  # first, so nothing is published to the page's event loop once it has closed
        feeder.join(10 + POLL_SECONDS)
        server.should_exit = True
        web.join(10)
        watch.close()
        listener.close()
