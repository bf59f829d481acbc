"""When a round closes and who takes part in it: pure decisions, applied by ``Federation`` (rounds.py)."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from enum import Enum

import numpy as np


class Action(Enum):
    WAIT = "wait"
    AGGREGATE = "aggregate"
    FAIL = "fail"


def decide(
    updates: int, selected: int, min_updates: int, now: float, deadline: float, skipped: int = 0
) -> Action:
    """Close a round as soon as every selected client has reported, or at the deadline with a quorum.

    A skip notice is a report: once every selected client has sent an update or skipped, nothing is left to
    wait for, so the round closes then, aggregating with a quorum of updates and failing without one."""
    if updates >= selected:
        return Action.AGGREGATE
    if updates + skipped < selected and now < deadline:
        return Action.WAIT
    return Action.AGGREGATE if updates >= max(min_updates, 1) else Action.FAIL


def select(clients: Sequence[str], round_: int, fraction: float, minimum: int, seed: int) -> list[str]:
    """Flower's sample size of the live ``clients``, ``max(ceil(fraction * n), minimum)``, drawn at random
    but reproducibly per round and set of clients. ``clients`` come sorted (``live``, ``Trust.eligible``):
    the draw picks positions in them, so it costs what it picks, not what it passes over."""
    size = min(len(clients), max(math.ceil(fraction * len(clients)), minimum))
    rng = np.random.default_rng([seed, round_])
    return sorted(clients[int(i)] for i in rng.choice(len(clients), size=size, replace=False))


def live(last_seen: Mapping[str, float], now: float, window: float) -> list[str]:
    """Who may be selected at ``now``: the clients seen within the last ``window`` seconds, sorted. A
    sighting stamped after ``now`` (another thread's clock read) counts as seen now."""
    return sorted(client for client, at in last_seen.items() if now - at <= window)
