"""What a client function is asked (its event) and what it answers, as typed models without torch; and
the cloud executor's requests and answers, which a client builds and reads.

The agent and the simulation build these and read the answers typed; the function validates the event it
gets and answers a plain dict of the result model. Between the warm pool and its own workers both travel
as dicts (``model_dump``), so nothing but JSON-shaped data crosses a process boundary.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, Field, field_validator

from fedge.security.pki import Credentials
from fedge.wire import EvaluationAsk, TrainConfig


class CredentialPaths(BaseModel):
    ca: Path
    cert: Path
    key: Path

    @classmethod
    def of(cls, creds: Credentials) -> CredentialPaths:
        return cls(ca=creds.ca, cert=creds.cert, key=creds.key)

    def get(self) -> Credentials:
        return Credentials(self.ca, self.cert, self.key)


class DataSpec(BaseModel):
    """Which share of a task's data this client holds (simulation); an agent points at its own files."""

    num_clients: int
    index: int
    partition: str = "iid"
    seed: int = 0
    split: Literal["train", "test"] = "train"  # test: its share of the held-out set, split evenly


class LocalData(BaseModel):
    """A device's own examples (``fedge.edge_functions.datafiles``): an ``.npz`` with arrays ``x`` and ``y``,
    a CSV (``label``: its label column, else the last) or a folder of class folders of images."""

    path: Path
    label: str | None = None


class AppData(BaseModel):
    """The app loads its own examples (its ``load_data``), as client ``index`` of ``num_clients``."""

    num_clients: int = 1
    index: int = 0


Scalar = bool | int | float | str


class TrainEvent(BaseModel):
    server: str
    credentials: CredentialPaths
    task: str
    round: int
    config: TrainConfig
    data: DataSpec | LocalData | AppData
    app: str | None = None  # fedge.edge_functions.app: what trains (None: the task's own loop)
    run_config: dict[str, Scalar] = {}  # the app's context.run_config
    compression: str = "none"  # fedge.compression: none, float16 or int8
    outbox: Path | None = None  # keep the update here for the caller to send, instead of posting it
    model_sha256: str | None = None  # the round's model, as announced: a warm instance may hold it already
    max_steps: int | None = Field(None, ge=1)  # the placement cut the round short (client.policy)
    weight: float = Field(1.0, gt=0, le=1)  # ...and num_examples counts only the share trained on


class TrainResult(BaseModel):
    round: int
    num_examples: int
    staleness: int | None  # None: not posted (kept in the outbox, or held back by its host)
    loss: float | None
    bytes_up: int
    bytes_down: int
    download_seconds: float  # with bytes_down: the device's bandwidth
    seconds: float  # what the run took on the device
    metrics: dict[str, float] = {}  # the app's fit metrics that are numbers


class CalibrateEvent(BaseModel):
    task: str
    config: TrainConfig
    data: DataSpec | LocalData
    steps: tuple[int, int] = (2, 8)


class CalibrateResult(BaseModel):
    points: tuple[tuple[int, float], tuple[int, float]]  # (steps, seconds) of each timed run


class InitialModelEvent(BaseModel):
    task: str
    seed: int = 0
    app: str | None = None
    run_config: dict[str, Scalar] = {}


class EvaluateEvent(BaseModel):
    """The current global model, evaluated by the app: on its held-out data (``data`` None: the app's
    ``load_test_data``, a task's test set), or on one client's own (``data``: which client). ``asked``:
    the server asked this client to evaluate that round's model (federated evaluation), and the figures
    are sent to it, signed, when the model it serves is still that one."""

    server: str
    credentials: CredentialPaths
    task: str
    app: str | None = None
    run_config: dict[str, Scalar] = {}
    data: DataSpec | LocalData | AppData | None = None
    asked: EvaluationAsk | None = None


class EvaluateResult(BaseModel):
    model_sha256: str | None
    round: int
    loss: float
    accuracy: float | None  # the app's ``accuracy`` metric, when it reports one
    num_examples: int = 1
    metrics: dict[str, float] = {}
    sent: bool = False  # the server took the figures (federated evaluation)


class CheckDataEvent(BaseModel):
    """Whether a device's data fits the app's model (the server's current one; without a server, the app's
    ``initial_params``), asked once at agent start."""

    server: str | None = None
    credentials: CredentialPaths | None = None
    task: str
    app: str | None = None
    run_config: dict[str, Scalar] = {}
    data: LocalData | AppData


class CheckDataResult(BaseModel):
    examples: int


class Job(BaseModel):
    task: str
    round: int
    config: TrainConfig
    shard: dict[str, str]  # security.offload.seal's output
    grant: str
    weight: float = Field(1.0, gt=0, le=1)  # scales num_examples when the client asked for less work


MAX_CALIBRATION_STEPS = 64  # a calibration is a few seconds of work, not a way to rent the GPU


class Calibration(BaseModel):
    """Two short timed runs on synthetic inputs shaped like the client's (no client data leaves it)."""

    task: str
    config: TrainConfig
    shape: list[int] = Field(min_length=1, max_length=4)  # one example's input shape
    classes: int = Field(ge=2, le=100_000)
    steps: tuple[int, int] = (2, 8)

    @field_validator("shape")
    @classmethod
    def _small_inputs(cls, shape: list[int]) -> list[int]:
        if any(n < 1 for n in shape) or math.prod(shape) > 1_000_000:
            raise ValueError("each dimension at least 1, at most 1,000,000 values an example")
        return shape

    @field_validator("steps")
    @classmethod
    def _two_sizes(cls, steps: tuple[int, int]) -> tuple[int, int]:
        if not 1 <= steps[0] < steps[1] <= MAX_CALIBRATION_STEPS:
            raise ValueError(f"two sizes, 1 <= small < large <= {MAX_CALIBRATION_STEPS}")
        return steps


class JobDone(BaseModel):
    """The executor's answer to a job: its own seconds and bytes per component, for the predictor."""

    client: str
    round: int
    device: str
    num_examples: int
    loss: float = 0.0
    staleness: int = 0
    bytes_down: int = Field(ge=0)
    download_seconds: float = Field(ge=0)
    compute_seconds: float = Field(ge=0)
    bytes_up: int = Field(ge=0)
    upload_seconds: float = Field(ge=0)
    seconds: float = Field(ge=0)


class Calibrated(BaseModel):
    """The executor's two timed runs, and who ran them."""

    executor: str
    device: str
    points: tuple[tuple[int, float], tuple[int, float]]  # (steps, seconds)
