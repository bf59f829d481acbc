"""The FastAPI application: routes, one error shape for every refusal, and the round clock."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator

from fastapi import FastAPI, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect
from starlette.responses import Response

from fedge import __version__
from fedge.server import admin, api, enrollment, errors
from fedge.server.errors import Rejected
from fedge.server.feed import ChangeFeed
from fedge.server.identity import CertificateGate
from fedge.server.limits import PublicRateLimit
from fedge.server.presence import PresenceExchange
from fedge.server.rounds import Federation
from fedge.server.trust import Trust

TICK_SECONDS = 0.25


def create_app(federation: Federation, trust: Trust, exchange: PresenceExchange | None = None) -> FastAPI:
    """``exchange``: this replica's share of presence with the others on its store, if it has any."""

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        app.state.feed = ChangeFeed()
        federation.subscribe(app.state.feed.notify_threadsafe)
        clock = asyncio.create_task(_round_clock(federation, exchange))
        yield
        clock.cancel()

    app = FastAPI(title="fedge aggregation service", version=__version__, lifespan=lifespan)
    app.state.federation = federation
    app.state.trust = trust
    app.add_middleware(CertificateGate, trust=trust)  # type: ignore[arg-type]
    app.add_middleware(PublicRateLimit)  # type: ignore[arg-type]
    for part in (api, enrollment, admin):
        app.include_router(part.router)
    for refusal in (Rejected, HTTPException, RequestValidationError):
        app.add_exception_handler(refusal, _error)
    app.add_exception_handler(ClientDisconnect, _dropped)
    return app


async def _round_clock(federation: Federation, exchange: PresenceExchange | None) -> None:
    """Deadlines pass and clients register without any request arriving (or arrive at another replica):
    check on a short period."""
    while True:
        if exchange is not None:
            await run_in_threadpool(exchange.exchange)
        await run_in_threadpool(federation.tick)
        await asyncio.sleep(TICK_SECONDS)


async def _error(_: Request, exc: Exception) -> JSONResponse:
    return errors.response(exc)


async def _dropped(_: Request, __: Exception) -> Response:
    """A caller that went away mid-body: the connection already logged its one line, and nobody is left to
    read an answer (this one only keeps a traceback out of the log)."""
    return Response(status_code=400)
