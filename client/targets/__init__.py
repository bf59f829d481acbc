"""Where a round's training can run: the device's own warm pool (``device``) or a cloud executor over
HTTPS (``executor``). ``client.round`` plays a round on whichever the placement names, through ``Target``
alone, so another kind of executor is one more module here.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

from fedge.client.policy import Placement
from fedge.client.predictor import Run
from fedge.edge_functions.runtime import Invocation
from fedge.transport import ServerError
from fedge.wire import RoundInfo, TrainConfig

Point = tuple[int, float]  # (steps, seconds) of one timed run


@dataclass(frozen=True)
class Trained:
    """What a target did with a round: ``run`` is what the predictor learns (None: nothing to learn);
    ``job_bytes`` what an offload uploaded (the next one's shard), 0 on the device."""

    run: Run | None
    accepted: bool = True  # the server took the update
    raw_bytes: int = 0  # the device's raw examples that left it (sealed to an executor)
    job_bytes: int = 0
    invocation: Invocation | None = None  # a run on the device's own worker
    refused: str | None = None  # the server's error code, when it refused the update


class TargetFailed(Exception):
    """The target did not train the round (unreachable, refused, failed, too slow): the device takes over.
    ``refusal``: the server's own refusal, when that is why (an executor relays it)."""

    def __init__(self, detail: str, refusal: ServerError | None = None) -> None:
        super().__init__(detail)
        self.refusal = refusal


class Target(Protocol):
    @property
    def id(self) -> str:
        """Its name in placements and in the predictor's lines."""
        ...

    def calibrate(self, task: str, config: TrainConfig) -> tuple[Point, Point]:
        """Two timed runs: the line a first placement rests on. Raises ``TargetFailed``."""
        ...

    def train(self, info: RoundInfo, placement: Placement) -> Trained:
        """Train ``info``'s round as ``placement`` says; raises ``TargetFailed`` when it could not."""
        ...
