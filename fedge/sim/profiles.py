"""Device profiles for ``fedge simulate --profile FILE``: how each simulated client's device differs from
this machine, so the effect of slow, small, flaky or badly connected devices is seen on one machine.

The file is TOML: a ``[default]`` table for every client, then ``[[group]]`` tables, each taking a
``share`` of the clients (drawn by the seed, disjoint, in file order) and overriding what it names::

    [default]
    offload = "when-short"     # the owner's setting (client.policy.OffloadSetting)

    [[group]]
    share = 0.3                # 30% of the clients
    slowdown = 5.0             # its work takes 5x as long as on this machine
    memory_mb = 512            # free memory for training (training needs --train-memory-mb)
    dropout = 0.1              # chance, each round, that the device is gone without a word
    bandwidth_mbps = 10        # its link, both ways (omit for loopback speed)

A slowed device really waits: its function sleeps ``slowdown - 1`` times the time its own work took
(loading data and model, training, encoding: all but the network), so a 5x device takes 5x as long under
whatever load the machine has; and it sleeps ``bytes / bandwidth`` for each transfer.
"""

from __future__ import annotations

import tomllib
from pathlib import Path

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from fedge.client.policy import OffloadSetting


class ProfileError(ValueError):
    """The profile file cannot be read or says something impossible."""


class DeviceProfile(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    slowdown: float = Field(1.0, ge=1.0)
    memory_mb: float | None = Field(None, gt=0)  # None: as much as training needs
    dropout: float = Field(0.0, ge=0.0, le=1.0)
    bandwidth_mbps: float | None = Field(None, gt=0)  # None: loopback speed
    offload: OffloadSetting = OffloadSetting.NEVER

    @property
    def bandwidth(self) -> float | None:
        """Bytes per second, as the edge functions take it."""
        return None if self.bandwidth_mbps is None else self.bandwidth_mbps * 1e6 / 8

    def free_memory(self, needed: int) -> int:
        """What the placement sees as free: the profile's limit, or exactly enough when it sets none."""
        return needed if self.memory_mb is None else int(self.memory_mb * 1024 * 1024)

    def drops_out(self, seed: int, round_: int, index: int) -> bool:
        """Whether the device is gone this round: reproducible per (seed, round, client)."""
        return bool(np.random.default_rng([seed, round_, index, 7]).random() < self.dropout)


class _Group(BaseModel):
    model_config = ConfigDict(extra="forbid")

    share: float = Field(gt=0.0, le=1.0)
    slowdown: float | None = None
    memory_mb: float | None = None
    dropout: float | None = None
    bandwidth_mbps: float | None = None
    offload: OffloadSetting | None = None


class ProfileFile(BaseModel):
    model_config = ConfigDict(extra="forbid")

    default: DeviceProfile = DeviceProfile()
    group: list[_Group] = []


def load(path: Path) -> ProfileFile:
    try:
        with path.open("rb") as f:
            parsed = ProfileFile.model_validate(tomllib.load(f))
    except OSError as exc:
        raise ProfileError(f"cannot read the profile file {path}: {exc.strerror}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ProfileError(f"{path} is not TOML: {exc}") from None
    except ValidationError as exc:
        first = exc.errors()[0]
        raise ProfileError(f"{path}: {'.'.join(map(str, first['loc']))}: {first['msg']}") from None
    if sum(g.share for g in parsed.group) > 1.0 + 1e-9:
        raise ProfileError(f"{path}: the groups' shares add up to more than 1")
    for number, g in enumerate(parsed.group, 1):
        try:
            _merged(parsed.default, g)
        except ValidationError as exc:
            first = exc.errors()[0]
            raise ProfileError(f"{path}: group {number}: {first['loc'][0]}: {first['msg']}") from None
    return parsed


def assign(profiles: ProfileFile, clients: int, seed: int) -> list[DeviceProfile]:
    """Each client's profile, by index: the groups take ``round(share * clients)`` clients each, drawn by
    the seed, one after another; the rest keep the default."""
    order = np.random.default_rng([seed, 11]).permutation(clients)
    assigned = [profiles.default] * clients
    start = 0
    for g in profiles.group:
        count = round(g.share * clients)
        profile = _merged(profiles.default, g)
        for index in order[start : start + count]:
            assigned[int(index)] = profile
        start += count
    return assigned


def _merged(default: DeviceProfile, group: _Group) -> DeviceProfile:
    """The default with what the group names, validated as a whole (a group's ``slowdown = 0.5`` fails)."""
    return DeviceProfile.model_validate(
        {**default.model_dump(), **group.model_dump(exclude={"share"}, exclude_none=True)}
    )
