"""Who is calling: the fedge identity in the client certificate that TLS verified for this connection.

uvicorn verifies client certificates but does not hand them to the application. ``MutualTLSProtocol`` adds
them to each request's scope as the ASGI TLS extension specifies (``scope["extensions"]["tls"]``), so the
identity comes from the verified handshake and never from a header a client could forge.
"""

from __future__ import annotations

import asyncio
import ssl
from typing import Annotated

from fastapi import Depends, Request
from uvicorn._types import ASGI3Application, ASGIReceiveCallable, ASGISendCallable, Scope
from uvicorn.protocols.http.h11_impl import H11Protocol

from fedge.security.pki import Identity, PKIError, Role, identity_of
from fedge.server.errors import Rejected


class MutualTLSProtocol(H11Protocol):
    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        ssl_object: ssl.SSLObject | None = transport.get_extra_info("ssl_object")
        peer = ssl_object.getpeercert(binary_form=True) if ssl_object else None
        self.app = _with_peer_certificate(self.app, peer)


def _with_peer_certificate(app: ASGI3Application, peer_der: bytes | None) -> ASGI3Application:
    async def wrapped(scope: Scope, receive: ASGIReceiveCallable, send: ASGISendCallable) -> None:
        extensions = scope.setdefault("extensions", {})  # type: ignore[typeddict-item]
        extensions["tls"] = {"client_cert_der": peer_der}
        await app(scope, receive, send)

    return wrapped  # type: ignore[return-value]


def caller(request: Request) -> Identity:
    """The verified caller, or 401 when the connection carries no usable fedge certificate."""
    peer = request.scope.get("extensions", {}).get("tls", {}).get("client_cert_der")
    if peer is None:
        raise Rejected(401, "no_client_certificate", "a client certificate is required")
    try:
        identity = identity_of(peer)
    except PKIError as exc:
        raise Rejected(401, "bad_client_certificate", str(exc)) from None
    if identity.federation != request.app.state.federation.settings.federation:
        raise Rejected(403, "wrong_federation", f"certificate is for federation {identity.federation!r}")
    return identity


def client(identity: Annotated[Identity, Depends(caller)]) -> Identity:
    if identity.role is not Role.CLIENT:
        raise Rejected(403, "wrong_role", f"this route is for clients, not {identity.role}")
    return identity


Caller = Annotated[Identity, Depends(caller)]
Client = Annotated[Identity, Depends(client)]
