"""Admin routes (``/v1/admin/``): start the federation, choose its strategy, see it and its rounds, revoke a
client, mint a token.

Only an admin certificate reaches them; nothing here reads or writes the global model or any update.
"""

from __future__ import annotations

import datetime as dt
import math
import time
from pathlib import Path
from typing import Annotated, Any
from weakref import WeakKeyDictionary

from fastapi import APIRouter, Header, Query, Response
from fastapi.concurrency import run_in_threadpool
from pydantic import BaseModel, Field

from fedge.security import pki, tokens
from fedge.server.deps import FederationDep, FeedDep, TrustDep
from fedge.server.enrollment import refresh_broker
from fedge.server.errors import RESPONSES, Rejected
from fedge.server.feed import MAX_WAIT, next_round
from fedge.server.history import ClientFigures, RoundFigures, client_figures, round_figures
from fedge.server.identity import Admin
from fedge.server.jsonbody import BoundedJSONRoute
from fedge.server.rounds import Federation
from fedge.server.store import Ledger
from fedge.server.trust import Trust
from fedge.wire import RoundInfo

router = APIRouter(prefix="/v1/admin", route_class=BoundedJSONRoute)


class ClientStatus(BaseModel):
    id: str
    serial: str = Field(description="hex")
    not_after: dt.datetime
    status: str = Field(description="valid, expired or revoked")


class FederationStatus(BaseModel):
    federation: str
    round: RoundInfo
    skipped: dict[str, str] = Field(description="the open round's skip notices: client -> reason")
    clients: list[ClientStatus]


class RoundStatus(BaseModel):
    round: int
    state: str = Field(description="open, done or failed")
    selected: list[str]
    reported: list[str] = Field(description="clients whose update was stored")
    skipped: dict[str, str] = Field(description="clients that sent a skip notice instead: client -> reason")
    base_sha256: str
    result_sha256: str | None
    deadline: float


class EvaluationPoint(BaseModel):
    round: int = Field(description="the round whose model was scored; 0 is the initial model")
    accuracy: float | None = Field(description="none where the clients' app reports no accuracy")
    loss: float
    source: str = Field(description="server (--eval-data) or federated (the clients asked)")


class Overview(BaseModel):
    """What the dashboard shows of a federation, in one answer: the round now, and every round's and
    client's figures (``server.history``)."""

    federation: str
    now: float
    round: RoundInfo
    rounds: list[RoundFigures]
    clients: list[ClientFigures]
    evaluations: list[EvaluationPoint] = Field(
        description="the server's own evaluations (--eval-data) and the clients' (federated evaluation)"
    )


class StrategyChoice(BaseModel):
    name: str = Field(description="a strategy of `fedge server --strategy`, e.g. fedavg, trimmed-mean")
    params: dict[str, Any] = Field(
        default_factory=dict,
        description="its parameters, named like the flags (trim_fraction, malicious, ...); checked against"
        " the strategy's own: another strategy's parameter or a wrong type is refused",
    )


class StrategyChange(BaseModel):
    name: str
    applies_from_round: int


class TokenRequest(BaseModel):
    client: str
    ttl_seconds: float = Field(24 * 3600, gt=0, le=30 * 24 * 3600)


class MintedToken(BaseModel):
    client: str
    token: str
    expires_at: dt.datetime


@router.get("/status", responses=RESPONSES)
def status(federation: FederationDep, trust: TrustDep, _: Admin) -> FederationStatus:
    revoked = pki.revoked(trust.pki_dir)
    now = dt.datetime.now(dt.UTC)
    return FederationStatus(
        federation=trust.federation,
        round=federation.round_info(),
        skipped=federation.open_skips(),
        clients=[_client_status(c, revoked, now) for c in pki.certificates(trust.pki_dir, pki.Role.CLIENT)],
    )


@router.get("/rounds", responses=RESPONSES)
def rounds(federation: FederationDep, _: Admin) -> list[RoundStatus]:
    """Every round so far: who was selected, who reported, who skipped, which model it started from and
    produced."""
    return [
        RoundStatus(
            round=past.record.round,
            state=past.record.state,
            selected=past.record.selected,
            reported=past.reported,
            skipped=past.skipped,
            base_sha256=past.record.base_sha256,
            result_sha256=past.record.result_sha256,
            deadline=past.record.deadline,
        )
        for past in federation.history()
    ]


@router.get("/overview", response_model=Overview, responses=RESPONSES)
async def overview(
    federation: FederationDep,
    trust: TrustDep,
    feed: FeedDep,
    _: Admin,
    wait: Annotated[float, Query(ge=0, le=MAX_WAIT, description="seconds to wait for a round change")] = 0,
    if_none_match: Annotated[str | None, Header()] = None,
) -> Response:
    """Per-round figures (updates, skips and why, stragglers, bytes, time split) and per-client history
    (last seen, rounds trained, skipped, missed, where its updates were computed, certificate expiry).

    With ``wait`` and the round's last ETag in ``If-None-Match`` it answers when the round changes, or when
    ``wait`` has passed (a long poll, as ``GET /v1/rounds/current``): a dashboard that asks again at once
    sees a closed round immediately, with one request a second. Certificates come from the trust's cache
    (re-read only when a file changes), and the answer is serialized once, not validated again."""
    info = await next_round(federation, feed, if_none_match, wait)
    body = await run_in_threadpool(_overview, federation, trust, info)
    return Response(body, media_type="application/json", headers={"ETag": info.etag})


def _overview(federation: Federation, trust: Trust, info: RoundInfo) -> str:
    """Built again only when what it shows changed: the ledger (a new object once the store wrote), who was
    seen when, a certificate's status, the round. Otherwise the last one is sent with the time moved on,
    which is all a dashboard's once-a-second request finds new in a quiet round."""
    now = time.time()
    certificates = _client_certificates(trust, dt.datetime.fromtimestamp(now, dt.UTC))
    ledger = federation.ledger()
    sightings = trust.presence.sightings()
    key = (sightings, [(cert.id, status) for cert, status in certificates], info)
    built = _overviews.get(federation)
    if built is not None and built[0] is ledger and built[1] == key:
        return _moved_on(built[2], now).model_dump_json()
    overview = Overview(
        federation=trust.federation,
        now=now,
        round=info,
        rounds=round_figures(ledger, now, federation.settings.prices),
        clients=client_figures(
            ledger,
            [cert for cert, _ in certificates],
            {cert.id: status for cert, status in certificates},
            sightings,
        ),
        evaluations=[
            EvaluationPoint(
                round=e.round,
                accuracy=None if math.isnan(e.accuracy) else e.accuracy,
                loss=e.loss,
                source=e.source,
            )
            for e in ledger.evaluations
        ],
    )
    _overviews[federation] = (ledger, key, overview)
    return overview.model_dump_json()


def _moved_on(overview: Overview, now: float) -> Overview:
    """The overview as of ``now``: only a round still open has a length that grows with the clock."""
    rounds = [
        f if f.closed_at is not None else f.model_copy(update={"seconds": now - f.opened_at})
        for f in overview.rounds
    ]
    return overview.model_copy(update={"now": now, "rounds": rounds})


_overviews: WeakKeyDictionary[Federation, tuple[Ledger, tuple[Any, ...], Overview]] = WeakKeyDictionary()


def _client_certificates(trust: Trust, now: dt.datetime) -> list[tuple[pki.CertificateInfo, str]]:
    """Every client's current certificate and its status (valid, expired, revoked) at ``now``. The
    certificates are parsed again only when the folder changes (every write there is a rename into it)."""
    folder = trust.pki_dir / pki.Role.CLIENT
    stamp = folder.stat().st_mtime_ns
    seen = _certificates_seen.get(folder)
    if seen is None or seen[0] != stamp:
        seen = _certificates_seen[folder] = (stamp, pki.certificates(trust.pki_dir, pki.Role.CLIENT))
    revoked = trust.standing.revocations.is_revoked
    return [(info, info.status({info.serial: now} if revoked(info.serial) else {}, now)) for info in seen[1]]


_certificates_seen: dict[Path, tuple[int, list[pki.CertificateInfo]]] = {}


@router.post("/start", responses=RESPONSES)
def start(federation: FederationDep, _: Admin) -> RoundInfo:
    """Start a federation served with ``--manual-start``: round 1 opens once enough clients are in."""
    return federation.start()


@router.put("/strategy", responses=RESPONSES)
def choose_strategy(body: StrategyChoice, federation: FederationDep, _: Admin) -> StrategyChange:
    """Aggregate with another strategy from the next round on; the choice survives a restart."""
    first = federation.choose_strategy(body.name, body.params)
    return StrategyChange(name=body.name, applies_from_round=first)


@router.post("/clients/{client}/revoke", responses=RESPONSES)
def revoke(client: str, trust: TrustDep, _: Admin) -> ClientStatus:
    """Revoke the client's certificate: refused from its next request on, and no longer selected."""
    _known_client(trust, client)
    try:
        info = pki.revoke(trust.pki_dir, pki.Role.CLIENT, client)
    except pki.PKIError as exc:
        raise Rejected("already_revoked", str(exc)) from None
    refresh_broker(trust, f"revoked {client}")
    return _client_status(info, pki.revoked(trust.pki_dir), dt.datetime.now(dt.UTC))


@router.post("/tokens", status_code=201, responses=RESPONSES)
def mint_token(body: TokenRequest, trust: TrustDep, _: Admin) -> MintedToken:
    ttl = dt.timedelta(seconds=body.ttl_seconds)
    try:
        token = tokens.mint(trust.pki_dir, body.client, ttl)
    except tokens.TokenError as exc:
        raise Rejected(exc.code, exc.detail) from None
    except pki.PKIError as exc:
        raise Rejected("invalid_id", str(exc)) from None
    return MintedToken(client=body.client, token=token, expires_at=dt.datetime.now(dt.UTC) + ttl)


def _known_client(trust: Trust, client: str) -> None:
    try:
        pki.check_id(client, "client id")
    except pki.PKIError as exc:
        raise Rejected("invalid_id", str(exc)) from None
    if client not in pki.issued(trust.pki_dir, pki.Role.CLIENT):
        raise Rejected("unknown_client", f"no client {client!r} in this federation")


def _client_status(
    info: pki.CertificateInfo, revoked: dict[int, dt.datetime], now: dt.datetime
) -> ClientStatus:
    return ClientStatus(
        id=info.id, serial=f"{info.serial:x}", not_after=info.not_after, status=info.status(revoked, now)
    )
