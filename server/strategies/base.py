"""What every strategy is: a class with a name, a frozen dataclass of its parameters, and the round hooks."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass
from typing import ClassVar, Generic, TypeVar

from fedge.codec import Tensors
from fedge.wire import TrainConfig

# One stored update as strategies see it: its tensors (memory-mapped by the store) and its examples.
Weighted = tuple[Tensors, int]


class StrategyError(ValueError):
    """The strategy cannot aggregate these updates (too few for its assumptions, bad parameters)."""


@dataclass(frozen=True)
class NoParams:
    """The parameters of a strategy that takes none."""


P = TypeVar("P")


class Strategy(ABC, Generic[P]):
    """How one round's updates become the next global model.

    ``Params`` is the frozen dataclass of the strategy's parameters: its fields are the strategy's flags,
    ``FEDGE_*`` variables, ``fedge.toml`` keys and admin API parameters, with their types, defaults and help.
    With ``streaming`` the federation folds ``prepare(update)`` into a running weighted sum as each update
    arrives and hands ``aggregate`` the mean; otherwise ``aggregate`` works on the stored updates themselves.
    """

    name: ClassVar[str]
    Params: ClassVar[type] = NoParams
    streaming: ClassVar[bool] = True

    def __init__(self, params: P | None = None, seed: int = 0) -> None:
        """``params`` default to the declared defaults; ``seed`` seeds what the strategy draws (DP noise)."""
        self.params: P = params if params is not None else self.Params()
        self.seed = seed

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
        self, round_: int, model: Tensors, mean: Tensors | None, updates: Sequence[Weighted]
    ) -> Tensors:
        """The next global model; ``mean`` is the weighted mean of the prepared updates when streaming."""

    def state(self) -> Tensors:
        """What must survive a restart between rounds (a server optimizer's moments)."""
        return {}

    def load_state(self, state: Tensors) -> None:
        """Restore ``state()`` as stored when the last round closed."""

    def metadata(self, round_: int) -> dict[str, str]:
        """Facts written into the new global model's metadata (the privacy spent so far)."""
        return {}
