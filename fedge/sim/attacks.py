"""Model poisoning, so that robust aggregation can be seen working: what a malicious client sends instead of
its honest update. Pure functions of the global model and the honestly trained one.

- ``sign-flip``: walk the other way, ``scale`` times as far (w = g - scale * (t - g));
- ``scale``: walk the same way, ``scale`` times as far (w = g + scale * (t - g));
- ``noise``: send Gaussian noise around the global model, ``scale`` times the spread of the honest change.
"""

from __future__ import annotations

import numpy as np

from fedge.codec import Tensors

KINDS = ("sign-flip", "scale", "noise")


def poison(kind: str, trained: Tensors, base: Tensors, scale: float, rng: np.random.Generator) -> Tensors:
    if kind not in KINDS:
        raise ValueError(f"unknown attack {kind!r}: choose from {', '.join(KINDS)}")
    poisoned: Tensors = {}
    for name, t in trained.items():
        g = base[name].astype(np.float64)
        delta = t.astype(np.float64) - g
        if kind == "sign-flip":
            w = g - scale * delta
        elif kind == "scale":
            w = g + scale * delta
        else:
            w = g + rng.normal(0.0, scale * (float(delta.std()) or 1e-3), t.shape)
        poisoned[name] = w.astype(t.dtype)
    return poisoned
