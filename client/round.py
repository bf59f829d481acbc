"""One device's round, as the agent and the simulation's fleet both play it: the placement decides, then
the round is skipped, offloaded or trained on the device; an offload that fails falls back to what the
device can still do before the deadline; every run's actual times go to the planner beside its predicted
ones.

What differs between an agent and a simulated device reaches here only through what it passes: its
targets (a simulation's device is slowed, its executor's link too), ``skip`` (how the server is told),
``placed`` (what the caller shows or counts before each attempt: the placement, where it is counted, and
why an offload fell back, if it did) and ``retrying`` (how it waits out a transient failure of the server).
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TypeVar

from fedge.client import retry
from fedge.client.planner import Placer
from fedge.client.policy import EDGE, Kind, Placement
from fedge.client.targets import Target, TargetFailed, Trained
from fedge.wire import RoundInfo, seconds_until

T = TypeVar("T")
_JITTER = random.SystemRandom()  # seeded by nobody: two devices never draw the same waits


def _sleep(seconds: float) -> bool:
    time.sleep(seconds)
    return False


def _quiet(_exc: BaseException, _seconds: float) -> None:
    return None


@dataclass(frozen=True)
class Retrying:
    """The shell around ``retry.wait``: ``pause(seconds)`` waits and returns True when the caller is
    stopping (an agent's SIGTERM), which raises the last failure at once; ``retried`` hears each failure
    that will be tried again, with the wait before it."""

    pause: Callable[[float], bool] = _sleep
    retried: Callable[[BaseException, float], None] = _quiet

    def call(self, attempt: Callable[[], T], deadline: float | None) -> T:
        """``attempt()``, again after each transient failure until the round's ``deadline``; the failure
        that ends it (permanent, too close to the deadline, or the caller stopping) is raised."""
        failures = 0
        while True:
            try:
                return attempt()
            except Exception as exc:
                failures += 1
                seconds = retry.wait(exc, failures, seconds_until(deadline, time.time()), _JITTER.random())
                if seconds is None:
                    raise
                self.retried(exc, seconds)
                if self.pause(seconds):
                    raise


@dataclass(frozen=True)
class Played:
    """How the round went: ``where`` it ran (edge, fewer-steps, offload:ID, skip; fallback:KIND after a
    failed offload), under which ``placement`` (the fallback's, if any), and ``trained`` (None: skipped).
    ``fallback`` says why an offload failed and what the device did instead."""

    where: str
    placement: Placement
    trained: Trained | None = None
    fallback: str = ""


def where(placement: Placement) -> str:
    """The name a placement is counted by."""
    return f"offload:{placement.target}" if placement.offloaded else str(placement.kind)


def _nothing(_placement: Placement, _where: str, _fallback: str) -> None:
    return None


def play(
    info: RoundInfo,
    planner: Placer,
    targets: Mapping[str, Target],
    placement: Placement,
    examples: int,
    free: Callable[[], int],
    skip: Callable[[str], None],
    placed: Callable[[Placement, str, str], None] = _nothing,
    retrying: Retrying = Retrying(),
) -> Played:
    """Act on ``placement`` (``planner.decide``'s, or a simulation's oracle's): ``targets`` holds the device
    (``EDGE``) and each executor the owner allows; ``free`` the device's free memory now, for a fallback;
    ``skip`` tells the server, with the reason, that no update comes. The device's run is tried again on a
    transient failure (the model could not be fetched) until the deadline; its other failures are raised."""
    placed(placement, where(placement), "")
    if placement.kind is Kind.SKIP:
        skip(placement.reason)
        return Played(where(placement), placement)
    if not placement.offloaded:
        return Played(where(placement), placement, _run(info, planner, targets[EDGE], placement, retrying))
    assert placement.target is not None  # an offload placement always names its executor
    try:
        trained = targets[placement.target].train(info, placement)
    except TargetFailed as exc:
        return _fall_back(
            info, planner, targets, placement.target, examples, free(), skip, placed, retrying, exc
        )
    _learn(info, planner, placement.target, trained)
    return Played(where(placement), placement, trained)


def _fall_back(
    info: RoundInfo,
    planner: Placer,
    targets: Mapping[str, Target],
    failed: str,
    examples: int,
    free: int,
    skip: Callable[[str], None],
    placed: Callable[[Placement, str, str], None],
    retrying: Retrying,
    exc: TargetFailed,
) -> Played:
    """The executor did not train the round: the device does what it still can before the deadline, and
    the round is counted where it actually ran."""
    placement = planner.fallback(failed, info, examples, time.time(), free)
    why = f"round {info.round}: offload to {failed} failed ({exc}); device: {placement.reason}"
    counted = f"fallback:{placement.kind}"
    placed(placement, counted, why)
    if placement.kind is Kind.SKIP:
        skip(f"offload failed, then {placement.reason}")
        return Played(counted, placement, fallback=why)
    return Played(counted, placement, _run(info, planner, targets[EDGE], placement, retrying), why)


def _run(
    info: RoundInfo, planner: Placer, target: Target, placement: Placement, retrying: Retrying
) -> Trained:
    trained = retrying.call(lambda: target.train(info, placement), info.deadline)
    _learn(info, planner, target.id, trained)
    return trained


def _learn(info: RoundInfo, planner: Placer, target: str, trained: Trained) -> None:
    """The planner records what the run took beside what it predicted; an offload's job size is what
    the next one uploads."""
    if trained.run is not None:
        planner.observe(target, info.task, trained.run)
    if trained.job_bytes:
        planner.shard_bytes = trained.job_bytes
