"""Federated averaging as pure functions over named NumPy tensors.

Updates are folded into a running weighted sum as they arrive, so memory is one model's worth whatever the
number of clients, and the round is finished moments after its last update.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from fedge.codec import Tensors


@dataclass
class RunningSum:
    sums: dict[str, np.ndarray]
    weight: float = 0.0
    count: int = 0
    _scratch: dict[str, np.ndarray] = field(default_factory=dict, repr=False)


def start(template: Tensors) -> RunningSum:
    """An empty sum shaped like ``template``; float64 so that hundreds of folds lose no precision."""
    return RunningSum(sums={name: np.zeros(t.shape, dtype=np.float64) for name, t in template.items()})


def fold(acc: RunningSum, tensors: Tensors, weight: float) -> None:
    """Add ``weight * tensors`` to the sum in place (no per-update allocation)."""
    for name, total in acc.sums.items():
        scratch = acc._scratch.setdefault(name, np.empty_like(total))
        np.multiply(tensors[name], weight, out=scratch, casting="unsafe")
        total += scratch
    acc.weight += weight
    acc.count += 1


def average(acc: RunningSum, template: Tensors) -> Tensors:
    """The weighted mean, in the dtypes of ``template`` (the global model)."""
    if acc.weight <= 0:
        raise ValueError("cannot average an empty sum")
    return {name: (total / acc.weight).astype(template[name].dtype) for name, total in acc.sums.items()}


def staleness_weight(staleness: int, exponent: float) -> float:
    """FedBuff's polynomial discount, ``(1 + staleness) ** -exponent``: fresh updates count fully."""
    return float((1 + staleness) ** -exponent)


def rebase(update: Tensors, base: Tensors, current: Tensors, discount: float) -> Tensors:
    """An update trained from an older ``base``, as if trained from ``current``: its change, discounted,
    applied to the current model. Folding these keeps FedAvg's running sum: fresh updates come out as
    themselves, and the mean is ``current + sum(n * discount * change) / sum(n)``."""
    return {
        name: current[name] + discount * (update[name].astype(np.float64) - base[name]) for name in current
    }
