"""What the simulation's workers run by name: the production ``train`` and ``calibrate``, with hooks that
make this machine behave like the emulated device (``fedge.sim.emulation``)."""

from __future__ import annotations

import time

import numpy as np

from fedge.codec import Tensors
from fedge.edge_functions import functions
from fedge.edge_functions.events import CalibrateResult, DataSpec, TrainResult
from fedge.sim import attacks
from fedge.sim.emulation import EmulatedCalibrateEvent, EmulatedTrainEvent


class _Emulation(functions.Hooks):
    """The production run's hooks for one emulated device; ``overrun`` is what it still needed at the
    deadline (0: it made it)."""

    def __init__(self, ev: EmulatedTrainEvent) -> None:
        self.ev = ev
        self.overrun = 0.0

    def downloaded(self, size: int) -> None:
        self.ev.device.transferred(size)

    def trained(self, tensors: Tensors, base: Tensors) -> Tensors:
        ev = self.ev
        if ev.attack is None or not isinstance(ev.data, DataSpec):
            return tensors
        rng = np.random.default_rng([ev.data.seed, ev.round, ev.data.index])
        return attacks.poison(ev.attack.kind, tensors, base, ev.attack.scale, rng)

    def ready(self, work_seconds: float, size: int) -> bool:
        self.overrun = self.ev.device.computed(work_seconds)
        time.sleep(self.ev.delay)
        if self.overrun > 0:
            return False
        if self.ev.outbox is None:
            self.ev.device.transferred(size)
        return True

    def billed(self, seconds: float) -> float:
        return seconds * self.ev.device.slowdown


def train(event: dict, context: functions.Context) -> dict:
    """The production ``train``, as the emulated device runs it: ``seconds`` is what it took, or would
    have, on the device; a device past its deadline holds its update back (``staleness`` None), since the
    server would refuse it."""
    emulation = _Emulation(EmulatedTrainEvent.model_validate(event))
    done = TrainResult.model_validate(functions.train(event, context, emulation))
    return done.model_copy(update={"seconds": done.seconds + emulation.overrun}).model_dump()


def calibrate(event: dict, context: functions.Context) -> dict:
    """The production ``calibrate``, each timed run slowed to the device's pace."""
    ev = EmulatedCalibrateEvent.model_validate(event)
    measured = CalibrateResult.model_validate(functions.calibrate(event, context))
    for _, seconds in measured.points:
        ev.device.computed(seconds)  # no deadline here: the device waits in full
    (small, small_s), (large, large_s) = measured.points
    slowdown = ev.device.slowdown
    points = ((small, small_s * slowdown), (large, large_s * slowdown))
    return CalibrateResult(points=points).model_dump()
