"""FedAvg and FedProx: the weighted mean the federation folds as updates arrive is the next model."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Annotated

from pydantic import Field

from fedge.codec import Tensors
from fedge.server.strategies.base import Strategy, StrategyError, Weighted
from fedge.server.strategies.registry import register
from fedge.wire import TrainConfig


@register
class FedAvg(Strategy):
    name = "fedavg"

    def aggregate(
        self, round_: int, model: Tensors, mean: Tensors | None, updates: Sequence[Weighted]
    ) -> Tensors:
        assert mean is not None
        return mean


@dataclass(frozen=True)
class FedProxParams:
    proximal_mu: Annotated[float, Field(ge=0)] = field(
        default=0.0, metadata={"help": "proximal term weight mu", "default_text": "0"}
    )


@register
class FedProx(FedAvg):
    """FedAvg on the server; clients add ``mu/2 * ||w - w_global||^2`` to their loss (Li et al., 2020)."""

    name = "fedprox"
    Params = FedProxParams

    def __init__(self, params: FedProxParams | None = None, seed: int = 0) -> None:
        super().__init__(params, seed)
        if self.params.proximal_mu <= 0:
            raise StrategyError("fedprox needs --proximal-mu > 0")

    def configure(self, train: TrainConfig) -> TrainConfig:
        return train.model_copy(update={"proximal_mu": self.params.proximal_mu})
