"""Aggregation strategies, as in Flower: a thin class per strategy, the maths in pure functions.

Weighted means (FedAvg, FedProx, the server optimizers, DP-FedAvg) are folded update by update as they arrive
(``fedge.server.aggregation``), so a round needs one model's worth of memory and ends moments after its last
update. Robust statistics (``robust``) get every update at once, memory-mapped by the store.

A strategy is one module here that registers its class (``registry.register``) with the dataclass of its
parameters, imported below so that it is registered; the CLI, the settings and the admin API take it from
the registry.
"""

# isort: off
# The order of registration is the order of the --strategy choices: the plain mean first.
from fedge.server.strategies import fedavg, fedopt, dp, robust

# isort: on
from fedge.server.strategies.base import Strategy, StrategyError, Weighted
from fedge.server.strategies.registry import STRATEGIES, create, pick

__all__ = [
    "STRATEGIES",
    "Strategy",
    "StrategyError",
    "Weighted",
    "create",
    "dp",
    "fedavg",
    "fedopt",
    "pick",
    "robust",
]
