"""What the simulation emulates around the production functions: slow devices, attackers, stragglers.

The events here are the production ones plus what is emulated; the warm pool's workers run them by name
(``EMULATED_TRAIN``, ``EMULATED_CALIBRATE``: ``fedge.sim.worker``, which wraps the production functions).
This module imports no torch, so the simulation's orchestrating process can build the events.
"""

from __future__ import annotations

import time

from pydantic import BaseModel, Field

from fedge.edge_functions.events import CalibrateEvent, TrainEvent
from fedge.wire import seconds_until

EMULATED_TRAIN = "fedge.sim.worker:train"
EMULATED_CALIBRATE = "fedge.sim.worker:calibrate"


class AttackSpec(BaseModel):
    """This client is malicious and poisons its update (``attacks.poison``)."""

    kind: str
    scale: float = 4.0


class SlowDevice(BaseModel):
    """Make this machine behave like a slower device (``fedge simulate --profile``). The function really
    waits, so whoever times it (the predictor, the deadline) sees the device's time."""

    slowdown: float = Field(1.0, ge=1.0)  # its own work (data, model, training) takes this many times as long
    bandwidth: float | None = Field(None, gt=0)  # bytes per second of its link; None: as fast as it is
    deadline: float | None = None  # Unix time its round closes: it stops waiting there, as its agent would

    def computed(self, seconds: float) -> float:
        """Wait as long as ``seconds`` of work take this device beyond this machine, but not past the
        deadline; returns the seconds it would still have needed (0: it made it). Stopping at the deadline
        keeps a late device in step with the next round instead of running it alone, and so too fast."""
        extra = (self.slowdown - 1.0) * seconds
        room = max(0.0, seconds_until(self.deadline, time.time()))
        time.sleep(min(extra, room))
        return max(0.0, extra - room)

    def transferred(self, size: int) -> None:
        if self.bandwidth is not None:
            time.sleep(size / self.bandwidth)


class EmulatedTrainEvent(TrainEvent):
    attack: AttackSpec | None = None
    delay: float = 0.0  # a straggler's extra seconds before it sends its update
    device: SlowDevice = SlowDevice()


class EmulatedCalibrateEvent(CalibrateEvent):
    device: SlowDevice = SlowDevice()
