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

from fedge import __version__
from fedge.server import admin, api, enrollment
from fedge.server.errors import Rejected
from fedge.server.feed import ChangeFeed
from fedge.server.identity import CertificateGate
from fedge.server.rounds import Federation
from fedge.server.trust import Trust

TICK_SECONDS = 0.25


def create_app(federation: Federation, trust: Trust) -> FastAPI:
    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        app.state.feed = ChangeFeed()
        federation.subscribe(app.state.feed.notify_threadsafe)
        clock = asyncio.create_task(_round_clock(federation))
        yield
        clock.cancel()

    app = FastAPI(title="fedge aggregation service", version=__version__, lifespan=lifespan)
    app.state.federation = federation
    app.state.trust = trust
    app.add_middleware(CertificateGate, trust=trust)  # type: ignore[arg-type]
    for part in (api, enrollment, admin):
        app.include_router(part.router)
    app.add_exception_handler(Rejected, _rejected)  # type: ignore[arg-type]
    app.add_exception_handler(HTTPException, _http_error)  # type: ignore[arg-type]
    app.add_exception_handler(RequestValidationError, _invalid_request)  # type: ignore[arg-type]
    return app


async def _round_clock(federation: Federation) -> None:
    """Deadlines pass and clients register without any request arriving: check on a short period."""
    while True:
        await run_in_threadpool(federation.tick)
        await asyncio.sleep(TICK_SECONDS)


def _error(status: int, code: str, detail: str, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"error": code, "detail": detail}, status_code=status, headers=headers)


async def _rejected(_: Request, exc: Rejected) -> JSONResponse:
    return _error(exc.status, exc.code, exc.detail)


async def _http_error(_: Request, exc: HTTPException) -> JSONResponse:
    codes = {404: "not_found", 405: "method_not_allowed"}
    return _error(exc.status_code, codes.get(exc.status_code, "http_error"), str(exc.detail), exc.headers)


async def _invalid_request(_: Request, exc: RequestValidationError) -> JSONResponse:
    first = exc.errors()[0] if exc.errors() else {}
    where = ".".join(str(p) for p in first.get("loc", ()))
    return _error(422, "invalid_request", f"{where}: {first.get('msg', 'invalid request')}")
