"""Bounded, strictly framed HTTP/1.1 for the mutual-TLS services (the aggregation server, the executor).

Whoever can reach the port can open connections, send headers a byte at a time, announce a huge body or
hold a connection open and silent; uvicorn's own knobs (``timeout_keep_alive``, the h11 head size) cover
only the silence between two requests. ``GuardedProtocol`` bounds the rest at the connection, before any
application code runs or any body byte is buffered:

- time: a connection with no request in flight closes after ``idle_timeout`` of silence (also before its
  first request), unless it is the one connection of an identity (``idle_timeout_for``); a request head
  must be complete ``head_timeout`` after its first byte, and a body may not fall silent for
  ``body_timeout`` (408). A request being answered holds no timer, so a long poll is never cut. On
  shutdown, idle connections are dropped at once.
- size: each route has a body cap (``BodyCaps``), refused from Content-Length before reading, or as soon
  as a chunked body passes it (413); the connection is closed, so the rest is never read.
- count: one identity (the certificate's SPIFFE id) holds at most ``per_identity`` connections, and
  connections without a certificate together at most ``unauthenticated``; one past its cap is answered
  429 with Retry-After as soon as its handshake is done, and closed.
- memory after close: a closed TLS connection whose peer never reads is dropped after ``CLOSE_GRACE``
  instead of asyncio's 30 s wait for its close_notify, so refused and timed-out abuse does not pile up.
- framing (RFC 9112 §6.1, §6.3): a request with both Content-Length and Transfer-Encoding, more than one
  Content-Length, or malformed chunking is answered 400 and the connection closed, so no request smuggled
  behind it is ever parsed.

Every refusal is one log line and a ``{"error", "detail"}`` body; a client that drops a request mid-body
is one log line too.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import re
from asyncio import sslproto
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from http import HTTPStatus
from typing import Any, ClassVar, Protocol
from urllib.parse import unquote

import h11

from fedge.security.peer import MutualTLSProtocol
from fedge.security.pki import PKIError, identity_of

UNAUTHENTICATED = "unauthenticated"
# A closed TLS connection waits for the peer's close_notify (asyncio: 30 s); one that never reads would keep
# its memory that long. After this grace, which lets a refusal reach a reading client, it is dropped.
CLOSE_GRACE = 2.0
TLS_READ_BUFFER = 64 * 1024


@dataclass(frozen=True)
class Limits:
    """What one connection may take. The defaults leave a long poll (up to 60 s, answered before then),
    hundreds of simulated clients on loopback and an executor's parallel submissions untouched."""

    idle_timeout: float = 15.0
    sole_idle_timeout: float = 900.0  # longer than a round (600 s by default) and than a client's keep-alive
    head_timeout: float = 10.0
    body_timeout: float = 15.0
    max_head: int = 16 * 1024
    per_identity: int = 32
    unauthenticated: int = 64
    retry_after: int = 1


@dataclass(frozen=True)
class BodyCap:
    """The most a route's body may weigh, and the refusal code its callers already know for more."""

    limit: int
    code: str = "body_too_large"


BodyCaps = Callable[[str, str], BodyCap]  # (method, path) -> cap


def idle_timeout_for(limits: Limits, identified: bool, connections: int) -> float:
    """How long a connection with no request in flight may stay silent: the one policy for idle sockets.

    Hardening wants idle sockets cut (each holds a descriptor and TLS buffers); a federation wants a
    client's connection to outlive the wait between its rounds, which at hundreds of clients is longer
    than any short timeout, or every client pays a full mutual-TLS handshake every round. Both hold when
    the long wait is a privilege of proof, one per identity: a connection that completed a request under
    a client certificate, while it is the only connection that identity holds, may stay idle for
    ``sole_idle_timeout`` (a second connection puts it back on the short timeout); every other idle
    connection (no certificate, no request yet, an identity's second and later) is cut after
    ``idle_timeout``. So long-idle sockets number at most the enrolled identities, which the operator
    controls, and an anonymous peer or a certificate holder opening many gains nothing over the short
    timeout. A client keeps one pooled connection (``fedge.transport``), which is then the sole one."""
    return limits.sole_idle_timeout if identified and connections == 1 else limits.idle_timeout


def framing_error(head: bytes) -> str | None:
    """Why a request head frames its body ambiguously (RFC 9112 §6.1, §6.3), None when it does not.

    h11 reads a request with both headers as chunked and merges repeated equal Content-Lengths; a proxy in
    front may read them otherwise, which is what request smuggling exploits, so both are refused here."""
    fields = [line.partition(b":") for line in re.split(rb"\r?\n", head)[1:] if line]
    lengths = [value for name, _, value in fields if name.strip().lower() == b"content-length"]
    encoded = any(name.strip().lower() == b"transfer-encoding" for name, _, _ in fields)
    if encoded and lengths:
        return "a request may not carry both Content-Length and Transfer-Encoding"
    if len(lengths) > 1 or any(b"," in value for value in lengths):
        return "a request may carry one Content-Length only"
    return None


def identity_key(peer_der: bytes | None) -> str:
    """What the connection cap counts against: the certificate's fedge identity, so every certificate a
    client ever held shares one budget."""
    if peer_der is None:
        return UNAUTHENTICATED
    try:
        return identity_of(peer_der).uri
    except PKIError:
        return "sha256:" + hashlib.sha256(peer_der).hexdigest()


def error_response(status: int, code: str, detail: str, headers: tuple[tuple[str, str], ...] = ()) -> bytes:
    """A complete HTTP/1.1 response that closes the connection, written without h11: it is sent when h11
    may be in no state to send one (a head still incomplete, a request it refused to parse)."""
    body = json.dumps({"error": code, "detail": detail}).encode()
    lines = [
        f"HTTP/1.1 {status} {HTTPStatus(status).phrase}",
        "content-type: application/json",
        f"content-length: {len(body)}",
        "connection: close",
        *(f"{name}: {value}" for name, value in headers),
    ]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body


class ConnectionLedger:
    """How many connections each identity holds now, across one server (the event loop's thread only)."""

    def __init__(self) -> None:
        self._open: Counter[str] = Counter()
        self.long_idle: dict[str, GuardedProtocol] = {}  # per identity, the connection on the long timer

    def admit(self, key: str, cap: int) -> bool:
        if self._open[key] >= cap:
            return False
        self._open[key] += 1
        return True

    def held(self, key: str) -> int:
        return self._open[key]

    def release(self, key: str) -> None:
        self._open[key] -= 1
        if self._open[key] <= 0:
            del self._open[key]


class Screen(Protocol):
    """What a ``ScreenedConnection`` asks before it hands an event on; False means the request was refused
    (and the connection is closing)."""

    def head(self, event: h11.Request, raw: bytes) -> bool: ...

    def body(self, size: int) -> bool: ...

    def body_end(self) -> None: ...


class ScreenedConnection(h11.Connection):
    """h11's server connection, with each request head (as received, before h11 normalized it) and each
    body chunk shown to a ``Screen`` before uvicorn sees them. A refused event reads as NEED_DATA, so
    uvicorn stops parsing: whatever follows in the buffer is never read as a request."""

    def __init__(self, screen: Screen, max_incomplete_event_size: int) -> None:
        super().__init__(h11.SERVER, max_incomplete_event_size)
        self._screen = screen

    def next_event(self) -> Any:
        before = self.trailing_data[0] if self.their_state is h11.IDLE else None
        event = super().next_event()
        if isinstance(event, h11.Request) and before is not None:
            raw = before[: len(before) - len(self.trailing_data[0])]
            return event if self._screen.head(event, raw) else h11.NEED_DATA
        if isinstance(event, h11.Data):
            return event if self._screen.body(len(event.data)) else h11.NEED_DATA
        if isinstance(event, h11.EndOfMessage):
            self._screen.body_end()
        return event


class GuardedProtocol(MutualTLSProtocol):
    """uvicorn's h11 protocol with the bounds of this module; ``guarded_protocol`` makes one per server."""

    limits: ClassVar[Limits]
    caps: ClassVar[BodyCaps]
    ledger: ClassVar[ConnectionLedger]

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.conn = ScreenedConnection(
            self, self.config.h11_max_incomplete_event_size or self.limits.max_head
        )
        self._key = UNAUTHENTICATED
        self._admitted = False
        self._refused = False
        self._cap = BodyCap(0)
        self._received = 0
        self._body_seen = 0.0
        self._head_timer: asyncio.TimerHandle | None = None
        self._body_timer: asyncio.TimerHandle | None = None
        self._abort_timer: asyncio.TimerHandle | None = None
        self._idle_since = 0.0

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._key = identity_key(self.peer_der)
        cap = self.limits.unauthenticated if self.peer_der is None else self.limits.per_identity
        self._admitted = self.ledger.admit(self._key, cap)
        if not self._admitted:  # refused before it costs more than its handshake: not kept waiting to ask
            self._refuse(429, "too_many_connections", f"{self._key} already holds {cap} connections")
            return
        waiting = self.ledger.long_idle.pop(self._key, None)
        if waiting is not None:  # no longer the identity's only connection: the short timeout, from now on
            waiting.shorten_idle()
        # uvicorn starts its idle timer only after a response: a connection that never sends would stay.
        self.timeout_keep_alive_task = self.loop.call_later(
            self.limits.idle_timeout, self.timeout_keep_alive_handler
        )

    def data_received(self, data: bytes) -> None:
        if self._head_timer is None and self.conn.their_state is h11.IDLE:
            self._head_timer = self.loop.call_later(self.limits.head_timeout, self._head_too_slow)
        super().data_received(data)

    def connection_lost(self, exc: Exception | None) -> None:
        if self.ledger.long_idle.get(self._key) is self:
            del self.ledger.long_idle[self._key]
        if self._admitted:
            self.ledger.release(self._key)
            self._admitted = False
        cycle = self.cycle
        if (
            not self._refused
            and cycle
            and not cycle.response_complete
            and self.conn.their_state is h11.SEND_BODY
        ):
            scope = cycle.scope
            self.logger.warning(
                "%s dropped %s %s after %d body bytes",
                self._who(),
                scope["method"],
                scope["path"],
                self._received,
            )
        self._stop_timers()
        if self._abort_timer is not None:
            self._abort_timer.cancel()
        super().connection_lost(exc)

    def on_response_complete(self) -> None:
        """uvicorn arms the idle timer here with ``timeout_keep_alive``: set it first, by the policy."""
        identified = self._key != UNAUTHENTICATED
        self.timeout_keep_alive = idle_timeout_for(self.limits, identified, self.ledger.held(self._key))
        if self.timeout_keep_alive > self.limits.idle_timeout:
            self.ledger.long_idle[self._key] = self
        self._idle_since = self.loop.time()
        super().on_response_complete()

    def shorten_idle(self) -> None:
        """Another connection of this identity opened: this one's idle time counts against the short
        timeout again (at once, if it has been idle longer)."""
        self.timeout_keep_alive = self.limits.idle_timeout
        if self.timeout_keep_alive_task is not None:
            self.timeout_keep_alive_task.cancel()
            left = max(0.0, self.limits.idle_timeout - (self.loop.time() - self._idle_since))
            self.timeout_keep_alive_task = self.loop.call_later(left, self.timeout_keep_alive_handler)

    def timeout_keep_alive_handler(self) -> None:
        super().timeout_keep_alive_handler()
        self._abort_later()

    def shutdown(self) -> None:
        """uvicorn's graceful shutdown waits until every connection is gone, and an idle TLS connection is
        gone only once its peer answers the close, which an idle client's pool does not read: every
        shutdown would wait out the graceful timeout. An idle connection has nothing in flight, so it is
        dropped at once; one being answered finishes first."""
        idle = self.cycle is None or self.cycle.response_complete
        super().shutdown()
        if idle:
            self.transport.abort()

    def send_400_response(self, msg: str) -> None:
        """uvicorn's answer to a request h11 cannot parse (malformed chunking, bad header syntax, conflicting
        Content-Lengths), safe also while the application is answering the request; uvicorn logged it."""
        self._refuse(400, "bad_request", "malformed HTTP request", log=False)

    # Screen
    def head(self, event: h11.Request, raw: bytes) -> bool:
        self._cancel_head_timer()
        problem = framing_error(raw)
        if problem is not None:
            self._refuse(400, "bad_framing", problem)
            return False
        path = unquote(event.target.partition(b"?")[0].decode("ascii"))
        self._cap = self.caps(event.method.decode("ascii"), path)
        self._received = 0
        headers = dict(event.headers)
        declared = int(headers.get(b"content-length", 0))
        if declared > self._cap.limit:
            self._refuse(413, self._cap.code, f"a body of {declared} bytes exceeds {self._cap.limit}")
            return False
        if declared or b"transfer-encoding" in headers:
            self._body_seen = self.loop.time()
            self._body_timer = self.loop.call_later(self.limits.body_timeout, self._body_too_slow)
        return True

    def body(self, size: int) -> bool:
        self._received += size
        self._body_seen = self.loop.time()
        if self._received > self._cap.limit:
            self._refuse(413, self._cap.code, f"the body exceeds {self._cap.limit} bytes")
            return False
        return True

    def body_end(self) -> None:
        if self._body_timer is not None:
            self._body_timer.cancel()
            self._body_timer = None

    # refusals
    def _head_too_slow(self) -> None:
        self._head_timer = None
        self._refuse(408, "request_timeout", f"the request head took over {self.limits.head_timeout:g} s")

    def _body_too_slow(self) -> None:
        if self.flow.read_paused:  # uvicorn stopped reading until the application takes what it has
            self._body_seen = self.loop.time()
        silent = self.loop.time() - self._body_seen
        if silent < self.limits.body_timeout:
            self._body_timer = self.loop.call_later(self.limits.body_timeout - silent, self._body_too_slow)
            return
        self._body_timer = None
        self._refuse(408, "request_timeout", f"the body fell silent for {self.limits.body_timeout:g} s")

    def _refuse(self, status: int, code: str, detail: str, log: bool = True) -> None:
        """Answer ``status`` (unless the application already began its answer) and close. The application,
        if it is running, reads a disconnect and whatever it sends after is dropped."""
        if self._refused or self.transport.is_closing():
            return
        self._refused = True
        if log:
            self.logger.warning("%s refused (%d %s): %s", self._who(), status, code, detail)
        self._stop_timers()
        answered = False
        if self.cycle is not None and not self.cycle.response_complete:
            answered = self.cycle.response_started
            self.cycle.disconnected = True
            self.cycle.message_event.set()
        if not answered:
            retry = (("retry-after", str(self.limits.retry_after)),) if status == 429 else ()
            self.transport.write(error_response(status, code, detail, retry))
        self.transport.close()
        self._abort_later()

    def _abort_later(self) -> None:
        if self._abort_timer is None:
            self._abort_timer = self.loop.call_later(CLOSE_GRACE, self.transport.abort)

    def _who(self) -> str:
        address = f"{self.client[0]}:{self.client[1]}" if self.client else "a client"
        return address if self._key == UNAUTHENTICATED else f"{self._key} ({address})"

    def _cancel_head_timer(self) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None

    def _stop_timers(self) -> None:
        self._cancel_head_timer()
        self.body_end()
        self._unset_keepalive_if_required()


def guarded_protocol(limits: Limits, caps: BodyCaps) -> type[GuardedProtocol]:
    """A ``GuardedProtocol`` class for one server: its limits, its routes' caps, its own ledger."""
    attributes = {"limits": limits, "caps": staticmethod(caps), "ledger": ConnectionLedger()}
    return type("GuardedProtocol", (GuardedProtocol,), attributes)


def size_tls_buffers(size: int = TLS_READ_BUFFER) -> None:
    """Every TLS connection of an asyncio server gets a read buffer of ``SSLProtocol.max_size`` (256 KiB),
    allocated zeroed, so resident from the start: with connections kept between rounds, 306 KiB of server
    memory per idle client (measured, 300 connections; uvloop's, a compile-time constant, costs the same).
    A TLS record holds at most 16 KiB, so 64 KiB still reads four records per call; measured: 114 KiB
    per idle connection. The class attribute is the one knob Python has, and only asyncio's loop reads it,
    hence ``loop="asyncio"`` in ``uvicorn_options``; it applies to the process that calls this."""
    sslproto.SSLProtocol.max_size = size


def uvicorn_options(limits: Limits, caps: BodyCaps) -> dict[str, Any]:
    """The ``uvicorn.Config`` arguments that apply ``limits``: uvicorn's own knobs where they do the job,
    on asyncio's loop with TLS read buffers sized by ``size_tls_buffers``."""
    size_tls_buffers()
    return {
        "loop": "asyncio",
        "http": guarded_protocol(limits, caps),
        "timeout_keep_alive": limits.idle_timeout,
        "h11_max_incomplete_event_size": limits.max_head,
    }
