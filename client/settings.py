"""Settings of ``fedge agent run``: flags, then ``FEDGE_*`` variables, then ``[agent]`` in ``fedge.toml``."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field

from fedge.client.policy import OffloadSetting
from fedge.settings import ImageReference, _CommandSettings


class AgentSettings(_CommandSettings):
    section = "agent"
    dir: Path
    data: Path | None = None  # None: the app loads its own
    label: str | None = None  # a CSV's label column (default: the last)
    eval_data: Path | None = None  # held-out examples to score asked-for models on (default: --data)
    app: str | None = None
    flower_app: Path | None = None
    run_config: str = ""
    node_config: str = ""  # a Flower client's "partition-id=N num-partitions=M"
    server: str | None = None  # default: the server the device enrolled with
    broker: str | None = None
    ca: Path | None = None  # default <dir>/ca.pem
    cert: Path | None = None  # default <dir>/client.pem
    key: Path | None = None  # default <dir>/client.key
    keep_alive: float = Field(300.0, gt=0)
    runtime: Literal["process", "container"] = "process"  # what hosts the warm function instance
    image: ImageReference | None = None  # --runtime container: its image (default fedge/agent:<version>)
    function_memory_mb: float = Field(2048.0, gt=0)  # --runtime container: the instance's memory limit
    function_cpus: float | None = Field(None, gt=0)  # --runtime container: its CPU limit (None: all cores)
    poll_wait: float = Field(10.0, gt=0, le=60)
    offload: OffloadSetting = OffloadSetting.NEVER  # may this device's data go, sealed, to an executor?
    executor: list[str] = []  # ID=https://HOST:PORT of the executors the owner allows
    train_memory_mb: float = Field(0.0, ge=0)  # memory a training run needs here
    prices: Path | None = None  # price table (TOML, fedge.pricing) placements are priced at
    max_cost: float | None = Field(None, ge=0)  # the owner's budget per round, at those prices
