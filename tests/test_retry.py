"""Which failures an agent tries again, how long it waits, and that it never waits past the round's
deadline; and that its status never goes back to an older round."""

from __future__ import annotations

import pickle
import time

import httpx
import pytest

from fedge.client import retry, status
from fedge.client.round import Retrying
from fedge.transport import ServerError, raise_for_error

REQUEST = httpx.Request("GET", "https://server.test/v1/model")


@pytest.mark.parametrize(
    ("failure", "transient"),
    [
        (httpx.ConnectError("Connection refused", request=REQUEST), True),
        (httpx.RemoteProtocolError("Server disconnected without sending a response", request=REQUEST), True),
        (httpx.ReadTimeout("timed out", request=REQUEST), True),
        (ServerError(500, "http_error", "Internal Server Error"), True),
        (ServerError(502, "http_error", "Bad Gateway"), True),
        (ServerError(503, "overloaded", "try later", retry_after=3.0), True),
        (ServerError(429, "rate_limited", "slow down", retry_after=1.0), True),
        (ServerError(409, "round_closed", "round 3 is closed"), False),
        (ServerError(409, "duplicate_update", "already sent"), False),
        (ServerError(403, "not_selected", "not selected"), False),
        (ServerError(401, "certificate_revoked", "revoked"), False),
        (ServerError(400, "bad_nonce", "stale nonce"), False),
        (ValueError("bad data"), False),
    ],
)
def test_connection_errors_timeouts_and_server_errors_are_transient_refusals_are_not(
    failure: Exception, transient: bool
) -> None:
    assert retry.transient(failure) is transient
    assert (retry.wait(failure, 1, 60.0, 0.5) is not None) is transient


def test_waits_grow_exponentially_with_jitter_up_to_a_cap() -> None:
    failure = httpx.ConnectError("refused", request=REQUEST)
    low = [retry.wait(failure, n, 1e9, 0.0) for n in range(1, 9)]
    high = [retry.wait(failure, n, 1e9, 0.999999) for n in range(1, 9)]
    assert low == [0.25, 0.5, 1.0, 2.0, 4.0, 4.0, 4.0, 4.0]
    assert high == pytest.approx([0.5, 1.0, 2.0, 4.0, 8.0, 8.0, 8.0, 8.0], rel=1e-5)


def test_a_retry_after_is_waited_out_and_no_wait_runs_past_the_deadline() -> None:
    busy = ServerError(503, "overloaded", "try later", retry_after=6.0)
    assert retry.wait(busy, 1, 60.0, 0.0) == 6.0
    assert retry.wait(busy, 1, 6.2, 0.0) is None  # it would end within the margin of the deadline
    refused = httpx.ConnectError("refused", request=REQUEST)
    assert retry.wait(refused, 4, 3.0, 0.999) is None  # 4 s of backoff, 3 s left
    assert retry.wait(refused, 1, 1.0, 0.0) == 0.25
    assert retry.wait(refused, 1, -5.0, 0.0) is None  # past the deadline: nothing more is tried


def test_the_retry_after_header_reaches_the_error_and_survives_the_worker_boundary() -> None:
    def error(headers: dict[str, str]) -> ServerError:
        response = httpx.Response(
            503, headers=headers, json={"error": "overloaded", "detail": "x"}, request=REQUEST
        )
        with pytest.raises(ServerError) as raised:
            raise_for_error(response)
        return raised.value

    assert error({"Retry-After": "2.5"}).retry_after == 2.5
    for unusable in ({}, {"Retry-After": "Wed, 21 Oct 2015 07:28:00 GMT"}, {"Retry-After": "-1"}):
        assert error(unusable).retry_after is None
    carried = pickle.loads(pickle.dumps(error({"Retry-After": "4"})))
    assert (carried.status, carried.code, carried.retry_after) == (503, "overloaded", 4.0)


def test_retrying_tries_again_until_it_succeeds_and_says_each_wait() -> None:
    outcomes: list[Exception | str] = [
        httpx.ConnectError("refused", request=REQUEST),
        ServerError(502, "http_error", "Bad Gateway"),
        "delivered",
    ]
    waits: list[float] = []
    heard: list[str] = []

    def attempt() -> str:
        outcome = outcomes.pop(0)
        if isinstance(outcome, Exception):
            raise outcome
        return outcome

    def pause(seconds: float) -> bool:
        waits.append(seconds)
        return False

    retrying = Retrying(pause, lambda exc, seconds: heard.append(f"{exc} ({seconds:.2f} s)"))
    assert retrying.call(attempt, time.time() + 60) == "delivered"
    assert len(waits) == 2
    assert 0.25 <= waits[0] <= 0.5
    assert 0.5 <= waits[1] <= 1.0
    assert heard[0].startswith("refused")
    assert heard[1].startswith("502 http_error")


def test_retrying_stops_at_a_refusal_at_the_deadline_and_when_the_caller_stops() -> None:
    calls: list[int] = []

    def failing(exc: Exception):
        def attempt() -> None:
            calls.append(1)
            raise exc

        return attempt

    refused = ServerError(403, "not_selected", "no")
    with pytest.raises(ServerError, match="not_selected"):
        Retrying(lambda _s: False).call(failing(refused), time.time() + 60)
    assert len(calls) == 1
    calls.clear()
    down = httpx.ConnectError("refused", request=REQUEST)
    started = time.monotonic()
    with pytest.raises(httpx.ConnectError):
        Retrying().call(failing(down), time.time() + 2.0)  # real sleeps, until the deadline's margin
    assert time.monotonic() - started < 2.0  # it gave up before the deadline, not after it
    assert len(calls) >= 2  # the first wait (0.25 to 0.5 s) fits well before it
    calls.clear()
    with pytest.raises(httpx.ConnectError):
        Retrying(lambda _s: True).call(failing(down), time.time() + 60)  # a SIGTERM during the wait
    assert len(calls) == 1


@pytest.mark.parametrize(
    ("shown", "reported", "replaces"),
    [(None, 3, True), (3, 3, True), (3, 4, True), (3, None, True), (4, 3, False), (None, None, True)],
)
def test_the_status_never_goes_back_to_an_older_round(
    shown: int | None, reported: int | None, replaces: bool
) -> None:
    assert status.current(shown, reported) is replaces
