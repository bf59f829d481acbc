"""Aggregation strategies, as in Flower: a thin class per strategy, the maths in pure functions.

Weighted means (FedAvg, FedProx, the server optimizers, DP-FedAvg) are folded update by update as they arrive
(``fedge.server.aggregation``), so a round needs one model's worth of memory and ends moments after its last
update. Robust statistics (median, trimmed mean, Krum, Bulyan) need every update at once: they read the
update files the store already keeps, memory-mapped, one slice of coordinates at a time, and apply Flower's
arithmetic (``flwr.server.strategy.aggregate``) to each slice, so memory is bounded by the slice, not by
clients times model.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import ClassVar

import numpy as np
from flwr.server.strategy.aggregate import (
    _aggregate_n_closest_weights,
    aggregate_median,
    aggregate_trimmed_avg,
)
from flwr.supercore.differential_privacy import compute_clip_model_update, compute_stdv

from fedge.codec import Tensors, mapped
from fedge.server import aggregation
from fedge.server.store import UpdateRecord
from fedge.wire import TrainConfig

# Coordinates of all updates held in RAM at once by the robust strategies (float64).
SLICE_BYTES = 64 * 2**20

Results = list[tuple[list[np.ndarray], int]]  # Flower's shape: (layers, num_examples) per client


class StrategyError(ValueError):
    """The strategy cannot aggregate these updates (too few for its assumptions, bad parameters)."""


@dataclass(frozen=True)
class StrategyParams:
    """Every strategy's knobs, as ``fedge server`` and ``fedge simulate`` take them; each uses its own."""

    proximal_mu: float = 0.0
    server_lr: float | None = None  # None: Flower's default for the chosen optimizer
    beta1: float = 0.9
    beta2: float = 0.99
    tau: float | None = None
    trim_fraction: float = 0.2
    malicious: int = 0
    keep: int = 0
    clip_norm: float = 1.0
    noise_multiplier: float = 1.0
    dp_delta: float = 1e-5
    seed: int = 0


class Strategy(ABC):
    """How one round's updates become the next global model.

    With ``streaming`` the federation folds ``prepare(update)`` into a running weighted sum as each update
    arrives and hands ``aggregate`` the mean; otherwise ``aggregate`` reads the stored updates itself.
    """

    name: ClassVar[str]
    streaming: ClassVar[bool] = True

    def min_updates(self) -> int:
        """Fewest updates the strategy's assumptions allow in a round."""
        return 1

    def configure(self, train: TrainConfig) -> TrainConfig:
        """The training config clients get (FedProx adds its proximal term)."""
        return train

    def prepare(self, update: Tensors, model: Tensors) -> Tensors:
        """Transform an update before it is folded (DP clips it)."""
        return update

    @abstractmethod
    def aggregate(
        self, round_: int, model: Tensors, mean: Tensors | None, updates: Sequence[UpdateRecord]
    ) -> Tensors:
        """The next global model; ``mean`` is the weighted mean of the prepared updates when streaming."""

    def state(self) -> Tensors:
        """What must survive a restart between rounds (a server optimizer's moments)."""
        return {}

    def load_state(self, state: Tensors) -> None:  # noqa: B027 (most strategies keep nothing)
        """Restore ``state()`` as stored when the last round closed."""

    def metadata(self, round_: int) -> dict[str, str]:
        """Facts written into the new global model's metadata (the privacy spent so far)."""
        return {}


class FedAvg(Strategy):
    name = "fedavg"

    def aggregate(
        self, round_: int, model: Tensors, mean: Tensors | None, updates: Sequence[UpdateRecord]
    ) -> Tensors:
        assert mean is not None
        return mean


class FedProx(FedAvg):
    """FedAvg on the server; clients add ``mu/2 * ||w - w_global||^2`` to their loss (Li et al., 2020)."""

    name = "fedprox"

    def __init__(self, proximal_mu: float) -> None:
        if proximal_mu <= 0:
            raise StrategyError("fedprox needs --proximal-mu > 0")
        self.proximal_mu = proximal_mu

    def configure(self, train: TrainConfig) -> TrainConfig:
        return train.model_copy(update={"proximal_mu": self.proximal_mu})


# ---- server optimizers on the pseudo-gradient (Reddi et al., 2021), with Flower's FedOpt arithmetic ----


def server_optimizer_step(
    kind: str,
    model: Tensors,
    mean: Tensors,
    m: Tensors,
    v: Tensors,
    round_: int,
    eta: float,
    beta1: float,
    beta2: float,
    tau: float,
) -> tuple[Tensors, Tensors, Tensors]:
    """One step of FedAdam, FedYogi or FedAdagrad as Flower computes it: returns (model, m, v)."""
    new_model, new_m, new_v = {}, {}, {}
    step = eta
    if kind == "adam":
        step = eta * np.sqrt(1 - np.power(beta2, round_ + 1.0)) / (1 - np.power(beta1, round_ + 1.0))
    for name, x in model.items():
        delta = mean[name] - x
        m_prev = m.get(name, np.zeros_like(delta))
        v_prev = v.get(name, np.zeros_like(delta))
        m_t = np.multiply(beta1, m_prev) + (1 - beta1) * delta
        square = np.multiply(delta, delta)
        if kind == "adam":
            v_t = beta2 * v_prev + (1 - beta2) * square
        elif kind == "yogi":
            v_t = v_prev - (1.0 - beta2) * square * np.sign(v_prev - square)
        else:
            v_t = v_prev + square
        new_model[name] = (x + step * m_t / (np.sqrt(v_t) + tau)).astype(x.dtype)
        new_m[name], new_v[name] = m_t, v_t
    return new_model, new_m, new_v


class FedOpt(FedAvg):
    """The weighted mean is a pseudo-gradient step; a server optimizer decides how far to move."""

    kind: ClassVar[str]
    defaults: ClassVar[tuple[float, float]]  # Flower's (eta, tau)

    def __init__(self, params: StrategyParams) -> None:
        eta, tau = self.defaults
        self.eta = eta if params.server_lr is None else params.server_lr
        self.tau = tau if params.tau is None else params.tau
        self.beta1, self.beta2 = (0.0, 0.0) if self.kind == "adagrad" else (params.beta1, params.beta2)
        if self.eta <= 0 or self.tau <= 0 or not (0 <= self.beta1 < 1 and 0 <= self.beta2 < 1):
            raise StrategyError("server optimizers need --server-lr > 0, --tau > 0 and betas in [0, 1)")
        self.m: Tensors = {}
        self.v: Tensors = {}

    def aggregate(
        self, round_: int, model: Tensors, mean: Tensors | None, updates: Sequence[UpdateRecord]
    ) -> Tensors:
        assert mean is not None
        new_model, self.m, self.v = server_optimizer_step(
            self.kind, model, mean, self.m, self.v, round_, self.eta, self.beta1, self.beta2, self.tau
        )
        return new_model

    def state(self) -> Tensors:
        return {**{f"m/{k}": t for k, t in self.m.items()}, **{f"v/{k}": t for k, t in self.v.items()}}

    def load_state(self, state: Tensors) -> None:
        self.m = {k.removeprefix("m/"): np.array(t) for k, t in state.items() if k.startswith("m/")}
        self.v = {k.removeprefix("v/"): np.array(t) for k, t in state.items() if k.startswith("v/")}


class FedAdam(FedOpt):
    name, kind, defaults = "fedadam", "adam", (1e-1, 1e-9)


class FedYogi(FedOpt):
    name, kind, defaults = "fedyogi", "yogi", (1e-2, 1e-3)


class FedAdagrad(FedOpt):
    name, kind, defaults = "fedadagrad", "adagrad", (1e-1, 1e-9)


# ---- server-side differential privacy: fixed clipping plus Gaussian noise (Andrew et al.; Flower) ----


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
    names = list(model)
    clipped = [np.array(update[n], dtype=np.float64) for n in names]
    compute_clip_model_update(clipped, [model[n].astype(np.float64) for n in names], clip_norm)
    return dict(zip(names, clipped, strict=True))


def add_noise(mean: Tensors, std: float, rng: np.random.Generator) -> Tensors:
    return {n: (t + rng.normal(0.0, std, t.shape)).astype(t.dtype) for n, t in mean.items()}


class DPFedAvg(FedAvg):
    """Central DP with server-side fixed clipping, as Flower's ``DifferentialPrivacyServerSideFixedClipping``
    around FedAvg. Noise comes from a generator seeded by (seed, round) so that a resumed round ends
    exactly as an uninterrupted one would."""

    name = "dp-fedavg"

    def __init__(self, params: StrategyParams) -> None:
        if params.clip_norm <= 0 or params.noise_multiplier < 0 or not 0 < params.dp_delta < 1:
            raise StrategyError(
                "dp-fedavg needs --clip-norm > 0, --noise-multiplier >= 0, 0 < --dp-delta < 1"
            )
        self.clip_norm = params.clip_norm
        self.noise_multiplier = params.noise_multiplier
        self.delta = params.dp_delta
        self.seed = params.seed

    def prepare(self, update: Tensors, model: Tensors) -> Tensors:
        return clip_update(update, model, self.clip_norm)

    def aggregate(
        self, round_: int, model: Tensors, mean: Tensors | None, updates: Sequence[UpdateRecord]
    ) -> Tensors:
        assert mean is not None
        std = compute_stdv(self.noise_multiplier, self.clip_norm, len(updates))
        return add_noise(mean, std, np.random.default_rng([self.seed, round_]))

    def metadata(self, round_: int) -> dict[str, str]:
        epsilon = gaussian_epsilon(self.noise_multiplier, round_, self.delta)
        return {"dp_epsilon": f"{epsilon:.6g}", "dp_delta": f"{self.delta:g}"}


# ---- robust statistics over every update, read memory-mapped slice by slice ----


def slice_length(clients: int) -> int:
    return max(1024, SLICE_BYTES // (8 * max(clients, 1)))


def coordinatewise(
    updates: Sequence[Tensors], model: Tensors, combine: Callable[[Results], list[np.ndarray]]
) -> Tensors:
    """Apply a coordinate-wise rule (median, trimmed mean, ...) in slices of every tensor, so only
    ``clients x slice`` numbers are in RAM whatever the model size."""
    step = slice_length(len(updates))
    out: Tensors = {}
    for name, ref in model.items():
        flats = [u[name].reshape(-1) for u in updates]
        result = np.empty(ref.size, dtype=ref.dtype)
        for start in range(0, ref.size, step):
            results = [([np.asarray(f[start : start + step], dtype=np.float64)], 1) for f in flats]
            result[start : start + step] = combine(results)[0]
        out[name] = result.reshape(ref.shape)
    return out


def pairwise_sq_distances(updates: Sequence[Tensors], names: Sequence[str]) -> np.ndarray:
    """Squared Euclidean distances between whole updates, accumulated slice by slice (the matrix Flower's
    ``_compute_distances`` builds from fully loaded vectors)."""
    n = len(updates)
    distances = np.zeros((n, n))
    step = slice_length(n)
    for name in names:
        flats = [u[name].reshape(-1) for u in updates]
        for start in range(0, flats[0].size, step):
            block = np.stack([np.asarray(f[start : start + step], dtype=np.float64) for f in flats])
            squares = np.einsum("ij,ij->i", block, block)
            distances += squares[:, None] + squares[None, :] - 2 * block @ block.T
    np.fill_diagonal(distances, 0.0)
    return np.maximum(distances, 0.0)


def krum_scores(distances: np.ndarray, num_malicious: int) -> list[float]:
    """Flower's Krum score: the sum of distances to the n - f - 2 closest other updates."""
    num_closest = max(1, len(distances) - num_malicious - 2)
    return [float(np.sum(row[np.argsort(row)[1 : num_closest + 1].tolist()])) for row in distances]


def krum_select(distances: np.ndarray, num_malicious: int, keep: int) -> list[int]:
    """Krum's choice (keep=0: the single best) or Multi-Krum's ``keep`` best, in Flower's order."""
    scores = krum_scores(distances, num_malicious)
    if keep > 0:
        return [int(i) for i in np.argsort(scores)[::-1][len(scores) - keep :]]
    return [int(np.argmin(scores))]


def bulyan_select(distances: np.ndarray, num_malicious: int) -> list[int]:
    """Bulyan's first stage: repeatedly take Krum's choice among the rest, n - 2f times."""
    remaining = list(range(len(distances)))
    chosen = []
    for _ in range(len(distances) - 2 * num_malicious):
        sub = distances[np.ix_(remaining, remaining)]
        chosen.append(remaining.pop(krum_select(sub, num_malicious, 0)[0]))
    return chosen


def weighted_mean(updates: Sequence[Tensors], weights: Sequence[float], model: Tensors) -> Tensors:
    acc = aggregation.start(model)
    for update, weight in zip(updates, weights, strict=True):
        aggregation.fold(acc, update, weight)
    return aggregation.average(acc, model)


class RobustStrategy(Strategy):
    streaming = False

    def __init__(self, params: StrategyParams) -> None:
        self.params = params

    def aggregate(
        self, round_: int, model: Tensors, mean: Tensors | None, updates: Sequence[UpdateRecord]
    ) -> Tensors:
        if len(updates) < self.min_updates():
            raise StrategyError(
                f"{self.name} needs at least {self.min_updates()} updates, got {len(updates)}"
            )
        return self.combine(model, [mapped(u.path) for u in updates], [u.num_examples for u in updates])

    @abstractmethod
    def combine(self, model: Tensors, updates: list[Tensors], weights: list[int]) -> Tensors: ...


class FedMedian(RobustStrategy):
    name = "fedmedian"

    def combine(self, model: Tensors, updates: list[Tensors], weights: list[int]) -> Tensors:
        return coordinatewise(updates, model, aggregate_median)


class TrimmedMean(RobustStrategy):
    name = "trimmed-mean"

    def __init__(self, params: StrategyParams) -> None:
        if not 0 <= params.trim_fraction < 0.5:
            raise StrategyError("--trim-fraction must be in [0, 0.5)")
        super().__init__(params)

    def combine(self, model: Tensors, updates: list[Tensors], weights: list[int]) -> Tensors:
        fraction = self.params.trim_fraction
        return coordinatewise(updates, model, lambda results: aggregate_trimmed_avg(results, fraction))


class Krum(RobustStrategy):
    """Krum (``--keep 0``) or Multi-Krum (the example-weighted mean of the ``--keep`` best)."""

    name = "krum"

    def min_updates(self) -> int:
        return max(self.params.keep, 1)

    def combine(self, model: Tensors, updates: list[Tensors], weights: list[int]) -> Tensors:
        distances = pairwise_sq_distances(updates, list(model))
        chosen = krum_select(distances, self.params.malicious, self.params.keep)
        return weighted_mean([updates[i] for i in chosen], [float(weights[i]) for i in chosen], model)


class Bulyan(RobustStrategy):
    """Bulyan over Krum (El Mhamdi et al., 2018): needs n >= 4f + 3 updates."""

    name = "bulyan"

    def min_updates(self) -> int:
        return 4 * self.params.malicious + 3

    def combine(self, model: Tensors, updates: list[Tensors], weights: list[int]) -> Tensors:
        f = self.params.malicious
        chosen = bulyan_select(pairwise_sq_distances(updates, list(model)), f)
        beta = len(updates) - 4 * f

        def closest_to_median(results: Results) -> list[np.ndarray]:
            return _aggregate_n_closest_weights(aggregate_median(results), results, beta_closest=beta)

        return coordinatewise([updates[i] for i in chosen], model, closest_to_median)


STRATEGIES: dict[str, Callable[[StrategyParams], Strategy]] = {
    "fedavg": lambda _: FedAvg(),
    "fedprox": lambda p: FedProx(p.proximal_mu),
    "fedadam": FedAdam,
    "fedyogi": FedYogi,
    "fedadagrad": FedAdagrad,
    "dp-fedavg": DPFedAvg,
    "fedmedian": FedMedian,
    "trimmed-mean": TrimmedMean,
    "krum": Krum,
    "bulyan": Bulyan,
}


def create(name: str, params: StrategyParams) -> Strategy:
    """The strategy called ``name``; ``StrategyError`` with the choices when there is none."""
    if name not in STRATEGIES:
        raise StrategyError(f"unknown strategy {name!r}: choose from {', '.join(STRATEGIES)}")
    if params.malicious < 0 or params.keep < 0:
        raise StrategyError("--malicious and --keep must be >= 0")
    return STRATEGIES[name](params)
