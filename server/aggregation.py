"""Federated averaging as pure functions over named NumPy tensors.

Updates are folded into a running weighted sum as they arrive, so memory is one model's worth whatever the
number of clients, and the round is finished moments after its last update.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from fedge.codec import Tensors

_BLOCK = 1 << 15  # elements per step of a fold: its scratch (128-256 KiB) stays in the core's L2 cache


@dataclass
class RunningSum:
    sums: dict[str, np.ndarray]
    weight: float = 0.0
    count: int = 0
    _scratch: dict[np.dtype, np.ndarray] = field(default_factory=dict, repr=False)


def start(template: Tensors) -> RunningSum:
    """An empty sum shaped like ``template``; float64 so that hundreds of folds lose no precision."""
    return RunningSum(sums={name: np.zeros(t.shape, dtype=np.float64) for name, t in template.items()})


def fold(acc: RunningSum, tensors: Tensors, weight: float) -> None:
    """Add ``weight * tensors`` to the sum in place (no per-update allocation). The product is taken in the
    update's own precision (at least float32) and only the sum in float64: a quarter less memory traffic
    than a float64 product, and the rounding that matters, over hundreds of additions, stays float64. It
    goes a cache-sized block at a time, so the product never travels to memory and back: each element costs
    only the read of the update and the read and write of the sum."""
    for name, total in acc.sums.items():
        x = tensors[name].reshape(-1)
        flat = total.reshape(-1)
        kind = np.promote_types(x.dtype, np.float32)
        scratch = acc._scratch.get(kind)
        if scratch is None:
            scratch = acc._scratch[kind] = np.empty(_BLOCK, kind)
        for begin in range(0, flat.size, _BLOCK):
            part = flat[begin : begin + _BLOCK]
            product = scratch[: part.size]
            np.multiply(x[begin : begin + _BLOCK], weight, out=product, casting="unsafe")
            np.add(part, product, out=part)
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
