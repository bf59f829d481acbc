"""The JSON side of the v1 wire contract (design.md); tensors travel as safetensors (codec.py)."""

from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from enum import StrEnum

from pydantic import BaseModel, Field, field_validator

from fedge.jsonlimits import JSONError, loads
from fedge.pricing import Usage


def rounds_topic(federation: str) -> str:
    """Round announcements: QoS 1, retained, written by the aggregation server only."""
    return f"fedge/{federation}/rounds"


def status_topic(federation: str, client: str) -> str:
    """One client's status (``+`` for all of them): written by that client only."""
    return f"fedge/{federation}/clients/{client}/status"


def seconds_until(deadline: float | None, now: float) -> float:
    """Seconds from Unix time ``now`` to ``deadline`` (negative once past); infinite without one. The one
    place deadline arithmetic lives: whoever needs a finite bound caps this itself."""
    return math.inf if deadline is None else deadline - now


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


class EvaluationAsk(BaseModel):
    """Federated evaluation: the clients asked to score the model round ``round`` produced on their own
    held-out data, and send back their figures (``POST /v1/rounds/{round}/evaluation``) once each."""

    round: int
    model_sha256: str
    clients: list[str]
    deadline: float = Field(description="Unix time after which their reports are refused")


class RoundInfo(BaseModel):
    round: int
    state: RoundState
    deadline: float | None = Field(None, description="Unix time after which updates are refused")
    model_sha256: str
    task: str
    selected: list[str] = []
    config: TrainConfig = TrainConfig()
    evaluate: EvaluationAsk | None = None  # the latest request for federated evaluation, while it is open

    @property
    def etag(self) -> str:
        return f'"{self.round}-{self.state}"'

    def seconds_left(self, now: float) -> float:
        """Seconds until the round's deadline at Unix time ``now`` (``seconds_until``)."""
        return seconds_until(self.deadline, now)


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


class EvaluationReport(BaseModel):
    """A client's evaluation of a round's model on its own held-out data (signed like an update, over the
    sha256 of this JSON body, with kind ``evaluation``)."""

    model_sha256: str = Field(pattern=r"^[0-9a-f]{64}$", description="the model it evaluated")
    loss: float = Field(allow_inf_nan=False)
    num_examples: int = Field(ge=1, le=2**40, strict=True)
    metrics: dict[str, float] = Field({}, max_length=64, description="the app's metrics that are numbers")

    @field_validator("metrics")
    @classmethod
    def _finite_names(cls, metrics: dict[str, float]) -> dict[str, float]:
        for name, value in metrics.items():
            if not 0 < len(name) <= 64 or not name.isprintable():
                raise ValueError(f"a metric name is 1-64 printable characters, not {name[:70]!r}")
            if not math.isfinite(value):
                raise ValueError(f"metric {name!r} is not a finite number")
        return metrics


class EvaluationReceipt(BaseModel):
    round: int
    client: str
    num_examples: int


class ErrorBody(BaseModel):
    error: str = Field(description="stable machine-readable code")
    detail: str


# Metadata keys inside an update's safetensors body.
NUM_EXAMPLES = "num_examples"
TRAIN_LOSS = "train_loss"
BASE_SHA256 = "base_sha256"  # the global model the update was trained from (asynchronous mode)
STEPS = "steps"  # local steps, when the placement cut the round short (fewer steps)
RAW_BYTES = "raw_bytes"  # bytes of a device's raw examples an executor trained on (offload)
COMPRESSION = "compression"
INT8_SCALES = "int8_scales"
METRICS = "metrics"  # the client app's fit metrics: a JSON object of name -> number
USAGE = "usage"  # what computing the update consumed (fedge.pricing.Usage): a JSON object of field -> number
COMPRESSIONS = ("none", "float16", "int8")

_MAX_SCALES_BYTES = 1 << 20
_MAX_METRICS_BYTES = 16 * 1024
_MAX_USAGE_BYTES = 2048
_MAX_USAGE = 1e15  # past any real round's seconds or bytes: a larger figure is a lie or a bug
_SHA256 = re.compile(r"[0-9a-f]{64}")


class MetadataError(ValueError):
    """An update's metadata holds a missing or malformed value."""


class CompressionError(MetadataError):
    """The body names an unknown compression, or its scales do not fit its tensors."""


@dataclass(frozen=True)
class Compression:
    """How an update's tensors were compressed (fedge.compression): the part of its metadata that says how
    to restore them, so that the signature over the body covers that too."""

    kind: str = "none"
    int8_scales: Mapping[str, float] = field(default_factory=dict)

    def to_metadata(self) -> dict[str, str]:
        if self.kind == "none":
            return {}
        if self.kind == "int8":
            return {COMPRESSION: self.kind, INT8_SCALES: json.dumps(dict(self.int8_scales), sort_keys=True)}
        return {COMPRESSION: self.kind}

    @classmethod
    def from_metadata(cls, metadata: Mapping[str, str]) -> Compression:
        kind = metadata.get(COMPRESSION, "none")
        if kind not in COMPRESSIONS:
            raise CompressionError(f"unknown compression {kind!r}: choose from {', '.join(COMPRESSIONS)}")
        if kind != "int8":
            return cls(kind)
        return cls(kind, _scales(metadata.get(INT8_SCALES)))


@dataclass(frozen=True)
class UpdateMeta:
    """What an update's safetensors ``__metadata__`` says: the one type every producer builds and the server
    parses, so that no key is spelt by hand or left out by one producer."""

    num_examples: int
    train_loss: float | None = None
    base_sha256: str | None = None  # "" from a producer that knew no model: refused in asynchronous mode
    compression: Compression = field(default_factory=Compression)
    # Where it was computed, as its producer says (the server logs and counts it; nothing trusts it).
    steps: int | None = None
    raw_bytes: int | None = None
    metrics: Mapping[str, float] = field(default_factory=dict)
    usage: Usage | None = None  # what its producer's run consumed, for the round's bill (its own word)

    def received(self, size: int) -> Usage:
        """The usage the server bills for this update: its producer's figures, with the ``size`` bytes of
        the body the server itself received as the upload."""
        return replace(self.usage or Usage(), bytes_up=size)

    def to_metadata(self) -> dict[str, str]:
        metadata = {NUM_EXAMPLES: str(self.num_examples), **self.compression.to_metadata()}
        if self.metrics:
            metadata[METRICS] = json.dumps(dict(self.metrics), sort_keys=True)
        if self.usage is not None:
            metadata[USAGE] = json.dumps({k: v for k, v in self.usage.as_dict().items() if v}, sort_keys=True)
        if self.train_loss is not None:
            metadata[TRAIN_LOSS] = f"{self.train_loss:.6f}"
        if self.base_sha256 is not None:
            metadata[BASE_SHA256] = self.base_sha256
        for key, value in ((STEPS, self.steps), (RAW_BYTES, self.raw_bytes)):
            if value is not None:
                metadata[key] = str(value)
        return metadata

    @classmethod
    def from_metadata(cls, metadata: Mapping[str, str]) -> UpdateMeta:
        """Parse a body's metadata; ``CompressionError`` (checked first) or ``MetadataError`` say what is
        wrong. Keys this version does not know are ignored."""
        compression = Compression.from_metadata(metadata)
        try:
            num_examples = int(metadata[NUM_EXAMPLES])
        except (KeyError, ValueError):
            raise MetadataError(f"metadata needs an integer {NUM_EXAMPLES!r}") from None
        if not 0 < num_examples < 2**31:
            raise MetadataError(f"{NUM_EXAMPLES} must be positive, got {num_examples}")
        return cls(
            num_examples, _loss(metadata.get(TRAIN_LOSS)), _base(metadata.get(BASE_SHA256)), compression,
            steps=_count(metadata, STEPS), raw_bytes=_count(metadata, RAW_BYTES),
            metrics=_metrics(metadata.get(METRICS)), usage=_usage(metadata.get(USAGE)),
        )  # fmt: skip


def _usage(text: str | None) -> Usage | None:
    """A small JSON object of ``Usage`` field -> finite non-negative number (counts as integers); fields
    this version does not know are ignored, as unknown metadata keys are."""
    if text is None:
        return None
    problem = f"{USAGE} must be a JSON object of usage field -> non-negative number below {_MAX_USAGE:g}"
    try:
        parsed = loads(text, max_bytes=_MAX_USAGE_BYTES)
    except JSONError as exc:
        raise MetadataError(f"{problem} ({exc})") from None
    if not isinstance(parsed, dict):
        raise MetadataError(problem)
    known = Usage.__dataclass_fields__
    values: dict[str, float | int] = {}
    for key, value in parsed.items():
        if key not in known:
            continue
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise MetadataError(f"{problem}: {key!r}")
        if not (math.isfinite(value) and 0 <= value < _MAX_USAGE):
            raise MetadataError(f"{problem}: {key!r}")
        counted = known[key].type in ("int", int)
        if counted and value != int(value):
            raise MetadataError(f"{USAGE} field {key!r} must be an integer")
        values[key] = int(value) if counted else float(value)
    return Usage(**values)  # type: ignore[arg-type]


def _scales(text: str | None) -> dict[str, float]:
    """A JSON object of tensor name -> number, within ``jsonlimits``' bounds."""
    problem = f"int8 updates need {INT8_SCALES!r}: a JSON object of tensor scales"
    if text is None:
        raise CompressionError(problem)
    try:
        parsed = loads(text, max_bytes=_MAX_SCALES_BYTES)
    except JSONError as exc:
        raise CompressionError(f"{problem} ({exc})") from None
    if not isinstance(parsed, dict) or not all(
        isinstance(v, int | float) and not isinstance(v, bool) for v in parsed.values()
    ):
        raise CompressionError(problem)
    try:
        return {str(k): float(v) for k, v in parsed.items()}
    except OverflowError:  # an integer literal past the float range
        raise CompressionError(f"{problem}: a scale is out of range") from None


def _metrics(text: str | None) -> dict[str, float]:
    """A JSON object of metric name -> finite number, small: what a client app reported of its training."""
    if text is None:
        return {}
    problem = f"{METRICS} must be a JSON object of name -> finite number"
    try:
        parsed = loads(text, max_bytes=_MAX_METRICS_BYTES)
    except JSONError as exc:
        raise MetadataError(f"{problem} ({exc})") from None
    if not isinstance(parsed, dict) or not all(
        isinstance(v, int | float) and not isinstance(v, bool) for v in parsed.values()
    ):
        raise MetadataError(problem)
    try:
        metrics = {str(k): float(v) for k, v in parsed.items()}
    except OverflowError:  # an integer literal past the float range
        raise MetadataError(problem) from None
    if not all(map(math.isfinite, metrics.values())):
        raise MetadataError(problem)
    return metrics


def _loss(text: str | None) -> float | None:
    if text is None:
        return None
    try:
        return float(text)  # NaN allowed: a diverged client may say so; its tensors are checked anyway
    except ValueError:
        raise MetadataError(f"{TRAIN_LOSS} must be a number, got {text[:20]!r}") from None


def _count(metadata: Mapping[str, str], key: str) -> int | None:
    """An optional non-negative integer below 2**63 (what a metric can hold exactly)."""
    text = metadata.get(key)
    if text is None:
        return None
    if not (text.isascii() and text.isdigit() and len(text) < 19):
        raise MetadataError(f"{key} must be a non-negative integer, got {text[:20]!r}")
    return int(text)


def _base(text: str | None) -> str | None:
    if text is None or text == "" or _SHA256.fullmatch(text):
        return text
    raise MetadataError(f"{BASE_SHA256} must be a sha256 in hex, got {text[:20]!r}")
