"""The JSON side of the v1 wire contract (design.md); tensors travel as safetensors (codec.py)."""

from __future__ import annotations

import math
from enum import StrEnum

from pydantic import BaseModel, Field


def rounds_topic(federation: str) -> str:
    """Round announcements: QoS 1, retained, written by the aggregation server only."""
    return f"fedge/{federation}/rounds"


def status_topic(federation: str, client: str) -> str:
    """One client's status (``+`` for all of them): written by that client only."""
    return f"fedge/{federation}/clients/{client}/status"


class RoundState(StrEnum):
    WAITING = "waiting"  # no round yet: too few clients registered
    OPEN = "open"  # accepting updates from the selected clients
    FINISHED = "finished"  # the federation ran all its rounds


class TrainConfig(BaseModel):
    """Hyper-parameters the server hands each client for a round, as Flower's ``on_fit_config`` does."""

    local_epochs: int = Field(1, ge=0)  # 0: send the model back untrained (measures framework overhead)
    batch_size: int = Field(32, ge=1)
    learning_rate: float = Field(0.05, gt=0)
    proximal_mu: float = Field(0.0, ge=0, description="FedProx: weight of mu/2 * ||w - w_global||^2")


class RoundInfo(BaseModel):
    round: int
    state: RoundState
    deadline: float | None = Field(None, description="Unix time after which updates are refused")
    model_sha256: str
    task: str
    selected: list[str] = []
    config: TrainConfig = TrainConfig()

    @property
    def etag(self) -> str:
        return f'"{self.round}-{self.state}"'

    def seconds_left(self, now: float) -> float:
        """Seconds until the deadline at Unix time ``now`` (negative once past); infinite without one.
        The one place deadline arithmetic lives: whoever needs a finite bound caps this itself."""
        return math.inf if self.deadline is None else self.deadline - now


class ModelMeta(BaseModel):
    round: int
    sha256: str
    task: str
    tensors: dict[str, tuple[str, list[int]]]


class UpdateReceipt(BaseModel):
    round: int
    client: str
    sha256: str
    num_examples: int
    staleness: int = Field(0, description="asynchronous mode: versions the update's base is behind")


class SkipNotice(BaseModel):
    """A selected client telling the server early that it sends no update this round, so that the round
    need not wait for it until the deadline."""

    reason: str = Field(min_length=1, max_length=200, description="why, e.g. out of memory")


class SkipReceipt(BaseModel):
    round: int
    client: str
    reason: str


class ErrorBody(BaseModel):
    error: str = Field(description="stable machine-readable code")
    detail: str


# Metadata keys inside an update's safetensors body.
NUM_EXAMPLES = "num_examples"
TRAIN_LOSS = "train_loss"
BASE_SHA256 = "base_sha256"  # the global model the update was trained from (asynchronous mode)
