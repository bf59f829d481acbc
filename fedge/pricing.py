"""What a round costs: the parts a serverless bill is made of (``Usage``), a price per part (``Prices``,
``--prices FILE.toml``) and their product (``cost``).

A bill counts function seconds and memory-seconds (GB-s, seconds times the memory the function held),
GPU-seconds, invocations and bytes moved. Devices and executors are priced apart: a device's owner pays
nothing per second of their own hardware, so the device rates default to 0, while an executor is rented.
The default rates are examples in the range public clouds listed, so that a run without ``--prices`` shows
figures of a plausible size; they are not a claim about any provider's bill. Pure: no I/O but
``load_prices``.
"""

from __future__ import annotations

import tomllib
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Annotated

from pydantic import BaseModel, ConfigDict, Field, ValidationError

GB = 1e9  # bytes; providers bill transfer and memory in decimal gigabytes
_Rate = Annotated[float, Field(ge=0, allow_inf_nan=False)]


class Prices(BaseModel):
    """Dollars (or any one currency) per unit; every key is optional and a file names only the ones it
    changes. Unknown keys are refused, so a misspelt rate never silently stays at its default."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    device_gb_second: _Rate = 0.0
    device_invocation: _Rate = 0.0
    executor_gb_second: _Rate = 0.0000166667  # example: a function's memory-second
    executor_gpu_second: _Rate = 0.0003  # example: about 1.10 an hour of one GPU
    executor_invocation: _Rate = 0.0000002  # example: 0.20 per million requests
    gb_up: _Rate = 0.0  # example: ingress to the server is commonly free
    gb_down: _Rate = 0.09  # example: egress of the global model to each client


EXAMPLE_PRICES = Prices()  # the defaults: example rates, not any provider's


class PriceError(ValueError):
    """A price file that cannot be read, or a key in it that is unknown or out of range: the message names
    the file and the key."""


@dataclass(frozen=True)
class Usage:
    """What one client-round (or a sum of them) consumed. ``bytes_up``: update bodies sent to the server;
    ``bytes_down``: global models fetched from it."""

    device_seconds: float = 0.0
    device_gb_seconds: float = 0.0
    device_invocations: int = 0
    executor_seconds: float = 0.0
    executor_gb_seconds: float = 0.0
    executor_invocations: int = 0
    gpu_seconds: float = 0.0
    bytes_up: int = 0
    bytes_down: int = 0

    def __add__(self, other: Usage) -> Usage:
        return Usage(*(getattr(self, f.name) + getattr(other, f.name) for f in fields(Usage)))

    def as_dict(self) -> dict[str, float]:
        return {f.name: getattr(self, f.name) for f in fields(Usage)}


def total(usages: list[Usage]) -> Usage:
    return sum(usages, Usage())


@dataclass(frozen=True)
class Cost:
    """A bill by component, and their sum."""

    device: float
    executor: float
    gpu: float
    transfer: float

    @property
    def total(self) -> float:
        return self.device + self.executor + self.gpu + self.transfer

    def as_dict(self) -> dict[str, float]:
        return {"device": self.device, "executor": self.executor, "gpu": self.gpu,
                "transfer": self.transfer, "total": self.total}  # fmt: skip


def cost(usage: Usage, prices: Prices) -> Cost:
    return Cost(
        device=usage.device_gb_seconds * prices.device_gb_second
        + usage.device_invocations * prices.device_invocation,
        executor=usage.executor_gb_seconds * prices.executor_gb_second
        + usage.executor_invocations * prices.executor_invocation,
        gpu=usage.gpu_seconds * prices.executor_gpu_second,
        transfer=usage.bytes_up / GB * prices.gb_up + usage.bytes_down / GB * prices.gb_down,
    )


def executor_round(seconds: float, gb: float, gpu: bool, bytes_down: int) -> Usage:
    """One job on an executor, as its own bill would count it; ``bytes_up`` is the server's to count."""
    return Usage(
        executor_seconds=seconds,
        executor_gb_seconds=seconds * gb,
        executor_invocations=1,
        gpu_seconds=seconds if gpu else 0.0,
        bytes_down=bytes_down,
    )


def device_round(seconds: float, gb: float, bytes_down: int) -> Usage:
    return Usage(
        device_seconds=seconds, device_gb_seconds=seconds * gb, device_invocations=1, bytes_down=bytes_down
    )


def prices_from(path: Path | None) -> Prices:
    """A command's ``--prices``: the file's table, or the example rates without one."""
    return EXAMPLE_PRICES if path is None else load_prices(path)


def load_prices(path: Path) -> Prices:
    """The price table in ``path`` (TOML: ``key = number`` per rate). Raises ``PriceError``."""
    try:
        table = tomllib.loads(path.read_text())
    except OSError as exc:
        raise PriceError(f"cannot read prices {path}: {exc.strerror}") from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise PriceError(f"prices {path} is not TOML: {exc}") from None
    try:
        return Prices.model_validate(table)
    except ValidationError as exc:
        first = exc.errors()[0]
        key = ".".join(map(str, first["loc"])) or "(file)"
        if first["type"] == "extra_forbidden":
            known = ", ".join(Prices.model_fields)
            raise PriceError(f"prices {path}: unknown key {key!r} (known: {known})") from None
        raise PriceError(f"prices {path}: {key}: {first['msg']}") from None
