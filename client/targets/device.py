"""The device itself as a target: its own warm pool runs the ``train`` function on its own data."""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass

from fedge.client.policy import EDGE, Kind, Placement
from fedge.client.predictor import Run
from fedge.client.targets import Point, Trained
from fedge.edge_functions.events import CalibrateEvent, CalibrateResult, TrainEvent, TrainResult
from fedge.edge_functions.runtime import WarmPool
from fedge.wire import RoundInfo, TrainConfig


def _not_uploaded(_round: int) -> tuple[int, float] | None:
    return None


@dataclass(frozen=True)
class DeviceTarget:
    """``train_event`` and ``calibrate_event`` say what the device's functions get; ``upload`` sends an
    update the function left in the outbox and returns its (bytes, seconds), None when it sent none (the
    function posted it, or nothing was sent). ``functions`` names the pool's train and calibrate (a
    simulation's emulated ones); ``stop_at_deadline`` kills a run still going at the deadline (an
    emulated device stops there itself)."""

    pool: WarmPool
    train_event: Callable[[RoundInfo], TrainEvent]
    calibrate_event: Callable[[str, TrainConfig], CalibrateEvent]
    upload: Callable[[int], tuple[int, float] | None] = _not_uploaded
    functions: tuple[str, str] = ("train", "calibrate")
    stop_at_deadline: bool = True
    calibrate_s: float | None = None
    id: str = EDGE

    def calibrate(self, task: str, config: TrainConfig) -> tuple[Point, Point]:
        event = self.calibrate_event(task, config)
        invocation = self.pool.invoke(self.functions[1], event, self.calibrate_s).result()
        return CalibrateResult.model_validate(invocation.result).points

    def train(self, info: RoundInfo, placement: Placement) -> Trained:
        """Its errors (a worker crashed or hung, the server refused) are the caller's: there is no
        cheaper target to fall back to."""
        cut = placement.steps if placement.kind is Kind.FEWER_STEPS else None
        event = self.train_event(info).model_copy(update={"max_steps": cut, "weight": placement.weight})
        left = info.seconds_left(time.time())
        timeout = max(1.0, left) if self.stop_at_deadline and math.isfinite(left) else None
        invocation = self.pool.invoke(self.functions[0], event, timeout).result()
        done = TrainResult.model_validate(invocation.result)
        uploaded = self.upload(info.round)
        bytes_up, upload_s = uploaded or (0, 0.0)
        compute = done.seconds - done.download_seconds  # a late device: what it would have taken
        run = Run(
            placement.steps, compute, invocation.startup_seconds, done.bytes_down, done.download_seconds,
            bytes_up, upload_s,
        )  # fmt: skip
        accepted = done.staleness is not None or uploaded is not None
        return Trained(run, accepted, invocation=invocation)
