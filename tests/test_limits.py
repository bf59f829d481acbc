"""Bounded resources at the server's edge: body caps before reading, read and idle timeouts that spare a long
poll, connection caps per identity and for the unauthenticated, rate limits on the public routes, and one log
line for a client that goes away mid-upload. Every probe is a raw socket over real mutual TLS."""

from __future__ import annotations

import ssl
import threading
import time
from pathlib import Path

import psutil
import pytest
from conftest import agreed_suite, tls_for, toy_model
from raw_http import Answer, answers, no_certificate, open_tls, read_answer, read_until_closed, request

from fedge.codec import encode
from fedge.security import pki
from fedge.security.http_limits import Limits
from fedge.server.limits import PUBLIC_RATES, SMALL_BODY, UPDATE_OVERHEAD, Rate, TokenBuckets

LIMITS = Limits()
MODEL_BYTES = len(encode(toy_model()))  # the toy server's initial model, as it serves it


def test_a_64_mib_enrollment_is_refused_from_its_content_length_without_being_read(
    start_server, pki_dir: Path
) -> None:
    server = start_server()
    before = psutil.Process(server.process.pid).memory_info().rss
    with open_tls(server.url, no_certificate(str(pki_dir / "ca.pem"))) as sock:
        sock.sendall(request("POST", "/v1/enroll", {"Content-Length": str(64 << 20)}, b"{"))
        stream, took = read_until_closed(sock, timeout=15)  # answered with the body still unsent
    [answer] = answers(stream)
    assert (answer.status, answer.error) == (413, "body_too_large")
    assert took < 5
    assert psutil.Process(server.process.pid).memory_info().rss - before < 8 << 20


def test_a_chunked_body_is_refused_as_soon_as_it_passes_its_routes_cap(start_server, pki_dir: Path) -> None:
    server = start_server()
    chunk = b"x" * 4096
    with open_tls(server.url, no_certificate(str(pki_dir / "ca.pem"))) as sock:
        sock.sendall(request("POST", "/v1/enroll", {"Transfer-Encoding": "chunked"}))
        for _ in range(2 * SMALL_BODY // len(chunk)):  # twice the cap, and the body never ends
            sock.sendall(b"1000\r\n" + chunk + b"\r\n")
        stream, took = read_until_closed(sock, timeout=15)
    [answer] = answers(stream)
    assert (answer.status, answer.error) == (413, "body_too_large")
    assert took < LIMITS.body_timeout / 2  # refused while it streamed, not at a timeout or its end


def test_the_update_cap_follows_the_model_and_is_applied_before_the_body(start_server, pki_dir: Path) -> None:
    server = start_server()
    limit = MODEL_BYTES + UPDATE_OVERHEAD
    alice = tls_for(pki_dir, pki.Role.CLIENT, "alice")
    with open_tls(server.url, alice) as sock:
        sock.sendall(request("POST", "/v1/rounds/1/updates", {"Content-Length": str(limit + 300)}))
        stream, _ = read_until_closed(sock, timeout=15)
    [answer] = answers(stream)
    assert (answer.status, answer.error) == (413, "update_too_large")
    assert str(limit) in answer.body.decode()  # the cap is the current model's size plus its metadata


def _closed_after(sock, since: float, results: dict[str, tuple[float, list[Answer]]], name: str) -> None:
    """Record how long after ``since`` the server closed ``sock``, and what it said before."""
    stream, _ = read_until_closed(sock, timeout=60)
    results[name] = (time.monotonic() - since, answers(stream))


def test_slow_heads_slow_bodies_and_idle_connections_time_out_but_a_long_poll_does_not(
    start_server, pki_dir: Path
) -> None:
    server = start_server("--min-clients", "10")  # round 1 never opens: the long poll waits its full time
    anyone = no_certificate(str(pki_dir / "ca.pem"))
    alice = tls_for(pki_dir, pki.Role.CLIENT, "alice")
    results: dict[str, tuple[float, list[Answer]]] = {}
    threads = []

    silent = open_tls(server.url, anyone)  # connects and never sends
    since = {"silent": time.monotonic()}
    slow_head = open_tls(server.url, anyone)
    slow_head.sendall(b"GET /healthz HTTP/1.1\r\n")
    since["slow_head"] = time.monotonic()
    slow_body = open_tls(server.url, anyone)
    slow_body.sendall(request("POST", "/v1/enroll", {"Content-Length": "100"}, b'{"token": '))
    since["slow_body"] = time.monotonic()
    idle = open_tls(server.url, alice)  # one answered request, then silence on the mutual-TLS connection
    idle.sendall(request("GET", "/healthz"))
    assert read_answer(idle).status == 200
    sole = open_tls(server.url, tls_for(pki_dir, pki.Role.CLIENT, "bob"))  # bob's only connection
    assert _healthz(sole).status == 200
    since["idle"] = time.monotonic()
    for name, sock in [
        ("silent", silent),
        ("slow_head", slow_head),
        ("slow_body", slow_body),
        ("idle", idle),
    ]:
        threads.append(threading.Thread(target=_closed_after, args=(sock, since[name], results, name)))
    poll = open_tls(server.url, alice)
    poll.sendall(request("GET", "/v1/rounds/current"))
    etag = read_answer(poll).headers["etag"]
    wait = LIMITS.idle_timeout + LIMITS.body_timeout
    poll.sendall(request("GET", f"/v1/rounds/current?wait={wait:g}", {"If-None-Match": etag}))
    started = time.monotonic()
    for thread in threads:
        thread.start()
    for _ in range(4):  # keeps the slow head trickling: every byte arrives well within any gap
        time.sleep(LIMITS.head_timeout / 4)
        try:
            slow_head.sendall(b"X")
        except OSError:
            break
    long_poll = read_answer(poll, timeout=wait + 30)
    polled = time.monotonic() - started
    for thread in threads:
        thread.join()

    assert long_poll.status == 200
    assert polled >= wait - 1  # answered at the end of its wait, never cut
    for name in ("silent", "idle"):  # closed without a word, once idle for the idle timeout
        took, said = results[name]
        assert said == []
        assert LIMITS.idle_timeout - 1 < took < LIMITS.idle_timeout + 10
    took, [answer] = results["slow_head"]
    assert (answer.status, answer.error) == (408, "request_timeout")
    assert took < LIMITS.head_timeout + 10
    took, [answer] = results["slow_body"]
    assert (answer.status, answer.error) == (408, "request_timeout")
    assert LIMITS.body_timeout - 1 < took < LIMITS.body_timeout + 10
    # An identity's one proven connection outlives the short timeout (it is how a client keeps its
    # connection between rounds); alice's idle one went because she also held the long poll.
    assert _healthz(sole).status == 200
    for sock in (silent, slow_head, slow_body, idle, poll, sole):
        sock.close()


def _healthz(sock) -> Answer:
    sock.sendall(request("GET", "/healthz"))
    return read_answer(sock)


def test_an_identity_holds_a_bounded_number_of_connections_and_others_are_unaffected(
    start_server, pki_dir: Path
) -> None:
    server = start_server()
    alice = tls_for(pki_dir, pki.Role.CLIENT, "alice")
    held = [open_tls(server.url, alice) for _ in range(LIMITS.per_identity)]
    try:
        assert all(_healthz(sock).status == 200 for sock in held)
        with open_tls(server.url, alice) as extra:
            extra.sendall(request("GET", "/healthz"))
            stream, _ = read_until_closed(extra, timeout=15)
        [answer] = answers(stream)
        assert (answer.status, answer.error) == (429, "too_many_connections")
        assert answer.headers["retry-after"] == str(LIMITS.retry_after)
        with open_tls(server.url, tls_for(pki_dir, pki.Role.CLIENT, "bob")) as bob:
            assert _healthz(bob).status == 200
        held.pop().close()
        time.sleep(0.5)
        with open_tls(server.url, alice) as again:  # a freed slot is alice's again
            assert _healthz(again).status == 200
    finally:
        for sock in held:
            sock.close()


def test_connections_without_a_certificate_are_bounded_together(start_server, pki_dir: Path) -> None:
    server = start_server()
    anyone = no_certificate(str(pki_dir / "ca.pem"))
    held = [open_tls(server.url, anyone) for _ in range(LIMITS.unauthenticated)]
    try:
        with open_tls(server.url, anyone) as extra:
            extra.sendall(request("GET", "/healthz"))
            stream, _ = read_until_closed(extra, timeout=15)
        [answer] = answers(stream)
        assert (answer.status, answer.error) == (429, "too_many_connections")
        with open_tls(server.url, tls_for(pki_dir, pki.Role.CLIENT, "alice")) as alice:
            assert _healthz(alice).status == 200  # a certified client is not held up by them
    finally:
        for sock in held:
            sock.close()


def test_the_public_routes_are_rate_limited_with_retry_after(start_server, pki_dir: Path) -> None:
    server = start_server()
    anyone = no_certificate(str(pki_dir / "ca.pem"))
    for path, method, body in [("/v1/ca", "GET", b""), ("/v1/enroll", "POST", b"{}")]:
        statuses = []
        with open_tls(server.url, anyone) as sock:
            for _ in range(int(PUBLIC_RATES[path].burst) + 10):
                sock.sendall(request(method, path, {"Content-Length": str(len(body))}, body))
                answer = read_answer(sock)
                statuses.append(answer.status)
                if answer.status == 429:
                    assert answer.error == "rate_limited"
                    assert int(answer.headers["retry-after"]) >= 1
                    break
        assert statuses[-1] == 429, path
        assert len(statuses) > PUBLIC_RATES[path].burst  # the burst itself went through
        assert 429 not in statuses[:-1]


def test_a_client_that_drops_an_upload_mid_body_leaves_one_log_line(start_server, pki_dir: Path) -> None:
    server = start_server()
    alice = tls_for(pki_dir, pki.Role.CLIENT, "alice")
    for _ in range(3):
        sock = open_tls(server.url, alice)
        headers = {"Content-Length": "10000", "X-Fedge-Signature": "c2ln", "X-Fedge-Nonce": "ab" * 16}
        sock.sendall(request("POST", "/v1/rounds/1/updates", headers, b"\0" * 100))
        time.sleep(0.3)
        sock.close()
    with open_tls(server.url, alice) as sock:  # the server goes on serving
        assert _healthz(sock).status == 200
    time.sleep(1)
    log = server.log.read_text()
    assert "Traceback" not in log
    dropped = [line for line in log.splitlines() if "dropped" in line]
    assert len(dropped) == 3, log
    assert all("POST /v1/rounds/1/updates after 100 body bytes" in line for line in dropped)


def test_a_token_bucket_allows_its_burst_then_its_rate_and_says_how_long_to_wait() -> None:
    buckets = TokenBuckets(Rate(burst=3, per_second=0.5))
    assert [buckets.wait("a", 0.0) for _ in range(3)] == [0, 0, 0]
    assert buckets.wait("a", 0.0) == pytest.approx(2.0)
    assert buckets.wait("b", 0.0) == 0  # every address has its own bucket
    assert buckets.wait("a", 1.0) == pytest.approx(1.0)
    assert buckets.wait("a", 2.0) == 0  # one token back after 1 / rate


def test_token_buckets_remember_a_bounded_number_of_addresses() -> None:
    buckets = TokenBuckets(Rate(burst=1, per_second=0.001), max_keys=2)
    for address in ("a", "b", "c"):
        assert buckets.wait(address, 0.0) == 0
    assert buckets.wait("c", 0.0) > 0  # the most recent are remembered
    assert buckets.wait("a", 0.0) == 0  # the least recently seen was forgotten, and starts full


def test_the_executor_applies_the_same_bounds_and_framing(make_pki, start_executor) -> None:
    executor_pki = make_pki("alice")
    pki.issue(executor_pki, pki.Role.EXECUTOR, "gpu-1", hosts=("127.0.0.1",))
    executor = start_executor(executor_pki, "gpu-1", "https://127.0.0.1:1")  # no server needed
    alice = tls_for(executor_pki, pki.Role.CLIENT, "alice")
    with open_tls(executor.url, alice) as sock:  # a calibration is a small JSON
        sock.sendall(request("POST", "/v1/calibrate", {"Content-Length": str(64 << 20)}))
        stream, took = read_until_closed(sock, timeout=15)
    [answer] = answers(stream)
    assert (answer.status, answer.error) == (413, "body_too_large")
    assert took < 5
    with open_tls(executor.url, alice) as sock:
        carrier = request("POST", "/v1/calibrate", {"Content-Length": "5", "Transfer-Encoding": "chunked"})
        sock.sendall(carrier + b"0\r\n\r\n" + request("GET", "/v1/key"))
        stream, _ = read_until_closed(sock, timeout=15)
    [answer] = answers(stream)
    assert (answer.status, answer.error) == (400, "bad_framing")
    with open_tls(executor.url, alice) as sock:  # and an idle connection is closed
        stream, took = read_until_closed(sock, timeout=60)
    assert stream == b""
    assert LIMITS.idle_timeout - 1 < took < LIMITS.idle_timeout + 10
    host, port = executor.url.removeprefix("https://").rsplit(":", 1)  # and the server's TLS 1.2 suites
    assert agreed_suite(host, int(port), tls_for(executor_pki, pki.Role.CLIENT, "alice"), "ECDHE+AESGCM")
    with pytest.raises(ssl.SSLError):
        agreed_suite(
            host, int(port), tls_for(executor_pki, pki.Role.CLIENT, "alice"), "ECDHE+SHA1:@SECLEVEL=0"
        )
