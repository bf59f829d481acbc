"""HTTP/1.1 by hand over a TLS socket: what an abusive client sends, byte for byte, where httpx would refuse
to (two Content-Lengths, a head sent a byte at a time, a body that never ends)."""

from __future__ import annotations

import json
import socket
import ssl
import time
from dataclasses import dataclass
from urllib.parse import urlsplit


def open_tls(url: str, context: ssl.SSLContext, timeout: float = 30.0) -> ssl.SSLSocket:
    """A connection to the server at ``url``, its TLS handshake done."""
    parts = urlsplit(url)
    raw = socket.create_connection((parts.hostname, parts.port), timeout=timeout)
    return context.wrap_socket(raw, server_hostname=parts.hostname)


def no_certificate(ca_pem: str) -> ssl.SSLContext:
    """TLS that verifies the server but presents no client certificate (an enrolling device, or anyone)."""
    return ssl.create_default_context(cafile=ca_pem)


def read_until_closed(sock: ssl.SSLSocket, timeout: float = 30.0) -> tuple[bytes, float]:
    """Everything the server sends until it closes the connection, and how long that took; fails if it is
    still open after ``timeout``."""
    started = time.monotonic()
    sock.settimeout(timeout)
    received = b""
    while True:
        try:
            chunk = sock.recv(65536)
        except (ConnectionResetError, ssl.SSLEOFError):
            chunk = b""
        if not chunk:
            return received, time.monotonic() - started
        received += chunk


@dataclass(frozen=True)
class Answer:
    status: int
    headers: dict[str, str]
    body: bytes

    @property
    def error(self) -> str:
        return json.loads(self.body)["error"]


def answers(stream: bytes) -> list[Answer]:
    """The responses in ``stream``, in order (each framed by its Content-Length)."""
    found = []
    while stream:
        head, _, rest = stream.partition(b"\r\n\r\n")
        lines = head.decode("latin-1").split("\r\n")
        headers = {
            name.lower(): value.strip() for name, _, value in (line.partition(":") for line in lines[1:])
        }
        length = int(headers.get("content-length", 0))
        found.append(Answer(int(lines[0].split()[1]), headers, rest[:length]))
        stream = rest[length:]
    return found


def read_answer(sock: ssl.SSLSocket, timeout: float = 30.0) -> Answer:
    """One response from a connection that may stay open."""
    sock.settimeout(timeout)
    received = b""
    while b"\r\n\r\n" not in received:
        chunk = sock.recv(65536)
        assert chunk, f"the connection closed after {received!r}"
        received += chunk
    head, _, body = received.partition(b"\r\n\r\n")
    length = int(answers(head + b"\r\n\r\n")[0].headers.get("content-length", 0))
    while len(body) < length:
        chunk = sock.recv(65536)
        assert chunk, "the connection closed mid-body"
        body += chunk
    return answers(head + b"\r\n\r\n" + body)[0]


def request(method: str, path: str, headers: dict[str, str] | None = None, body: bytes = b"") -> bytes:
    """A request head (Host and the given headers, as given) and its body, as bytes on the wire."""
    fields = {"Host": "127.0.0.1", **(headers or {})}
    head = f"{method} {path} HTTP/1.1\r\n" + "".join(f"{k}: {v}\r\n" for k, v in fields.items()) + "\r\n"
    return head.encode() + body
