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
    """Add ``weight * tensors`` to the sum in place (no per-update allocation). The product is taken in the
    update's own precision (at least float32) and only the sum in float64: a quarter less memory traffic
    than a float64 product, and the rounding that matters, over hundreds of additions, stays float64."""
    for name, total in acc.sums.items():
        x = tensors[name]
        scratch = acc._scratch.get(name)
        if scratch is None:
            scratch = acc._scratch[name] = np.empty(total.shape, np.promote_types(x.dtype, np.float32))
        np.multiply(x, weight, out=scratch, casting="unsafe")
        total += scratch
    acc.weight += weight
    acc.count += 1


def average(acc: RunningSum, template: Tensors) -> Tensors:
    """The weighted mean, in the dtypes of ``template`` (the global model)."""
    if acc.weight <= 0:
        raise ValueError("cannot average an empty sum")
    scale = 1.0 / acc.weight
    mean: Tensors = {}
    for name, total in acc.sums.items():  # one pass each, straight into the model's dtype
        mean[name] = np.empty(total.shape, template[name].dtype)
        np.multiply(total, scale, out=mean[name], casting="unsafe")
    return mean


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
