"""The v1 routes of design.md. The global model is served read-only; a client writes only its own update."""

from __future__ import annotations

import re
import time
from typing import Annotated

from fastapi import APIRouter, Header, Path, Query, Request, Response
from fastapi.concurrency import run_in_threadpool
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from pydantic import BeforeValidator, ValidationError

from fedge.codec import sha256, signature_of
from fedge.security import signing
from fedge.security.peer import peer_certificate
from fedge.security.pki import Identity, Role
from fedge.security.revocation import NotStanding
from fedge.server import intake, limits, metrics
from fedge.server.deps import FederationDep, FeedDep, TrustDep
from fedge.server.errors import RESPONSES, Rejected, invalid
from fedge.server.feed import MAX_WAIT, next_round
from fedge.server.identity import Admin, Caller, Client, Submitter
from fedge.server.jsonbody import BoundedJSONRoute
from fedge.server.trust import Trust
from fedge.wire import (
    EvaluationReceipt,
    EvaluationReport,
    ModelMeta,
    RoundInfo,
    SkipNotice,
    SkipReceipt,
    UpdateReceipt,
)

router = APIRouter(route_class=BoundedJSONRoute)
_PLAIN_ROUND = re.compile(r"0|[1-9][0-9]{0,9}")


def plain_round(text: object) -> object:
    """A round in a path is spelt one way only, in decimal digits without sign, point, spaces or leading
    zeros: ``1.0``, ``+1``, `` 1`` and ``01`` are refused (422), not read as round 1 under another name."""
    if isinstance(text, str) and not _PLAIN_ROUND.fullmatch(text):
        raise ValueError("a round is written in plain decimal digits, e.g. 3")
    return text


RoundNumber = Annotated[int, BeforeValidator(plain_round), Path(ge=0, le=2**31 - 1)]


@router.get("/healthz")
def healthz() -> dict[str, str]:
    return {"status": "ok"}


@router.get("/metrics", response_class=Response)
def prometheus(_: Admin) -> Response:
    """For the operator's Prometheus, with an admin certificate: the series tell how many clients take
    part, skip and are online, which is the federation's business, not any one device's."""
    return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)


@router.get(
    "/v1/model",
    response_class=Response,
    responses={200: {"content": {"application/octet-stream": {}}}, 304: {}, **RESPONSES},
)
def get_model(
    federation: FederationDep,
    trust: TrustDep,
    _: Caller,
    if_none_match: Annotated[str | None, Header()] = None,
) -> Response:
    """The current global model (safetensors). ``If-None-Match`` with its ETag answers 304, no body.

    ``X-Fedge-Signature`` is the server's signature over (federation, round, sha256 of the body) and
    ``X-Fedge-Signer`` the server's certificate, so a client checks the model against its pinned CA."""
    model = federation.model
    etag = f'"{model.sha256}"'
    headers = {
        "ETag": etag,
        "X-Fedge-Round": str(model.round),
        signing.SIGNATURE_HEADER: trust.model_signature(model.round, model.sha256),
        signing.SIGNER_HEADER: trust.signer,
    }
    if if_none_match == etag:
        metrics.model_downloads.labels(cached="yes").inc()
        return Response(status_code=304, headers=headers)
    metrics.model_downloads.labels(cached="no").inc()
    metrics.bytes_sent.inc(len(model.body))
    return Response(model.body, media_type="application/octet-stream", headers=headers)


@router.get("/v1/model/meta", responses=RESPONSES)
def get_model_meta(federation: FederationDep, _: Caller) -> ModelMeta:
    model = federation.model
    return ModelMeta(
        round=model.round,
        sha256=model.sha256,
        task=federation.settings.task,
        tensors=signature_of(model.tensors),
    )


@router.get("/v1/rounds/current", responses=RESPONSES)
async def get_current_round(
    federation: FederationDep,
    feed: FeedDep,
    response: Response,
    _: Caller,
    wait: Annotated[float, Query(ge=0, le=MAX_WAIT, description="seconds to wait for a change")] = 0,
    if_none_match: Annotated[str | None, Header()] = None,
) -> RoundInfo:
    """With ``wait`` and the last ETag seen in ``If-None-Match``, answers at the next change (long poll)."""
    info = await next_round(federation, feed, if_none_match, wait)
    response.headers["ETag"] = info.etag
    return info


_UPDATE_BODY = {
    "requestBody": {
        "required": True,
        "content": {"application/octet-stream": {"schema": {"type": "string", "format": "binary"}}},
    }
}


@router.post("/v1/rounds/{round_}/updates", status_code=202, responses=RESPONSES, openapi_extra=_UPDATE_BODY)
async def post_update(
    round_: RoundNumber,
    request: Request,
    federation: FederationDep,
    trust: TrustDep,
    identity: Submitter,
    x_fedge_signature: Annotated[str | None, Header(description="submitter's signature, base64")] = None,
    x_fedge_nonce: Annotated[str | None, Header(description="32-64 hex digits, fresh per update")] = None,
    x_fedge_grant: Annotated[str | None, Header(description="executors only: the client's grant")] = None,
) -> UpdateReceipt:
    """Store a client's update for ``round_`` (a safetensors body with ``num_examples`` metadata).

    The update must be signed by the certificate's key over (federation, round, client id, sha256 of the
    body, nonce); the signature and nonce are stored with it. An executor submits in a client's slot only
    with that client's grant for this round and this executor; the update records where it was computed."""
    started = time.perf_counter()
    try:
        if not x_fedge_signature or not x_fedge_nonce:
            raise Rejected("missing_signature", "an update needs X-Fedge-Signature and X-Fedge-Nonce")
        owner = _slot_owner(identity, x_fedge_grant, round_, trust)
        body = await _read_capped(request, len(federation.model.body) + limits.UPDATE_OVERHEAD)
        signed = intake.Signed(
            peer_der=peer_certificate(request.scope),  # type: ignore[arg-type]
            federation=trust.federation,
            signature=x_fedge_signature,
            nonce=x_fedge_nonce,
            computed_by=identity.id if identity.role is Role.EXECUTOR else "",
        )
        limit = federation.settings.max_update_norm
        checked = await run_in_threadpool(intake.check, round_, owner, body, federation, limit, signed)
        receipt = await run_in_threadpool(federation.submit, checked)
    except Rejected as exc:
        metrics.updates_rejected.labels(code=exc.code).inc()
        raise
    metrics.updates_accepted.inc()
    metrics.update_seconds.observe(time.perf_counter() - started)
    return receipt


@router.post("/v1/rounds/{round_}/skip", responses=RESPONSES)
def post_skip(
    round_: RoundNumber, notice: SkipNotice, federation: FederationDep, identity: Client
) -> SkipReceipt:
    """Tell the server early that the caller sends no update for ``round_`` (it cannot fit the round), so
    the round closes once every selected client has sent an update or skipped, not at its deadline.

    Only a client, for itself (the certificate names it), in a round it was selected for, while it is open,
    once, and never after its update; asynchronous rounds wait for no one and refuse it."""
    try:
        receipt = federation.skip(round_, identity.id, notice.reason)
    except Rejected as exc:
        metrics.skips_rejected.labels(code=exc.code).inc()
        raise
    metrics.skips_accepted.inc()
    return receipt


@router.post("/v1/rounds/{round_}/evaluation", responses=RESPONSES)
async def post_evaluation(
    round_: RoundNumber,
    request: Request,
    federation: FederationDep,
    trust: TrustDep,
    identity: Client,
    x_fedge_signature: Annotated[str | None, Header(description="client's signature, base64")] = None,
    x_fedge_nonce: Annotated[str | None, Header(description="32-64 hex digits, fresh per report")] = None,
) -> EvaluationReceipt:
    """A client's evaluation of the model ``round_`` produced, on its own held-out data: only from a
    client asked to (``RoundInfo.evaluate``), for that model, once, signed by the certificate's key over
    (federation, round, client id, sha256 of the JSON body, nonce) with kind ``evaluation``."""
    try:
        if not x_fedge_signature or not x_fedge_nonce:
            raise Rejected("missing_signature", "an evaluation needs X-Fedge-Signature and X-Fedge-Nonce")
        body = await _read_capped(request, limits.SMALL_BODY)
        peer = peer_certificate(request.scope)  # type: ignore[arg-type]
        assert peer is not None  # a client: the gate let no connection without a certificate through
        signed = intake.Signed(peer, trust.federation, x_fedge_signature, x_fedge_nonce)
        intake.verify(signed, round_, identity.id, sha256(body), kind="evaluation")
        try:
            report = EvaluationReport.model_validate_json(body)
        except ValidationError as exc:
            raise Rejected("invalid_evaluation", invalid(exc.errors()[0])) from None
        receipt = await run_in_threadpool(
            federation.evaluate, round_, identity.id, report, x_fedge_signature, x_fedge_nonce
        )
    except Rejected as exc:
        metrics.evaluations_rejected.labels(code=exc.code).inc()
        raise
    metrics.evaluations_accepted.inc()
    return receipt


def _slot_owner(identity: Identity, grant_header: str | None, round_: int, trust: Trust) -> str:
    """Whose update this is: the caller's own, or for an executor the client whose grant it shows."""
    if identity.role is Role.CLIENT:
        return identity.id
    if not grant_header:
        raise Rejected("missing_grant", "an executor submits only with a client's grant (X-Fedge-Grant)")
    try:
        grant, signer = signing.read_grant(trust.ca_pem, grant_header, time.time())
        trust.standing.check(signer)
    except signing.SignatureError as exc:
        raise Rejected("bad_grant", str(exc)) from None
    except NotStanding as exc:
        raise Rejected("bad_grant", f"the certificate that signed the grant: {exc.detail}") from None
    if (grant.federation, grant.executor, grant.round) != (trust.federation, identity.id, round_):
        raise Rejected(
            "bad_grant", f"the grant is for executor {grant.executor!r} in round {grant.round}, not this"
        )
    return grant.client


async def _read_capped(request: Request, limit: int) -> bytes:
    """Read the body, refusing it as soon as it exceeds what an update of this model can weigh. It is
    hashed once, by intake on a worker thread (hashing releases the GIL): not here, on the one event-loop
    thread that also decrypts every connection's TLS.

    The connection guard (``server.limits.body_caps``) applies the same cap before the app sees the
    request; this one holds wherever the app runs without that guard (in-process, behind another server)."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise Rejected("update_too_large", f"body of {declared} bytes exceeds the limit of {limit}")
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise Rejected("update_too_large", f"body exceeds the limit of {limit} bytes")
        chunks.append(chunk)
    return b"".join(chunks)
