"""Wakes long polls when the round changes, without holding a thread per waiting client."""

from __future__ import annotations

import asyncio
import contextlib
import time
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from fedge.server.rounds import Federation
    from fedge.wire import RoundInfo

MAX_WAIT = 60.0  # the longest a long poll may ask to wait


class ChangeFeed:
    def __init__(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._changed = asyncio.Event()

    def notify_threadsafe(self) -> None:
        """Called from whichever thread changed the round."""
        self._loop.call_soon_threadsafe(self._wake)

    def _wake(self) -> None:
        self._changed.set()
        self._changed = asyncio.Event()

    async def wait(self, timeout: float) -> None:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._changed.wait(), timeout)


async def next_round(federation: Federation, feed: ChangeFeed, etag: str | None, wait: float) -> RoundInfo:
    """The current round; while its ETag is still ``etag``, wait up to ``wait`` seconds for it to change
    (the long poll of ``GET /v1/rounds/current`` and of the admin overview)."""
    give_up = time.monotonic() + wait
    info = federation.round_info()
    while info.etag == etag and (left := give_up - time.monotonic()) > 0:
        await feed.wait(left)
        info = federation.round_info()
    return info
