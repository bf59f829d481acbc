"""FedAvg folded update by update must equal Flower's reference ``aggregate`` over all updates at once."""

from __future__ import annotations

import numpy as np
import pytest
from flwr.server.strategy.aggregate import aggregate
from hypothesis import given, settings
from hypothesis import strategies as st

from fedge.server import aggregation


@settings(max_examples=40, deadline=None)
@given(
    clients=st.integers(1, 12),
    weights=st.lists(st.integers(1, 5000), min_size=12, max_size=12),
    seed=st.integers(0, 2**32 - 1),
)
def test_streaming_fedavg_matches_flower_aggregate(clients: int, weights: list[int], seed: int) -> None:
    rng = np.random.default_rng(seed)
    template = {"conv.weight": np.zeros((3, 2, 2), np.float32), "fc.bias": np.zeros(5, np.float32)}
    updates = [
        {k: rng.normal(size=v.shape).astype(np.float32) for k, v in template.items()} for _ in range(clients)
    ]

    acc = aggregation.start(template)
    for update, weight in zip(updates, weights, strict=False):
        aggregation.fold(acc, update, float(weight))
    ours = aggregation.average(acc, template)

    reference = aggregate([(list(u.values()), w) for u, w in zip(updates, weights, strict=False)])
    for mine, theirs in zip(ours.values(), reference, strict=True):
        np.testing.assert_allclose(mine, theirs, rtol=1e-5, atol=1e-6)
    assert all(ours[k].dtype == template[k].dtype for k in template)


def test_fold_keeps_one_model_of_memory_whatever_the_number_of_updates() -> None:
    template = {"w": np.zeros(1000, np.float32)}
    acc = aggregation.start(template)
    aggregation.fold(acc, {"w": np.ones(1000, np.float32)}, 1.0)
    buffers = {id(a) for a in (*acc.sums.values(), *acc._scratch.values())}
    for _ in range(50):
        aggregation.fold(acc, {"w": np.ones(1000, np.float32)}, 2.0)
    assert {id(a) for a in (*acc.sums.values(), *acc._scratch.values())} == buffers
    assert acc.count == 51
    np.testing.assert_allclose(aggregation.average(acc, template)["w"], 1.0)


def test_average_of_nothing_is_an_error() -> None:
    with pytest.raises(ValueError, match="empty"):
        aggregation.average(aggregation.start({"w": np.zeros(2, np.float32)}), {"w": np.zeros(2, np.float32)})
