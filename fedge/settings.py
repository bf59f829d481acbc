"""Settings of each command: flags first, then ``FEDGE_*`` environment variables, then ``fedge.toml``.

``fedge.toml`` in the working directory (or the file ``FEDGE_CONFIG`` names) holds one table per command,
``[server]`` or ``[simulate]``, with the same names as the flags (``round_timeout = 30``).
"""

from __future__ import annotations

import os
import re
import tomllib
from pathlib import Path
from typing import Annotated, Any, ClassVar, Literal, Self

from pydantic import AfterValidator, Field, create_model
from pydantic_settings import BaseSettings, InitSettingsSource, PydanticBaseSettingsSource, SettingsConfigDict

_IMAGE = re.compile(
    r"([\w.-]+(:\d+)?/)?[a-z0-9]+([._-][a-z0-9]+)*(/[a-z0-9]+([._-][a-z0-9]+)*)*(:\w[\w.-]{0,127})?"
    r"(@sha256:[a-f0-9]{64})?"
)


def _image_reference(value: str) -> str:
    """A mistyped --image is refused when given, not when a container is first asked for."""
    if not _IMAGE.fullmatch(value):
        raise ValueError(f"{value!r} is not a Docker image reference ([registry/]name[:tag], in lower case)")
    return value


ImageReference = Annotated[str, AfterValidator(_image_reference)]


class _CommandSettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="FEDGE_", extra="forbid")
    section: ClassVar[str]

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        return init_settings, env_settings, InitSettingsSource(settings_cls, _toml_table(cls.section))

    @classmethod
    def from_flags(cls, **flags: Any) -> Any:
        """Build from the flags a user actually gave (``None`` means not given)."""
        return cls(**{name: value for name, value in flags.items() if value is not None})


def _toml_table(section: str) -> dict[str, Any]:
    path = Path(os.environ.get("FEDGE_CONFIG", "fedge.toml"))
    if not path.exists():
        return {}
    with path.open("rb") as f:
        return tomllib.load(f).get(section, {})


# Who is selected and when a version is made (``fedge.server.rounds.FederationSettings``).
ROUND_CONTROL = (
    "fraction", "buffer", "max_staleness", "staleness_exponent", "fraction_evaluate", "evaluate_every"
)  # fmt: skip


class TrainingSettings(_CommandSettings):
    """How the federation trains, shared by ``server`` and ``simulate``: what clients are handed each
    round, who is selected, and how their updates are aggregated.

    The strategies' own parameters are declared by the strategies (``fedge.server.strategies.registry``),
    which the kernel does not import: a command adds them as fields with ``with_knobs``."""

    knobs: ClassVar[tuple[str, ...]] = ()

    rounds: int = Field(10, ge=1)
    local_epochs: int = Field(1, ge=0)
    batch_size: int = Field(32, ge=1)
    lr: float = Field(0.05, gt=0)
    round_timeout: float = Field(600.0, gt=0)
    seed: int = Field(0, ge=0)
    fraction: float = Field(1.0, gt=0, le=1)
    fraction_evaluate: float = Field(0.0, ge=0, le=1)  # share of clients asked to score each new model
    evaluate_every: int = Field(1, ge=1)  # ...every this many rounds (and the last)
    strategy: str = "fedavg"
    buffer: int = Field(0, ge=0)
    max_staleness: int = Field(5, ge=0)
    staleness_exponent: float = Field(0.5, ge=0)

    @classmethod
    def with_knobs(cls, knobs: dict[str, tuple[Any, Any]]) -> type[Self]:
        """These settings plus the strategies' parameters (name: (type with constraints, default)), read
        from flags, ``FEDGE_*`` and ``fedge.toml`` like every other field."""
        extended = create_model(cls.__name__, __base__=cls, **knobs)  # type: ignore[call-overload]
        extended.knobs = tuple(knobs)
        return extended

    def aggregation_flags(self) -> list[str]:
        """Selection, mode and strategy as ``fedge server`` flags, for a server this command starts."""
        flags = ["--strategy", self.strategy]
        for name in (*ROUND_CONTROL, *self.knobs):
            if (value := getattr(self, name)) is not None:
                flags += [f"--{name.replace('_', '-')}", str(value)]
        return flags


class ServerSettings(TrainingSettings):
    section = "server"
    pki: Path
    data: Path
    host: str = "127.0.0.1"
    port: int = Field(8443, ge=0, le=65535)
    task: str = "mnist"
    min_clients: int = Field(1, ge=1)
    min_updates: int = Field(1, ge=1)
    max_update_norm: float | None = Field(None, gt=0)
    init_model: Path | None = None
    store: str | None = None  # postgresql://... for round state in PostgreSQL; none: SQLite under data
    blobs: Path | None = None  # models and updates, when not under data: one directory all replicas share
    mqtt: str | None = None  # HOST:PORT of the broker that carries round announcements
    manual_start: bool = False  # hold round 1 until an admin's POST /v1/admin/start
    # A client is selected only if seen (a request, or its MQTT status) this many seconds before; 0: all.
    presence_window: float = Field(180.0, ge=0)
    eval_data: Path | None = None  # .npz (x, y): the server scores each new global model on it
    log_format: Literal["text", "json"] = "text"  # the round log: a line per event, or a JSON object
    serve_after_finish: bool = False  # else the server exits (0) once the last round has closed
    enrolled_days: int = Field(
        7, ge=1, le=365
    )  # the lifetime of a certificate issued at enrollment or renewal
    prices: Path | None = None  # price table (TOML, fedge.pricing) rounds are billed at; none: example rates


class SimulationSettings(TrainingSettings):
    section = "simulate"
    clients: int = Field(10, ge=1, le=10_000)
    attack: str | None = None
    attackers: float = Field(0.0, ge=0, le=1)
    attack_scale: float = Field(4.0, gt=0)
    compression: str = "none"
    stragglers: float = Field(0.0, ge=0, le=1)
    straggler_delay: float = Field(5.0, ge=0)
    dataset: str = "mnist"
    partition: str = "dirichlet:0.5"
    workers: int = Field(default_factory=lambda: os.cpu_count() or 1, ge=1)
    out: Path = Path("fedge-run")
    profile: Path | None = None  # device profiles (fedge.sim.profiles): slow, small, flaky, far devices
    placement: str = "fedge"  # with a profile: fedge, or a baseline (fedge.sim.fleet.Rule)
    train_memory_mb: float = Field(256.0, gt=0)  # with a profile: what a training run needs on a device
    prices: Path | None = None  # price table (TOML, fedge.pricing): the server bills rounds at it
    max_cost: float | None = Field(None, ge=0)  # with a profile: each device's budget per round
    backend: str = "local"  # where client invocations run: local (a warm pool) or ray (fedge.sim.ray_pool)
    runtime: Literal["process", "container"] = "process"  # the local pool's instances: processes, containers
    image: ImageReference | None = None  # with --runtime container: its image [fedge/agent:<version>]
    ray_address: str | None = None  # with --backend ray: a running cluster's address, else a local one
    app: str | None = None  # the clients' app (fedge.edge_functions.app): module:attr, or an entry point
    flower_app: Path | None = None  # a Flower app directory, run as ``flwr run`` would
    run_config: str = ""  # "k=v k=v": overrides the Flower app's [tool.flwr.app.config]
