"""The clients selection may pick, kept up to date by what changes instead of recomputed every round.

Asking "who holds a certificate that counts" of every registered client each round costs a file check per
client (or, with every enrolled client eligible, a certificate parse per client): at 10,000 registered
and 1,000 selected, nine tenths of that work is for clients the round does not pick. A ``Roster`` checks a
client once when it arrives, again only when something could have changed its answer (the revocation list
changed, or its certificate reaches its expiry), and keeps the ids sorted, so a round draws its sample
by index (``schedule.select``) at a cost that grows with the sample.
"""

from __future__ import annotations

import bisect
import datetime as dt
import heapq
import os
from collections.abc import Iterable
from pathlib import Path

from fedge.security.pki import Role
from fedge.security.revocation import NotStanding, Standing


class Roster:
    """Sorted ids of ``role`` whose certificate counts, among those ``admit`` was told of."""

    def __init__(self, standing: Standing, role: Role = Role.CLIENT) -> None:
        self._standing = standing
        self._role = role
        self._ids: list[str] = []
        self._expiry: list[tuple[float, str]] = []  # (the certificate's not-after, id), soonest first
        self._snapshot: list[str] = []  # replaced on change, never mutated: safe to hand out
        self._revocations = standing.revocations.version()
        self.checks = 0  # standing checks made so far: the work the roster costs

    def update(self, arrived: Iterable[str], left: Iterable[str], now: float) -> list[str]:
        """Apply who arrived and who left, recheck what may have changed, and return the sorted ids."""
        changed = False
        for client in left:
            changed |= self._remove(client)
        for client in arrived:
            changed |= self._admit(client, now)
        version = self._standing.revocations.version()
        if version != self._revocations:  # a revocation may touch anyone: everyone once, on change only
            self._revocations = version
            for client in list(self._ids):
                changed |= self._recheck(client, now)
        while self._expiry and self._expiry[0][0] < now:
            _, client = heapq.heappop(self._expiry)
            changed |= self._recheck(client, now)
        if changed:
            self._snapshot = list(self._ids)
        return self._snapshot

    def _recheck(self, client: str, now: float) -> bool:
        if not self._holds(client):
            return False
        not_after = self._counts_until(client, now)
        if not_after is None:
            return self._remove(client)
        heapq.heappush(self._expiry, (not_after, client))
        return False

    def _admit(self, client: str, now: float) -> bool:
        not_after = self._counts_until(client, now)
        if not_after is None:
            return self._remove(client)
        heapq.heappush(self._expiry, (not_after, client))
        at = bisect.bisect_left(self._ids, client)
        if at < len(self._ids) and self._ids[at] == client:
            return False
        self._ids.insert(at, client)
        return True

    def _remove(self, client: str) -> bool:
        at = bisect.bisect_left(self._ids, client)
        if at < len(self._ids) and self._ids[at] == client:
            del self._ids[at]
            return True
        return False

    def _holds(self, client: str) -> bool:
        at = bisect.bisect_left(self._ids, client)
        return at < len(self._ids) and self._ids[at] == client

    def _counts_until(self, client: str, now: float) -> float | None:
        """When ``client``'s certificate stops counting by expiry; None when it does not count now."""
        self.checks += 1
        cert = self._standing.current.certificate_of(self._role, client)
        if cert is None:
            return None
        try:
            identity = self._standing.check(cert, dt.datetime.fromtimestamp(now, dt.UTC))
        except NotStanding:
            return None
        return cert.not_valid_after_utc.timestamp() if identity.role is self._role else None


class IssuedIds:
    """Who holds a certificate of ``role`` in a PKI directory, as changes: the directory is listed again only
    when it changed (issuing, enrolling, renewing or removing an id renames a file in it)."""

    def __init__(self, pki_dir: Path, role: Role = Role.CLIENT) -> None:
        self._dir = pki_dir / role
        self._stamp: int | None = None
        self._known: set[str] = set()

    def changes(self) -> tuple[set[str], set[str]]:
        try:
            stamp = self._dir.stat().st_mtime_ns
        except FileNotFoundError:
            stamp = 0
        if stamp == self._stamp:
            return set(), set()
        self._stamp = stamp
        names = {n[:-4] for n in os.listdir(self._dir) if n.endswith(".pem")} if stamp else set()
        arrived, left = names - self._known, self._known - names
        self._known = names
        return arrived, left
