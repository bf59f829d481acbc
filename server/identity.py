"""Who is calling: the fedge identity in the client certificate that TLS verified for this connection.

``security.peer.MutualTLSProtocol`` puts the certificate the TLS handshake verified into each request's
scope, so the identity comes from the handshake and never from a header a client could forge.

TLS asks for a client certificate but lets a connection without one through (``CERT_OPTIONAL``), because a
device that is enrolling has none yet; a certificate that is presented must still verify against the CA.
``CertificateGate`` then refuses, on every request, a connection without a certificate on any route but
``PUBLIC_PATHS``, and on any route at all a certificate that does not count: revoked, expired, or
superseded by a newer one issued for the same id (``security.revocation.standing``).
"""

from __future__ import annotations

import datetime as dt
import time
from collections.abc import Callable
from typing import Annotated

from cryptography import x509
from fastapi import Depends, Request
from uvicorn._types import ASGI3Application, ASGIReceiveCallable, ASGISendCallable, Scope

from fedge.security.peer import peer_certificate
from fedge.security.pki import Identity, PKIError, Role, identity_of
from fedge.security.revocation import NotStanding, standing
from fedge.server.errors import Rejected, response
from fedge.server.trust import Trust

PUBLIC_PATHS = frozenset({"/healthz", "/v1/ca", "/v1/enroll"})


def gate(
    peer_der: bytes | None,
    path: str,
    federation: str,
    is_revoked: Callable[[int], bool],
    current_serial: Callable[[str, str], int | None],
    now: dt.datetime,
) -> Rejected | None:
    """Why a request may not reach any route, or None when it may: a certificate must count
    (``security.revocation.standing``, the one rule every check applies)."""
    if peer_der is None:
        if path in PUBLIC_PATHS:
            return None
        return Rejected("no_client_certificate", "a client certificate is required")
    try:
        standing(x509.load_der_x509_certificate(peer_der), federation, is_revoked, current_serial, now)
    except NotStanding as exc:
        return Rejected(exc.code, exc.detail)
    return None


class CertificateGate:
    """ASGI middleware: applies ``gate`` to every HTTP request before routing, and counts a client that
    passes it as seen (``server.presence``): any request says the device is alive."""

    def __init__(self, app: ASGI3Application, trust: Trust) -> None:
        self.app = app
        self.trust = trust

    async def __call__(self, scope: Scope, receive: ASGIReceiveCallable, send: ASGISendCallable) -> None:
        if scope["type"] == "http":
            peer = peer_certificate(scope)
            rule = self.trust.standing
            refusal = gate(
                peer,
                scope["path"],
                self.trust.federation,
                rule.revocations.is_revoked,
                rule.current.serial_of,
                dt.datetime.now(dt.UTC),
            )
            if refusal is not None:
                await response(refusal)(scope, receive, send)  # type: ignore[arg-type]
                return
            if peer is not None and (identity := identity_of(peer)).role is Role.CLIENT:
                self.trust.presence.seen(identity.id, time.time())
        await self.app(scope, receive, send)


def caller(request: Request) -> Identity:
    """The verified caller (``CertificateGate`` has already refused anyone without a standing certificate
    of this federation, so only a route that needs no certificate can get here without one)."""
    peer = peer_certificate(request.scope)  # type: ignore[arg-type]
    if peer is None:
        raise Rejected("no_client_certificate", "a client certificate is required")
    try:
        return identity_of(peer)
    except PKIError as exc:
        raise Rejected("bad_client_certificate", str(exc)) from None


def client(identity: Annotated[Identity, Depends(caller)]) -> Identity:
    if identity.role is not Role.CLIENT:
        raise Rejected("wrong_role", f"this route is for clients, not {identity.role}")
    return identity


def submitter(identity: Annotated[Identity, Depends(caller)]) -> Identity:
    """A client, or an executor (which must then show a client's grant: checked by the route)."""
    if identity.role not in (Role.CLIENT, Role.EXECUTOR):
        raise Rejected("wrong_role", f"this route is for clients and executors, not {identity.role}")
    return identity


def admin(identity: Annotated[Identity, Depends(caller)]) -> Identity:
    if identity.role is not Role.ADMIN:
        raise Rejected("wrong_role", f"this route is for admins, not {identity.role}")
    return identity


Caller = Annotated[Identity, Depends(caller)]
Client = Annotated[Identity, Depends(client)]
Submitter = Annotated[Identity, Depends(submitter)]
Admin = Annotated[Identity, Depends(admin)]
