"""Admin routes (``/v1/admin/``): start the federation, choose its strategy, see it and its rounds, revoke a
client, mint a token.

Only an admin certificate reaches them; nothing here reads or writes the global model or any update.
"""

from __future__ import annotations

import datetime as dt
from typing import Any

from fastapi import APIRouter, Request
from pydantic import BaseModel, Field

from fedge.security import pki, tokens
from fedge.server.errors import Rejected
from fedge.server.identity import Admin
from fedge.server.trust import Trust
from fedge.wire import ErrorBody, RoundInfo

router = APIRouter(prefix="/v1/admin")
_ERRORS = {status: {"model": ErrorBody} for status in (400, 401, 403, 404, 409, 422)}


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


def _trust(request: Request) -> Trust:
    return request.app.state.trust


@router.get("/status", responses=_ERRORS)
def status(request: Request, _: Admin) -> FederationStatus:
    trust = _trust(request)
    revoked = pki.revoked(trust.pki_dir)
    now = dt.datetime.now(dt.UTC)
    federation = request.app.state.federation
    return FederationStatus(
        federation=trust.federation,
        round=federation.round_info(),
        skipped=federation.open_skips(),
        clients=[_client_status(c, revoked, now) for c in pki.certificates(trust.pki_dir, pki.Role.CLIENT)],
    )


@router.get("/rounds", responses=_ERRORS)
def rounds(request: Request, _: Admin) -> list[RoundStatus]:
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
        for past in request.app.state.federation.history()
    ]


@router.post("/start", responses=_ERRORS)
def start(request: Request, _: Admin) -> RoundInfo:
    """Start a federation served with ``--manual-start``: round 1 opens once enough clients are in."""
    return request.app.state.federation.start()


@router.put("/strategy", responses=_ERRORS)
def choose_strategy(body: StrategyChoice, request: Request, _: Admin) -> StrategyChange:
    """Aggregate with another strategy from the next round on; the choice survives a restart."""
    first = request.app.state.federation.choose_strategy(body.name, body.params)
    return StrategyChange(name=body.name, applies_from_round=first)


@router.post("/clients/{client}/revoke", responses=_ERRORS)
def revoke(client: str, request: Request, _: Admin) -> ClientStatus:
    """Revoke the client's certificate: refused from its next request on, and no longer selected."""
    trust = _trust(request)
    _known_client(trust, client)
    try:
        info = pki.revoke(trust.pki_dir, pki.Role.CLIENT, client)
    except pki.PKIError as exc:
        raise Rejected(409, "already_revoked", str(exc)) from None
    return _client_status(info, pki.revoked(trust.pki_dir), dt.datetime.now(dt.UTC))


@router.post("/tokens", status_code=201, responses=_ERRORS)
def mint_token(body: TokenRequest, request: Request, _: Admin) -> MintedToken:
    trust = _trust(request)
    ttl = dt.timedelta(seconds=body.ttl_seconds)
    try:
        token = tokens.mint(trust.pki_dir, body.client, ttl)
    except tokens.TokenError as exc:
        raise Rejected(409, exc.code, exc.detail) from None
    except pki.PKIError as exc:
        raise Rejected(400, "invalid_id", str(exc)) from None
    return MintedToken(client=body.client, token=token, expires_at=dt.datetime.now(dt.UTC) + ttl)


def _known_client(trust: Trust, client: str) -> None:
    try:
        pki.check_id(client, "client id")
    except pki.PKIError as exc:
        raise Rejected(400, "invalid_id", str(exc)) from None
    if client not in pki.issued(trust.pki_dir, pki.Role.CLIENT):
        raise Rejected(404, "unknown_client", f"no client {client!r} in this federation")


def _client_status(
    info: pki.CertificateInfo, revoked: dict[int, dt.datetime], now: dt.datetime
) -> ClientStatus:
    return ClientStatus(
        id=info.id, serial=f"{info.serial:x}", not_after=info.not_after, status=info.status(revoked, now)
    )
