"""Strict HTTP/1.1 framing (RFC 9112 §6.1, §6.3): a request whose body length is ambiguous is answered 400
and its connection closed, so a request smuggled behind it in the same stream never runs."""

from __future__ import annotations

from pathlib import Path

import pytest
from conftest import tls_for
from raw_http import answers, open_tls, read_until_closed, request

from fedge.security import pki
from fedge.security.http_limits import framing_error

# An admin's request that, if it ran, would revoke alice: what a smuggler would hide behind a harmless one.
SMUGGLED = request("POST", "/v1/admin/clients/alice/revoke", {"Content-Length": "0"})

AMBIGUOUS = {
    "content-length and transfer-encoding": (
        {"Content-Length": "5", "Transfer-Encoding": "chunked"},
        b"0\r\n\r\n",
        "bad_framing",
    ),
    "two equal content-lengths": (
        {"Content-Length": "2", "content-length": "2"},
        b"{}",
        "bad_framing",
    ),
    "a content-length list": ({"Content-Length": "2, 2"}, b"{}", "bad_framing"),
    "two different content-lengths": ({"Content-Length": "2", "content-length": "3"}, b"{}", "bad_request"),
    "a chunk size that is not hex": (
        {"Transfer-Encoding": "chunked"},
        b"zz\r\nhello\r\n0\r\n\r\n",
        "bad_request",
    ),
    "a chunk longer than its size": (
        {"Transfer-Encoding": "chunked"},
        b"2\r\nhello\r\n0\r\n\r\n",
        "bad_request",
    ),
}


@pytest.mark.parametrize("case", AMBIGUOUS, ids=list(AMBIGUOUS))
def test_an_ambiguously_framed_request_is_refused_and_the_request_smuggled_behind_it_never_runs(
    case: str, start_server, connect, fresh_pki: Path
) -> None:
    headers, body, code = AMBIGUOUS[case]
    server = start_server(pki_root=fresh_pki)
    with open_tls(server.url, tls_for(fresh_pki, pki.Role.ADMIN, "ops")) as sock:
        sock.sendall(request("POST", "/v1/admin/start", headers, body) + SMUGGLED)
        stream, _ = read_until_closed(sock, timeout=15)
    [answer] = answers(stream)  # one answer, then the connection closed: the smuggled request was not read
    assert (answer.status, answer.error) == (400, code)
    assert answer.headers["connection"] == "close"
    assert connect(server, "alice", pki_root=fresh_pki).model_meta().round == 0  # alice was not revoked
    assert pki.revoked(fresh_pki) == {}


def test_a_well_framed_request_keeps_its_connection_and_the_next_request_on_it_runs(
    start_server, pki_dir: Path
) -> None:
    server = start_server()
    with open_tls(server.url, tls_for(pki_dir, pki.Role.CLIENT, "alice")) as sock:
        sock.sendall(request("GET", "/healthz") + request("GET", "/healthz", {"Connection": "close"}))
        stream, _ = read_until_closed(sock, timeout=15)
    assert [a.status for a in answers(stream)] == [200, 200]


@pytest.mark.parametrize(
    ("head", "problem"),
    [
        (b"POST / HTTP/1.1\r\nContent-Length: 1\r\nTransfer-Encoding: chunked", "both"),
        (b"POST / HTTP/1.1\r\ntransfer-encoding: chunked\r\ncontent-length: 1", "both"),
        (b"POST / HTTP/1.1\r\nContent-Length: 1\r\nCONTENT-LENGTH: 1", "one Content-Length"),
        (b"POST / HTTP/1.1\nContent-Length: 1,1\n", "one Content-Length"),
        (b"POST / HTTP/1.1\r\nContent-Length: 1\r\nX-Length: 1", None),
        (b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked", None),
        (b"GET / HTTP/1.1\r\nHost: x", None),
    ],
)
def test_framing_error_names_every_ambiguous_body_length(head: bytes, problem: str | None) -> None:
    found = framing_error(head)
    assert (found is None) if problem is None else (found is not None and problem in found)
