"""Checks an update must pass before it is stored: nothing malformed or mismatched reaches the aggregate."""

from __future__ import annotations

import numpy as np

from fedge.codec import Tensors, signature_of
from fedge.server.errors import Rejected


def check_tensors(tensors: Tensors, expected: dict[str, tuple[str, list[int]]]) -> None:
    """Raise ``Rejected`` unless the tensors are the model's names, dtypes and shapes, all finite."""
    got = signature_of(tensors)
    if got != expected:
        raise Rejected("tensor_mismatch", _mismatch(got, expected))
    for name, t in tensors.items():
        if not np.isfinite(t).all():
            raise Rejected("non_finite", f"tensor {name!r} holds NaN or Inf")


def update_norm(tensors: Tensors, reference: Tensors) -> float:
    """L2 distance between an update and the global model it was trained from, over all tensors."""
    return float(np.sqrt(sum(np.sum((tensors[n].astype(np.float64) - reference[n]) ** 2) for n in reference)))


def check_norm(tensors: Tensors, reference: Tensors, bound: float) -> None:
    """Bound how far one client can move the model: a crude but cheap limit on a poisoned update."""
    distance = update_norm(tensors, reference)
    if distance > bound:
        raise Rejected(
            "norm_too_large",
            f"the update is {distance:.4g} from the global model, over the bound {bound:g}",
        )


def _mismatch(got: dict[str, tuple[str, list[int]]], expected: dict[str, tuple[str, list[int]]]) -> str:
    missing = sorted(expected.keys() - got.keys())
    extra = sorted(got.keys() - expected.keys())
    if missing or extra:
        return f"tensor names differ from the global model: missing {missing[:5]}, unexpected {extra[:5]}"
    name = next(n for n in expected if got[n] != expected[n])
    (dtype, shape), (want_dtype, want_shape) = got[name], expected[name]
    return f"tensor {name!r} is {dtype}{shape}, the global model has {want_dtype}{want_shape}"
