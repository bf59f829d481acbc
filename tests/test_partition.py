"""Partitions give every example to exactly one client and every client at least one example."""

from __future__ import annotations

import numpy as np
import pytest

from fedge.edge_functions.partition import PartitionError, Splits, parse, split

LABELS = np.repeat(np.arange(10), 100)


@pytest.mark.parametrize("spec", ["iid", "dirichlet:0.5", "dirichlet:0.05", "dirichlet:100"])
def test_every_example_goes_to_exactly_one_client(spec: str) -> None:
    parts = split(LABELS, 10, spec, seed=1)
    assert len(parts) == 10
    assert all(len(p) > 0 for p in parts)
    np.testing.assert_array_equal(np.sort(np.concatenate(parts)), np.arange(len(LABELS)))


def test_same_seed_same_partition_other_seed_other_partition() -> None:
    first, again, other = (split(LABELS, 5, "dirichlet:0.5", seed=s) for s in (3, 3, 4))
    assert all(np.array_equal(a, b) for a, b in zip(first, again, strict=True))
    assert not all(np.array_equal(a, b) for a, b in zip(first, other, strict=True))


def test_small_alpha_skews_labels_more_than_iid() -> None:
    def mean_classes(spec: str) -> float:
        return float(np.mean([len(np.unique(LABELS[p])) for p in split(LABELS, 10, spec, seed=0)]))

    assert mean_classes("dirichlet:0.1") < 5 < mean_classes("iid") == 10


@pytest.mark.parametrize("spec", ["dirichlet", "dirichlet:0", "dirichlet:-1", "shards", "iid:2"])
def test_unknown_specs_are_refused(spec: str) -> None:
    with pytest.raises(PartitionError):
        parse(spec)


def test_more_clients_than_examples_is_refused() -> None:
    with pytest.raises(PartitionError, match="examples"):
        split(np.arange(3), 4, "iid", seed=0)


def test_natural_partition_gives_each_client_one_whole_owner() -> None:
    groups = np.repeat(np.arange(8), [5, 1, 7, 3, 9, 2, 4, 6])
    parts = split(np.zeros(len(groups)), 5, "natural", seed=0, groups=groups)
    owners = [set(groups[p].tolist()) for p in parts]
    assert all(len(o) == 1 for o in owners)
    assert len(set.union(*owners)) == 5
    for part, (owner,) in zip(parts, owners, strict=True):
        np.testing.assert_array_equal(part, np.flatnonzero(groups == owner))


def test_natural_partition_needs_owners_and_enough_of_them() -> None:
    with pytest.raises(PartitionError, match="no natural owners"):
        split(LABELS, 3, "natural", seed=0)
    with pytest.raises(PartitionError, match="only 2 natural owners"):
        split(np.zeros(10), 3, "natural", seed=0, groups=np.repeat([0, 1], 5))


def test_a_worker_splits_once_for_all_the_clients_it_serves() -> None:
    splits = Splits()
    shares = [splits.share("labels", LABELS, 50, "dirichlet:0.5", 7, index) for index in range(50)]
    assert len(splits) == 1
    expected = split(LABELS, 50, "dirichlet:0.5", seed=7)
    assert all(np.array_equal(a, b) for a, b in zip(shares, expected, strict=True))
    splits.share("labels", LABELS, 50, "dirichlet:0.5", 8, 0)  # another seed is another split
    assert len(splits) == 2
