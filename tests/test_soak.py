"""SOAK (about a minute): honest traffic beside every abuse the server bounds, at once, for SOAK_SECONDS.

Slow heads, oversized enrollments, idle mutual-TLS connections past the per-identity cap, smuggling attempts,
a CA flood and uploads dropped mid-body run together while an honest client polls the round and reads the
model's metadata. The server's memory must stay flat (what the abuse may hold is bounded by the connection
caps, so it stops growing once they are full) and the honest client never starved: its p99 within twice what
it measured on the idle server, or at worst a quarter of a second (the machine's own noise alone moves an
idle p99 by 4x between windows). Run it alone with ``pytest tests/test_soak.py``.
"""

from __future__ import annotations

import contextlib
import multiprocessing
import threading
import time
from collections.abc import Callable
from multiprocessing.synchronize import Event
from pathlib import Path

import numpy as np
import psutil
from conftest import tls_for
from raw_http import no_certificate, open_tls, read_until_closed, request

from fedge.security import pki
from fedge.security.http_limits import CLOSE_GRACE, Limits
from fedge.transport import FedgeClient

LIMITS = Limits()
SOAK_SECONDS = 35.0
IDLE_SECONDS = 6.0
STARVED = 0.25  # seconds: an honest p99 past this under abuse means the server was starved
RAMP_SECONDS = LIMITS.idle_timeout + 3  # the caps fill and every kind of timeout has passed once


def _honest_latencies(api: FedgeClient, until: float, at_least: int = 0) -> list[float]:
    taken: list[float] = []
    while time.monotonic() < until or len(taken) < at_least:
        started = time.perf_counter()
        api.current_round() if len(taken) % 2 else api.model_meta()
        taken.append(time.perf_counter() - started)
    return taken


def _p99(latencies: list[float]) -> float:
    return float(np.percentile(latencies, 99))


def _abuse(stop: Event, every: float, attack: Callable[[], object]) -> None:
    """Run ``attack`` every ``every`` seconds until ``stop``; the server's refusals are the point."""
    while not stop.is_set():
        with contextlib.suppress(OSError):
            attack()
        stop.wait(every)


def _abusers(url: str, pki_dir: Path, stop: Event) -> None:
    """Every abuse at once, from a process of its own (as abusers are): the honest client's measurements
    share no interpreter with them."""
    anyone = no_certificate(str(pki_dir / "ca.pem"))
    bob, carol = (tls_for(pki_dir, pki.Role.CLIENT, who) for who in ("bob", "carol"))
    held: list = []

    def hold(context, first: bytes) -> None:
        """Open a connection, send ``first`` and leave it: the server has to time it out or refuse it."""
        sock = open_tls(url, context)
        sock.sendall(first)
        held.append(sock)

    def oversized_enrollment() -> None:
        with open_tls(url, anyone) as sock:
            sock.sendall(request("POST", "/v1/enroll", {"Content-Length": str(64 << 20)}, b"\0" * 65536))
            read_until_closed(sock, timeout=30)

    def smuggle() -> None:
        with open_tls(url, carol) as sock:
            carrier = request(
                "POST", "/healthz", {"Content-Length": "5", "Transfer-Encoding": "chunked"}, b"0\r\n\r\n"
            )
            sock.sendall(carrier + request("GET", "/v1/model"))
            read_until_closed(sock, timeout=30)

    def ca_flood() -> None:
        with open_tls(url, anyone) as sock:
            for _ in range(20):
                sock.sendall(request("GET", "/v1/ca"))
                sock.recv(65536)

    def dropped_upload() -> None:
        sock = open_tls(url, carol)
        headers = {"Content-Length": "60000", "X-Fedge-Signature": "c2ln", "X-Fedge-Nonce": "ab" * 16}
        sock.sendall(request("POST", "/v1/rounds/1/updates", headers, b"\0" * 1000))
        sock.close()

    attacks = [
        # Slow heads live head_timeout (10 s) and idle connections idle_timeout (15 s): these rates keep
        # more of each open than their caps admit.
        (0.15, lambda: hold(anyone, b"GET /healthz HTTP/1.1\r\nX-Slow: ")),
        (0.4, lambda: hold(bob, b"")),
        (0.5, oversized_enrollment),
        (0.5, smuggle),
        (1.0, ca_flood),
        (0.5, dropped_upload),
    ]
    threads = [threading.Thread(target=_abuse, args=(stop, every, attack)) for every, attack in attacks]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    print(f"abusers opened {len(held)} connections they never closed", flush=True)


def test_soak_mixed_abuse_keeps_memory_flat_and_honest_p99_within_twice_idle(
    start_server, pki_dir: Path
) -> None:
    server = start_server("--min-clients", "10")  # no round opens: the honest reads see a steady server
    process = psutil.Process(server.process.pid)
    api = FedgeClient(server.url, pki.credentials(pki_dir, pki.Role.CLIENT, "alice"), timeout=30)
    _honest_latencies(api, time.monotonic() + 2)  # warm up both routes and the connection
    idle_before = _honest_latencies(api, time.monotonic() + IDLE_SECONDS, at_least=300)
    rss_idle = process.memory_info().rss

    stop = multiprocessing.get_context("fork").Event()
    abusers = multiprocessing.get_context("fork").Process(target=_abusers, args=(server.url, pki_dir, stop))
    abusers.start()
    try:
        time.sleep(RAMP_SECONDS)
        rss_ramped = process.memory_info().rss
        rss: list[int] = []
        under_abuse: list[float] = []
        end = time.monotonic() + SOAK_SECONDS
        while time.monotonic() < end:
            under_abuse += _honest_latencies(api, min(end, time.monotonic() + 1))
            rss.append(process.memory_info().rss)
    finally:
        stop.set()
        abusers.join(timeout=60)
    time.sleep(LIMITS.head_timeout + CLOSE_GRACE)  # what the abusers left open is gone: idle again
    idle_after = _honest_latencies(api, time.monotonic() + IDLE_SECONDS, at_least=300)
    api.close()

    # The machine is shared: its own load drifts over a minute, so the idle baseline is the worse of an
    # idle window before the abuse and one after it.
    idle = max(_p99(idle_before), _p99(idle_after))
    mib = 1 << 20
    print(  # the numbers behind the verdict, for the record (pytest -s)
        f"\nhonest p99 idle {_p99(idle_before) * 1000:.1f} ms before, {_p99(idle_after) * 1000:.1f} after;"
        f" under abuse {_p99(under_abuse) * 1000:.1f} ms ({len(under_abuse)} requests);"
        f" RSS idle {rss_idle / mib:.0f} MiB, ramped {rss_ramped / mib:.0f}, max {max(rss) / mib:.0f},"
        f" last {rss[-1] / mib:.0f}"
    )
    assert abusers.exitcode == 0
    # Starvation, not speed: an abuse that blocked the event loop or exhausted the server would stall honest
    # requests for seconds. The ratio to the idle p99 is printed above; as a speed figure it would belong in
    # bench/ (on 2 shared cores the idle p99 alone varies 5-20 ms between windows), so it is not asserted.
    assert _p99(under_abuse) <= max(2 * idle, STARVED)
    assert max(rss) - rss_ramped < 16 * mib  # flat: nothing the abuse does accumulates
    assert max(rss) - rss_idle < 64 * mib  # and what it holds at all is bounded by the connection caps
    assert "Traceback" not in server.log.read_text()
