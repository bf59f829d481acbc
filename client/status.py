"""What an agent is doing, kept in ``<state>/status.json`` and published on its status topic.

The file is what ``fedge agent status`` shows on the device; the retained MQTT message is what an operator
sees from afar. Both carry the same JSON.
"""

from __future__ import annotations

import os
import time
from enum import StrEnum
from pathlib import Path

from pydantic import BaseModel, Field

from fedge.files import write_file


class AgentState(StrEnum):
    IDLE = "idle"  # waiting for a round
    TRAINING = "training"
    UPLOADING = "uploading"
    SKIPPED = "skipped"  # a round it will not train (not selected, past its deadline)
    ERROR = "error"  # the round failed here (worker crashed or hung, update refused, server unreachable)
    STOPPED = "stopped"


class Transport(StrEnum):
    MQTT = "mqtt"
    LONG_POLL = "long-poll"  # the broker is unreachable: rounds come from GET /v1/rounds/current?wait=S


class LastInvocation(BaseModel):
    cold: bool
    startup_seconds: float
    seconds: float


class AgentStatus(BaseModel):
    client: str
    state: AgentState
    round: int | None = None
    detail: str = ""
    transport: Transport
    last_invocation: LastInvocation | None = None
    placements: dict[str, int] = Field(default_factory=dict)  # rounds per placement: edge, offload:ID, ...
    raw_bytes_offloaded: int = 0  # the device's own examples sent (sealed) to executors, in all
    fallback: str = ""  # why the last offload fell back to the device, and what the device did instead
    pid: int = Field(default_factory=os.getpid)
    updated: float = Field(default_factory=time.time)


def current(shown: int | None, reported: int | None) -> bool:
    """Whether a report about round ``reported`` (None: about no round in particular, which keeps the one
    shown) may replace a status showing round ``shown``. The status never goes back to an older round:
    an announcement delayed by a broker outage, or an old update sent late, is not what the agent is
    doing now."""
    return reported is None or shown is None or reported >= shown


class StatusError(Exception):
    """There is no readable status in the state directory."""


def status_file(state_dir: Path) -> Path:
    return state_dir / "status.json"


def write(state_dir: Path, status: AgentStatus) -> None:
    write_file(status_file(state_dir), status.model_dump_json(indent=2).encode())


def read(state_dir: Path) -> AgentStatus:
    path = status_file(state_dir)
    if not path.exists():
        raise StatusError(f"no agent status in {state_dir}: has `fedge agent run --dir {state_dir}` run?")
    try:
        return AgentStatus.model_validate_json(path.read_text())
    except ValueError:
        raise StatusError(f"{path} is not an agent status file") from None
