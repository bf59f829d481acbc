"""The v1 routes of design.md. The global model is served read-only; a client writes only its own update."""

from __future__ import annotations

import time
from typing import Annotated

from fastapi import APIRouter, Header, Query, Request, Response
from fastapi.concurrency import run_in_threadpool
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from fedge.codec import signature_of
from fedge.server import metrics
from fedge.server.errors import Rejected
from fedge.server.identity import Caller, Client
from fedge.server.rounds import Federation
from fedge.wire import ErrorBody, ModelMeta, RoundInfo, UpdateReceipt

router = APIRouter()
_ERRORS = {status: {"model": ErrorBody} for status in (400, 401, 403, 404, 409, 413, 422)}
_MAX_WAIT = 60.0


def _federation(request: Request) -> Federation:
    return request.app.state.federation


@router.get("/healthz")
def healthz() -> dict[str, str]:
    return {"status": "ok"}


@router.get("/metrics", response_class=Response)
def prometheus(_: Caller) -> Response:
    return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)


@router.get(
    "/v1/model",
    response_class=Response,
    responses={200: {"content": {"application/octet-stream": {}}}, 304: {}, **_ERRORS},
)
def get_model(request: Request, _: Caller, if_none_match: Annotated[str | None, Header()] = None) -> Response:
    """The current global model (safetensors). ``If-None-Match`` with its ETag answers 304, no body."""
    model = _federation(request).model
    etag = f'"{model.sha256}"'
    headers = {"ETag": etag, "X-Fedge-Round": str(model.round)}
    if if_none_match == etag:
        metrics.model_downloads.labels(cached="yes").inc()
        return Response(status_code=304, headers=headers)
    metrics.model_downloads.labels(cached="no").inc()
    return Response(model.body, media_type="application/octet-stream", headers=headers)


@router.get("/v1/model/meta", responses=_ERRORS)
def get_model_meta(request: Request, _: Caller) -> ModelMeta:
    federation = _federation(request)
    model = federation.model
    return ModelMeta(
        round=model.round,
        sha256=model.sha256,
        task=federation.settings.task,
        tensors=signature_of(model.tensors),
    )


@router.get("/v1/rounds/current", responses=_ERRORS)
async def get_current_round(
    request: Request,
    response: Response,
    _: Caller,
    wait: Annotated[float, Query(ge=0, le=_MAX_WAIT, description="seconds to wait for a change")] = 0,
    if_none_match: Annotated[str | None, Header()] = None,
) -> RoundInfo:
    """With ``wait`` and the last ETag seen in ``If-None-Match``, answers at the next change (long poll)."""
    federation = _federation(request)
    give_up = time.monotonic() + wait
    info = federation.round_info()
    while info.etag == if_none_match and (left := give_up - time.monotonic()) > 0:
        await request.app.state.feed.wait(left)
        info = federation.round_info()
    response.headers["ETag"] = info.etag
    return info


@router.post("/v1/rounds/{round_}/updates", status_code=202, responses=_ERRORS)
async def post_update(round_: int, request: Request, identity: Client) -> UpdateReceipt:
    """Store this client's update for ``round_`` (a safetensors body with ``num_examples`` metadata)."""
    federation = _federation(request)
    started = time.perf_counter()
    try:
        body = await _read_capped(request, len(federation.model.body) + 64 * 1024)
        receipt = await run_in_threadpool(federation.submit, round_, identity.id, body)
    except Rejected as exc:
        metrics.updates_rejected.labels(code=exc.code).inc()
        raise
    metrics.updates_accepted.inc()
    metrics.update_seconds.observe(time.perf_counter() - started)
    return receipt


async def _read_capped(request: Request, limit: int) -> bytes:
    """Read the body, refusing it as soon as it exceeds what an update of this model can weigh."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise Rejected(413, "update_too_large", f"body of {declared} bytes exceeds the limit of {limit}")
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise Rejected(413, "update_too_large", f"body exceeds the limit of {limit} bytes")
        chunks.append(chunk)
    return b"".join(chunks)
