"""Robust statistics over every update at once: median, trimmed mean, Krum, Bulyan.

They need all of a round's updates, so they get them as the store keeps them, memory-mapped, and read one
slice of coordinates at a time, applying Flower's arithmetic (``flwr.server.strategy.aggregate``) to each
slice: memory is bounded by the slice, not by clients times model. Flower is imported where it is used, as
in ``dp``."""

from __future__ import annotations

from abc import abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Annotated, TypeVar

import numpy as np
from pydantic import Field

from fedge.codec import Tensors
from fedge.server import aggregation
from fedge.server.strategies.base import NoParams, Strategy, StrategyError, Weighted
from fedge.server.strategies.registry import register

# Coordinates of all updates held in RAM at once (float64).
SLICE_BYTES = 64 * 2**20

Results = list[tuple[list[np.ndarray], int]]  # Flower's shape: (layers, num_examples) per client


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


P = TypeVar("P")


class RobustStrategy(Strategy[P]):
    streaming = False

    def aggregate(
        self, round_: int, model: Tensors, mean: Tensors | None, updates: Sequence[Weighted]
    ) -> Tensors:
        if len(updates) < self.min_updates():
            raise StrategyError(
                f"{self.name} needs at least {self.min_updates()} updates, got {len(updates)}"
            )
        return self.combine(model, [tensors for tensors, _ in updates], [n for _, n in updates])

    @abstractmethod
    def combine(self, model: Tensors, updates: list[Tensors], weights: list[int]) -> Tensors: ...


@register
class FedMedian(RobustStrategy[NoParams]):
    name = "fedmedian"

    def combine(self, model: Tensors, updates: list[Tensors], weights: list[int]) -> Tensors:
        from flwr.server.strategy.aggregate import aggregate_median

        return coordinatewise(updates, model, aggregate_median)


@dataclass(frozen=True)
class TrimmedMeanParams:
    trim_fraction: Annotated[float, Field(ge=0, lt=0.5)] = field(
        default=0.2, metadata={"help": "share cut at each end"}
    )


@register
class TrimmedMean(RobustStrategy[TrimmedMeanParams]):
    name = "trimmed-mean"
    Params = TrimmedMeanParams

    def combine(self, model: Tensors, updates: list[Tensors], weights: list[int]) -> Tensors:
        from flwr.server.strategy.aggregate import aggregate_trimmed_avg

        fraction = self.params.trim_fraction
        return coordinatewise(updates, model, lambda results: aggregate_trimmed_avg(results, fraction))


@dataclass(frozen=True)
class BulyanParams:
    malicious: Annotated[int, Field(ge=0)] = field(
        default=0, metadata={"help": "malicious clients tolerated"}
    )


@dataclass(frozen=True)
class KrumParams(BulyanParams):
    keep: Annotated[int, Field(ge=0)] = field(
        default=0, metadata={"help": "average the KEEP best (Multi-Krum); 0 = Krum"}
    )


@register
class Krum(RobustStrategy[KrumParams]):
    """Krum (``--keep 0``) or Multi-Krum (the example-weighted mean of the ``--keep`` best)."""

    name = "krum"
    Params = KrumParams

    def min_updates(self) -> int:
        return max(self.params.keep, 1)

    def combine(self, model: Tensors, updates: list[Tensors], weights: list[int]) -> Tensors:
        distances = pairwise_sq_distances(updates, list(model))
        chosen = krum_select(distances, self.params.malicious, self.params.keep)
        return weighted_mean([updates[i] for i in chosen], [float(weights[i]) for i in chosen], model)


@register
class Bulyan(RobustStrategy[BulyanParams]):
    """Bulyan over Krum (El Mhamdi et al., 2018): needs n >= 4f + 3 updates."""

    name = "bulyan"
    Params = BulyanParams

    def min_updates(self) -> int:
        return 4 * self.params.malicious + 3

    def combine(self, model: Tensors, updates: list[Tensors], weights: list[int]) -> Tensors:
        from flwr.server.strategy.aggregate import _aggregate_n_closest_weights, aggregate_median

        f = self.params.malicious
        chosen = bulyan_select(pairwise_sq_distances(updates, list(model)), f)
        beta = len(updates) - 4 * f

        def closest_to_median(results: Results) -> list[np.ndarray]:
            return _aggregate_n_closest_weights(aggregate_median(results), results, beta_closest=beta)

        return coordinatewise([updates[i] for i in chosen], model, closest_to_median)
