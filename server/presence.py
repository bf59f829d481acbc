"""Who is around: when each client last showed a certificate that counts, so selection picks the live.

A device is seen when it makes any request the certificate gate lets through (server.identity) or publishes
its status on its MQTT topic, which only its own certificate may write (server.announce). An agent asks the
server for the current round at least once a minute even while MQTT brings the announcements, so a device
that runs is seen well within the default window; one that said it stopped is forgotten at once.

Each client seen has one entry in a heap by the time it was entered with; when that entry falls out of the
window, the client's latest sighting decides: forgotten, or entered again with it. So a round costs the
entries that came due (each client at most once per window), sightings arriving out of order (a retained
MQTT status) cost nothing more, and selection (``server.roster``) hears only who arrived and who left since
it last asked, never a scan of everyone seen.

Replicas of one server share their sightings through the store (``PresenceExchange``): each publishes whom
it saw since the last exchange and hears whom the others saw, so that whichever replica opens a round
selects from every live client, not only from those whose connections the load balancer gave it.
"""

from __future__ import annotations

import heapq
import threading
from typing import TYPE_CHECKING

from fedge.server.schedule import live

if TYPE_CHECKING:
    from fedge.server.store import Store


class Presence:
    """Last sighting per client, kept only while it may still count: selection costs what the live cost."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._seen: dict[str, float] = {}
        self._due: list[tuple[float, str]] = []  # (a sighting of the client, the client)
        self._entry: dict[str, float] = {}  # each live client's one current entry in _due
        self._arrived: set[str] = set()
        self._left: set[str] = set()
        self._shared = False  # replicas exchange sightings (PresenceExchange): keep what to publish
        self._fresh: dict[str, float] = {}  # sightings made here since the last exchange with replicas

    def seen(self, client: str, at: float) -> None:
        with self._lock:
            if self._shared and at > self._fresh.get(client, 0.0):
                self._fresh[client] = at
            self._see(client, at)

    def heard(self, client: str, at: float) -> None:
        """Another replica saw ``client`` at ``at`` (``PresenceExchange``): counted, not published again."""
        with self._lock:
            self._see(client, at)

    def share(self) -> None:
        """From now on, keep the sightings made here for ``fresh``: a single server, which shares them with
        no one, keeps none."""
        with self._lock:
            self._shared = True

    def fresh(self) -> dict[str, float]:
        """The sightings made here since the last call (or since ``share``): what the next exchange
        publishes."""
        with self._lock:
            fresh, self._fresh = self._fresh, {}
            return fresh

    def _see(self, client: str, at: float) -> None:
        last = self._seen.get(client)
        if last is None:
            self._seen[client] = at
            self._enter(client, at)
            self._arrived.add(client)
            self._left.discard(client)
        elif at > last:
            self._seen[client] = at

    def gone(self, client: str, at: float) -> None:
        """``client`` said at ``at`` that it stopped: forgotten, unless it was seen again since."""
        with self._lock:
            if client in self._seen and self._seen[client] <= at:
                self._forget(client)

    def live(self, now: float, window: float) -> list[str]:
        """The clients seen within ``window`` seconds of ``now``, sorted; older sightings are dropped."""
        with self._lock:
            self._expire(now, window)
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

    def changes(self, now: float, window: float) -> tuple[set[str], set[str]]:
        """Who arrived and who left (stopped, or unseen within ``window`` of ``now``) since the last call."""
        with self._lock:
            self._expire(now, window)
            arrived, left = self._arrived, self._left
            self._arrived, self._left = set(), set()
            return arrived, left

    def _expire(self, now: float, window: float) -> None:
        while self._due and now - self._due[0][0] > window:
            entered, client = heapq.heappop(self._due)
            if self._entry.get(client) != entered:  # an entry of a client forgotten since: skipped
                continue
            last = self._seen[client]
            if now - last > window:
                self._forget(client)
            else:
                self._enter(client, last)

    def _enter(self, client: str, at: float) -> None:
        self._entry[client] = at
        heapq.heappush(self._due, (at, client))

    def _forget(self, client: str) -> None:
        del self._seen[client]
        del self._entry[client]
        self._left.add(client)
        self._arrived.discard(client)


class PresenceExchange:
    """One replica's side of sharing presence through the store: its own connection, since it runs on the
    round clock beside the rounds, and the stamp of the last sighting it heard."""

    def __init__(self, presence: Presence, store: Store) -> None:
        presence.share()
        self._presence = presence
        self._store = store
        self._heard = 0

    def exchange(self) -> None:
        heard, self._heard = self._store.share_sightings(self._presence.fresh(), self._heard)
        for client, at in heard:
            self._presence.heard(client, at)
