"""Server optimizers on the pseudo-gradient (Reddi et al., 2021), with Flower's FedOpt arithmetic."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Annotated, ClassVar

import numpy as np
from pydantic import Field

from fedge.codec import Tensors
from fedge.server.strategies.base import Strategy, StrategyError, Weighted
from fedge.server.strategies.registry import register


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


@dataclass(frozen=True)
class FedAdagradParams:
    server_lr: Annotated[float, Field(gt=0)] | None = field(
        default=None, metadata={"help": "server step", "default_text": "Flower's"}
    )
    tau: Annotated[float, Field(gt=0)] | None = field(
        default=None, metadata={"help": "adaptivity", "default_text": "Flower's"}
    )


@dataclass(frozen=True)
class FedAdamParams(FedAdagradParams):
    beta1: Annotated[float, Field(ge=0, lt=1)] = field(default=0.9, metadata={"help": "first-moment decay"})
    beta2: Annotated[float, Field(ge=0, lt=1)] = field(default=0.99, metadata={"help": "second-moment decay"})


class FedOpt(Strategy[FedAdagradParams]):
    """The weighted mean is a pseudo-gradient step; a server optimizer decides how far to move."""

    kind: ClassVar[str]
    defaults: ClassVar[tuple[float, float]]  # Flower's (eta, tau)
    Params = FedAdamParams

    def __init__(self, params: FedAdagradParams | None = None, seed: int = 0) -> None:
        super().__init__(params, seed)
        eta, tau = self.defaults
        given = self.params
        self.eta = eta if given.server_lr is None else given.server_lr
        self.tau = tau if given.tau is None else given.tau
        adam_like = isinstance(given, FedAdamParams)
        self.beta1, self.beta2 = (given.beta1, given.beta2) if adam_like else (0.0, 0.0)
        if self.eta <= 0 or self.tau <= 0 or not (0 <= self.beta1 < 1 and 0 <= self.beta2 < 1):
            raise StrategyError("server optimizers need --server-lr > 0, --tau > 0 and betas in [0, 1)")
        self.m: Tensors = {}
        self.v: Tensors = {}

    def aggregate(
        self, round_: int, model: Tensors, mean: Tensors | None, updates: Sequence[Weighted]
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


@register
class FedAdam(FedOpt):
    name, kind, defaults = "fedadam", "adam", (1e-1, 1e-9)


@register
class FedYogi(FedOpt):
    name, kind, defaults = "fedyogi", "yogi", (1e-2, 1e-3)


@register
class FedAdagrad(FedOpt):
    """Adagrad keeps no moments' decay: its betas are 0, so it takes neither."""

    name, kind, defaults = "fedadagrad", "adagrad", (1e-1, 1e-9)
    Params = FedAdagradParams
