"""Where a round's training runs: on the device, on a cloud executor, with fewer steps, or not at all.

A pure function of what the predictor and the capacity probe say, so tests drive it with tables. The owner's
setting bounds it: ``never`` (the default) keeps raw data on the device whatever happens; ``when-short``
sends it (encrypted, under a one-round grant) only when the device cannot make the deadline; ``always``
prefers the cheapest executor that fits.

Fewer local steps keep the aggregate correct by weighting: an update trained for ``s`` of the round's
``S`` steps reports ``num_examples * s / S`` examples, the examples its gradient steps actually consumed,
so under sample-weighted FedAvg a partial update counts for the work in it and a round of full updates is
plain FedAvg unchanged.

When an offload fails (the executor is unreachable, refuses, errs, or is still at work when the device
would have to start to make the deadline itself: ``offload_wait``), ``on_device`` decides again with the
time left, as if no executor had been allowed; the caller leaves that executor out of its next decisions,
so one broken executor does not cost every round a failed attempt first.

A per-round budget (``max_cost``, in the currency of the price table, ``fedge.pricing``) bounds what a
placement may cost: executors over it are not taken, and a device whose own round would cost more than it
trains fewer steps, or skips the round. Within the deadline and the budget the cheapest executor wins.

Hysteresis: once a client offloads, it comes back to the device only when the device's prediction is
below ``(1 - band)`` of the deadline, so a prediction hovering at the deadline does not flip the placement
every round (and re-ship the shard every other one).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from enum import StrEnum
from typing import Final

EDGE: Final = "edge"  # the device's own target: its line in the predictor, a placement's target on it


class OffloadSetting(StrEnum):
    NEVER = "never"
    WHEN_SHORT = "when-short"
    ALWAYS = "always"


class Kind(StrEnum):
    EDGE = "edge"
    OFFLOAD = "offload"
    FEWER_STEPS = "fewer-steps"
    SKIP = "skip"


@dataclass(frozen=True)
class Cost:
    """A target's predicted seconds for a round: ``fixed_s`` (start-up, transfers, margin) plus
    ``per_step_s`` for each local step; its predicted price: ``price`` per round (an invocation, the bytes
    moved) plus ``price_per_s`` for each second it runs (memory- and GPU-seconds)."""

    target: str
    fixed_s: float
    per_step_s: float
    price: float = 0.0
    fits_memory: bool = True
    price_per_s: float = 0.0

    def seconds(self, steps: int) -> float:
        return self.fixed_s + self.per_step_s * steps

    def price_of(self, steps: int) -> float:
        return self.price + self.price_per_s * self.seconds(steps)


@dataclass(frozen=True)
class Situation:
    setting: OffloadSetting
    deadline_s: float  # seconds left until the round closes
    steps: int  # local steps the round asks for
    edge: Cost
    executors: tuple[Cost, ...] = ()
    min_steps: int = 1  # fewer steps than this are not worth sending
    previous: Placement | None = None  # last round's placement, for hysteresis
    band: float = 0.2
    max_cost: float = math.inf  # the owner's budget for one round (``--max-cost``)


@dataclass(frozen=True)
class Placement:
    kind: Kind
    target: str | None
    steps: int
    weight: float  # multiplies the update's num_examples
    reason: str
    prewarm: bool = False  # offload is likely next round: start the executor now
    wait_s: float = math.inf  # an offload: seconds to wait for the executor before the device takes over

    @property
    def offloaded(self) -> bool:
        return self.kind is Kind.OFFLOAD


def place(s: Situation) -> Placement:
    """The placement for one round; see the module docstring for the order of preference."""
    edge_s = s.edge.seconds(s.steps)
    edge_fits = s.edge.fits_memory and edge_s <= s.deadline_s and s.edge.price_of(s.steps) <= s.max_cost
    near = edge_s > (1 - s.band) * s.deadline_s
    executor = None if s.setting is OffloadSetting.NEVER else _cheapest_fitting(s)
    prewarm = s.setting is not OffloadSetting.NEVER and bool(s.executors) and (near or not edge_fits)

    if executor is not None:
        stay = s.previous is not None and s.previous.kind is Kind.OFFLOAD and near
        if s.setting is OffloadSetting.ALWAYS or not edge_fits or stay:
            why = "owner prefers offload" if s.setting is OffloadSetting.ALWAYS else (
                "edge misses deadline, memory or budget" if not edge_fits else "hysteresis: edge too close"
            )  # fmt: skip
            wait = offload_wait(s.deadline_s, s.edge, executor, s.steps)
            return Placement(Kind.OFFLOAD, executor.target, s.steps, 1.0, why, prewarm, wait)
    return on_device(s, prewarm)


def on_device(s: Situation, prewarm: bool = False) -> Placement:
    """The best the device can do alone: all steps, fewer, or skip. ``place``'s answer when no executor is
    taken, and the agent's fallback when an offload failed (``s.deadline_s`` then the time still left)."""
    affordable = s.edge.price_of(s.steps) <= s.max_cost
    if s.edge.fits_memory and s.edge.seconds(s.steps) <= s.deadline_s and affordable:
        return Placement(Kind.EDGE, s.edge.target, s.steps, 1.0, "edge fits", prewarm)
    in_time = fewer_steps(s.edge, s.deadline_s, s.steps)
    steps = min(in_time, steps_within_budget(s.edge, s.max_cost, s.steps))
    what = "the deadline" if steps == in_time else "the budget"
    if s.edge.fits_memory and steps >= s.min_steps:
        reason = f"{steps} of {s.steps} steps fit {what}"
        return Placement(Kind.FEWER_STEPS, s.edge.target, steps, steps / s.steps, reason, prewarm)
    reason = "out of memory" if not s.edge.fits_memory else f"not even the fewest steps fit {what}"
    return Placement(Kind.SKIP, None, 0, 0.0, reason, prewarm)


def steps_within_budget(target: Cost, max_cost: float, steps: int) -> int:
    """The most local steps (at most ``steps``) whose predicted price stays within ``max_cost``; 0 if none."""
    if target.price_of(steps) <= max_cost:
        return steps
    per_step = target.price_per_s * target.per_step_s
    if per_step <= 0:
        return 0
    return max(0, min(steps, math.floor((max_cost - target.price_of(0)) / per_step)))


def offload_wait(deadline_s: float, edge: Cost, executor: Cost, steps: int) -> float:
    """How long to wait for the executor: the whole time left, unless the device alone would also make the
    deadline and the executor's prediction leaves room for it; then only until the device must start, so a
    hung executor still leaves time to train the round here."""
    reserve = deadline_s - edge.seconds(steps)
    return reserve if edge.fits_memory and reserve >= executor.seconds(steps) else deadline_s


def fastest(s: Situation) -> Placement:
    """STOIC's rule, kept as a baseline: the target with the lowest predicted time, whatever the owner set
    and whatever it costs. It knows nothing of privacy: raw data leaves any device the cloud is faster for."""
    candidates = [c for c in (s.edge, *s.executors) if c.fits_memory]
    if not candidates:
        return Placement(Kind.SKIP, None, 0, 0.0, "out of memory everywhere")
    best = min(candidates, key=lambda c: c.seconds(s.steps))
    kind = Kind.EDGE if best is s.edge else Kind.OFFLOAD
    return Placement(kind, best.target, s.steps, 1.0, "lowest predicted time")


def fewer_steps(edge: Cost, deadline_s: float, steps: int) -> int:
    """The most local steps (at most ``steps``) the device finishes before the deadline; 0 if none."""
    if edge.per_step_s <= 0:
        return steps if edge.fixed_s <= deadline_s else 0
    return max(0, min(steps, math.floor((deadline_s - edge.fixed_s) / edge.per_step_s)))


def _cheapest_fitting(s: Situation) -> Cost | None:
    fitting = [
        e for e in s.executors
        if e.fits_memory and e.seconds(s.steps) <= s.deadline_s and e.price_of(s.steps) <= s.max_cost
    ]  # fmt: skip
    return min(fitting, key=lambda e: (e.price_of(s.steps), e.seconds(s.steps)), default=None)
