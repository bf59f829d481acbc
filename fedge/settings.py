"""Settings of each command: flags first, then ``FEDGE_*`` environment variables, then ``fedge.toml``.

``fedge.toml`` in the working directory (or the file ``FEDGE_CONFIG`` names) holds one table per command,
``[server]`` or ``[simulate]``, with the same names as the flags (``round_timeout = 30``).
"""

from __future__ import annotations

import os
import tomllib
from pathlib import Path
from typing import Any, ClassVar

from pydantic import Field
from pydantic_settings import BaseSettings, InitSettingsSource, PydanticBaseSettingsSource, SettingsConfigDict


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


class TrainingSettings(_CommandSettings):
    """What the server hands clients each round, shared by ``server`` and ``simulate``."""

    rounds: int = Field(10, ge=1)
    local_epochs: int = Field(1, ge=0)
    batch_size: int = Field(32, ge=1)
    lr: float = Field(0.05, gt=0)
    round_timeout: float = Field(600.0, gt=0)
    seed: int = 0


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
    mqtt: str | None = None


class SimulationSettings(TrainingSettings):
    section = "simulate"
    clients: int = Field(10, ge=1, le=10_000)
    dataset: str = "mnist"
    partition: str = "dirichlet:0.5"
    workers: int = Field(default_factory=lambda: os.cpu_count() or 1, ge=1)
    out: Path = Path("fedge-run")
