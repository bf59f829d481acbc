"""Whether a failed request to the server is worth sending again, and after how long: a pure decision.

A short outage (a restarting server, a dropped connection, an overloaded proxy) should cost an agent a
few seconds, not its round; a refusal (4xx: not selected, round closed, bad certificate) will not change
by asking again, so it stops the round at once. Waits grow exponentially with jitter, so a fleet that lost
the server together does not come back in lockstep, and never run past the round's deadline: an attempt
that could only arrive late is not made.
"""

from __future__ import annotations

import httpx

from fedge.transport import ServerError

FIRST_WAIT_S = 0.5
MAX_WAIT_S = 8.0
# Short of the deadline by this much, a retry is not worth starting: it would reach the server too late.
DEADLINE_MARGIN_S = 0.5


def transient(exc: BaseException) -> bool:
    """Connection errors and timeouts, a server error (5xx), or "slow down" (429, 503 with Retry-After)."""
    if isinstance(exc, httpx.TransportError):
        return True
    if isinstance(exc, ServerError):
        return exc.status >= 500 or exc.status == 429
    return False


def wait(exc: BaseException, attempt: int, seconds_left: float, draw: float) -> float | None:
    """Seconds to wait before trying again after the ``attempt``-th failure (1 for the first), or None to
    give up: the failure is permanent, or the wait would end too close to the deadline ``seconds_left``
    away. ``draw`` in [0, 1) is the jitter: the wait is between half and all of the exponential backoff,
    and never shorter than the server's ``Retry-After``."""
    if not transient(exc):
        return None
    backoff = min(MAX_WAIT_S, FIRST_WAIT_S * 2 ** (attempt - 1))
    seconds = backoff * (0.5 + 0.5 * draw)
    if isinstance(exc, ServerError) and exc.retry_after is not None:
        seconds = max(seconds, exc.retry_after)
    if seconds > seconds_left - DEADLINE_MARGIN_S:
        return None
    return seconds
