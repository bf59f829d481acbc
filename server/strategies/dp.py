"""Server-side differential privacy: fixed clipping plus Gaussian noise (Andrew et al.; Flower).

Flower's helpers are imported where they are used: importing flwr takes most of a second, and the command
line reads these declarations before it knows whether any strategy will run."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Annotated

import numpy as np
from pydantic import Field

from fedge.codec import Tensors
from fedge.server.strategies.base import Strategy, Weighted
from fedge.server.strategies.registry import register


def gaussian_epsilon(noise_multiplier: float, rounds: int, delta: float) -> float:
    """Privacy spent by ``rounds`` Gaussian mechanisms of this noise multiplier (sensitivity-normalized),
    by Rényi DP composition (Mironov 2017): eps = min over alpha of rounds*alpha/(2 sigma^2) +
    log(1/delta)/(alpha - 1). No subsampling amplification is claimed: every selected client counts."""
    if noise_multiplier <= 0:
        return math.inf
    orders = np.concatenate([np.linspace(1.01, 10, 200), np.logspace(1, 4, 400)])
    eps = rounds * orders / (2 * noise_multiplier**2) + math.log(1 / delta) / (orders - 1)
    return float(eps.min())


def clip_update(update: Tensors, model: Tensors, clip_norm: float) -> Tensors:
    """``model + clip(update - model)`` with Flower's helper: the update's change has norm <= clip_norm."""
    from flwr.supercore.differential_privacy import compute_clip_model_update

    names = list(model)
    clipped = [np.array(update[n], dtype=np.float64) for n in names]
    compute_clip_model_update(clipped, [model[n].astype(np.float64) for n in names], clip_norm)
    return dict(zip(names, clipped, strict=True))


def add_noise(mean: Tensors, std: float, rng: np.random.Generator) -> Tensors:
    return {n: (t + rng.normal(0.0, std, t.shape)).astype(t.dtype) for n, t in mean.items()}


@dataclass(frozen=True)
class DPParams:
    clip_norm: Annotated[float, Field(gt=0)] = field(
        default=1.0, metadata={"help": "L2 bound of each update's change"}
    )
    noise_multiplier: Annotated[float, Field(ge=0)] = field(
        default=1.0, metadata={"help": "noise std / clip norm"}
    )
    dp_delta: Annotated[float, Field(gt=0, lt=1)] = field(
        default=1e-5, metadata={"help": "delta of the privacy spent"}
    )


@register
class DPFedAvg(Strategy[DPParams]):
    """Central DP with server-side fixed clipping, as Flower's ``DifferentialPrivacyServerSideFixedClipping``
    around FedAvg. Noise comes from a generator seeded by (seed, round) so that a resumed round ends
    exactly as an uninterrupted one would."""

    name = "dp-fedavg"
    Params = DPParams

    def prepare(self, update: Tensors, model: Tensors) -> Tensors:
        return clip_update(update, model, self.params.clip_norm)

    def aggregate(
        self, round_: int, model: Tensors, mean: Tensors | None, updates: Sequence[Weighted]
    ) -> Tensors:
        from flwr.supercore.differential_privacy import compute_stdv

        assert mean is not None
        std = compute_stdv(self.params.noise_multiplier, self.params.clip_norm, len(updates))
        return add_noise(mean, std, np.random.default_rng([self.seed, round_]))

    def metadata(self, round_: int) -> dict[str, str]:
        epsilon = gaussian_epsilon(self.params.noise_multiplier, round_, self.params.dp_delta)
        return {"dp_epsilon": f"{epsilon:.6g}", "dp_delta": f"{self.params.dp_delta:g}"}
