"""Wakes long polls when the round changes, without holding a thread per waiting client."""

from __future__ import annotations

import asyncio
import contextlib


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
