"""What the aggregation service lets one caller take: each route's body cap and the public routes' rates.

The connection-level bounds (timeouts, connection counts, framing) are ``security.http_limits``, shared with
the executor; this module holds the server's own policy. An update may weigh what the current model weighs
plus its metadata, every other body is a small JSON. ``/v1/enroll`` and ``/v1/ca`` answer anyone without a
certificate, so each source address gets a token bucket there: a burst, then a steady rate, and a 429 with
Retry-After beyond it.
"""

from __future__ import annotations

import math
import re
import time
from collections.abc import Callable
from dataclasses import dataclass

from uvicorn._types import ASGI3Application, ASGIReceiveCallable, ASGISendCallable, Scope

from fedge.security.http_limits import BodyCap, BodyCaps
from fedge.server.errors import Rejected, response

UPDATE_OVERHEAD = 64 * 1024  # safetensors header and metadata beyond the tensors' bytes
SMALL_BODY = 64 * 1024  # enrollment (a CSR of at most 16 KiB), admin, skip notices
_UPDATES = re.compile(r"/v1/rounds/[^/]+/updates")


def body_caps(model_size: Callable[[], int]) -> BodyCaps:
    """Each route's cap; the update route's follows the current model, so it fits any legitimate update
    of whatever model the federation trains (a compressed one is smaller still)."""

    def cap(method: str, path: str) -> BodyCap:
        if method == "POST" and _UPDATES.fullmatch(path):
            return BodyCap(model_size() + UPDATE_OVERHEAD, "update_too_large")
        return BodyCap(SMALL_BODY)

    return cap


@dataclass(frozen=True)
class Rate:
    burst: float
    per_second: float


# A fleet enrolls once per device and fetches the CA once per enrollment: generous for that, costly to flood.
PUBLIC_RATES = {"/v1/enroll": Rate(burst=20, per_second=0.5), "/v1/ca": Rate(burst=60, per_second=2.0)}


class TokenBuckets:
    """One token bucket per key; remembers at most ``max_keys`` keys (the least recently seen go first, and
    a forgotten key starts full, which only ever favours the caller)."""

    def __init__(self, rate: Rate, max_keys: int = 10_000) -> None:
        self.rate = rate
        self.max_keys = max_keys
        self._buckets: dict[str, tuple[float, float]] = {}

    def wait(self, key: str, now: float) -> float:
        """0 when ``key`` may go now (its token is taken), else the seconds until it may."""
        tokens, then = self._buckets.pop(key, (self.rate.burst, now))
        tokens = min(self.rate.burst, tokens + (now - then) * self.rate.per_second)
        allowed = tokens >= 1
        self._buckets[key] = (tokens - 1 if allowed else tokens, now)
        if len(self._buckets) > self.max_keys:
            del self._buckets[next(iter(self._buckets))]
        return 0.0 if allowed else (1 - tokens) / self.rate.per_second


class PublicRateLimit:
    """ASGI middleware: ``PUBLIC_RATES`` per source address, before any route work."""

    def __init__(self, app: ASGI3Application, rates: dict[str, Rate] = PUBLIC_RATES) -> None:
        self.app = app
        self.buckets = {path: TokenBuckets(rate) for path, rate in rates.items()}

    async def __call__(self, scope: Scope, receive: ASGIReceiveCallable, send: ASGISendCallable) -> None:
        buckets = self.buckets.get(scope["path"]) if scope["type"] == "http" else None
        if buckets is not None:
            client = scope.get("client")
            wait = buckets.wait(client[0] if client else "", time.monotonic())
            if wait > 0:
                refusal = response(Rejected("rate_limited", f"too many requests to {scope['path']}"))
                refusal.headers["Retry-After"] = str(math.ceil(wait))
                await refusal(scope, receive, send)  # type: ignore[arg-type]
                return
        await self.app(scope, receive, send)
