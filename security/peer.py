"""The client certificate TLS verified for a connection, handed to the ASGI application.

uvicorn verifies client certificates but does not pass them on. ``MutualTLSProtocol`` adds the peer's
certificate to each request's scope as the ASGI TLS extension specifies (``scope["extensions"]["tls"]``),
so whoever serves over mutual TLS (the aggregation service, the cloud executor) reads the caller's identity
from the verified handshake and never from a header a client could forge. It needs uvicorn only, not
FastAPI, so an executor host does not carry the server's dependencies.
"""

from __future__ import annotations

import asyncio
import ssl

from uvicorn._types import ASGI3Application, ASGIReceiveCallable, ASGISendCallable, Scope
from uvicorn.protocols.http.h11_impl import H11Protocol


class MutualTLSProtocol(H11Protocol):
    peer_der: bytes | None = None

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        ssl_object: ssl.SSLObject | None = transport.get_extra_info("ssl_object")
        self.peer_der = ssl_object.getpeercert(binary_form=True) if ssl_object else None
        self.app = _with_peer_certificate(self.app, self.peer_der)


def _with_peer_certificate(app: ASGI3Application, peer_der: bytes | None) -> ASGI3Application:
    async def wrapped(scope: Scope, receive: ASGIReceiveCallable, send: ASGISendCallable) -> None:
        extensions = scope.setdefault("extensions", {})  # type: ignore[typeddict-item]
        extensions["tls"] = {"client_cert_der": peer_der}
        await app(scope, receive, send)

    return wrapped  # type: ignore[return-value]


def peer_certificate(scope: Scope) -> bytes | None:
    """The DER certificate the caller presented and TLS verified, None when it presented none."""
    return scope.get("extensions", {}).get("tls", {}).get("client_cert_der")  # type: ignore[union-attr]
