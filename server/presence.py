"""Who is around: when each client last showed a certificate that counts, so selection picks the live.

A device is seen when it makes any request the certificate gate lets through (server.identity) or publishes
its status on its MQTT topic, which only its own certificate may write (server.announce). An agent asks the
server for the current round at least once a minute even while MQTT brings the announcements, so a device
that runs is seen well within the default window; one that said it stopped is forgotten at once.
"""

from __future__ import annotations

import threading

from fedge.server.schedule import live


class Presence:
    """Last sighting per client, kept only while it may still count: selection costs what the live cost."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._seen: dict[str, float] = {}

    def seen(self, client: str, at: float) -> None:
        with self._lock:
            self._seen[client] = max(at, self._seen.get(client, at))

    def gone(self, client: str, at: float) -> None:
        """``client`` said at ``at`` that it stopped: forgotten, unless it was seen again since."""
        with self._lock:
            if self._seen.get(client, at) <= at:
                self._seen.pop(client, None)

    def live(self, now: float, window: float) -> list[str]:
        """The clients seen within ``window`` seconds of ``now``, sorted; older sightings are dropped."""
        with self._lock:
            for client in [c for c, t in self._seen.items() if now - t > window]:
                del self._seen[client]
            return live(self._seen, now, window)

    def sightings(self) -> dict[str, float]:
        """When each client still remembered was last seen (for operators' views; selection uses ``live``)."""
        with self._lock:
            return dict(self._seen)

    def seen_within(self, now: float, window: float) -> int:
        """How many clients were seen within ``window`` seconds of ``now``; drops nothing (a window shorter
        than selection's must not make selection forget a client)."""
        with self._lock:
            return len(live(self._seen, now, window))
