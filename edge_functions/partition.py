"""How a data set is split across simulated clients: pure functions of the labels and a seed."""

from __future__ import annotations

import re

import numpy as np


class PartitionError(ValueError):
    """The partition spec is not one we know."""


def parse(spec: str) -> tuple[str, float | None]:
    """``iid``, ``dirichlet:ALPHA`` (ALPHA > 0; smaller is more skewed), or ``natural`` (one natural owner
    of the data per client, such as a role of a play, where the data set has them)."""
    if spec in ("iid", "natural"):
        return spec, None
    match = re.fullmatch(r"dirichlet:([0-9]*\.?[0-9]+)", spec)
    if match and float(match.group(1)) > 0:
        return "dirichlet", float(match.group(1))
    raise PartitionError(
        f"unknown partition {spec!r}: use 'iid', 'natural' or 'dirichlet:ALPHA' with ALPHA > 0"
    )


def split(
    labels: np.ndarray, num_clients: int, spec: str, seed: int, groups: np.ndarray | None = None
) -> list[np.ndarray]:
    """Indices of each client's examples; every client gets at least one example."""
    kind, alpha = parse(spec)
    if num_clients > len(labels):
        raise PartitionError(f"{num_clients} clients but only {len(labels)} examples")
    rng = np.random.default_rng(seed)
    if kind == "iid":
        return [np.sort(part) for part in np.array_split(rng.permutation(len(labels)), num_clients)]
    if kind == "natural":
        return natural(groups, num_clients, rng)
    assert alpha is not None
    return dirichlet(labels, num_clients, alpha, rng)


def natural(groups: np.ndarray | None, num_clients: int, rng: np.random.Generator) -> list[np.ndarray]:
    """Each client is one natural owner (LEAF's setting), drawn at random among the data set's owners."""
    if groups is None:
        raise PartitionError("this data set has no natural owners: use 'iid' or 'dirichlet:ALPHA'")
    owners = np.unique(groups)
    if num_clients > len(owners):
        raise PartitionError(f"{num_clients} clients but the data set has only {len(owners)} natural owners")
    return [np.flatnonzero(groups == owner) for owner in rng.choice(owners, num_clients, replace=False)]


def dirichlet(
    labels: np.ndarray, num_clients: int, alpha: float, rng: np.random.Generator
) -> list[np.ndarray]:
    """Label skew as in Hsu et al. 2019 (and Flower Datasets' DirichletPartitioner): for each class, its
    examples are shared among clients in proportions drawn from Dir(alpha). Empty clients are refilled from
    the largest ones so that nobody trains on nothing."""
    parts: list[list[int]] = [[] for _ in range(num_clients)]
    for label in np.unique(labels):
        members = rng.permutation(np.flatnonzero(labels == label))
        shares = rng.dirichlet(np.full(num_clients, alpha))
        cuts = (np.cumsum(shares)[:-1] * len(members)).astype(int)
        for client, chunk in enumerate(np.split(members, cuts)):
            parts[client].extend(chunk.tolist())
    for client in range(num_clients):
        while not parts[client]:
            donor = max(range(num_clients), key=lambda c: len(parts[c]))
            parts[client].append(parts[donor].pop())
    return [np.sort(np.array(p, dtype=np.int64)) for p in parts]


class Splits:
    """The splits one worker has made, keyed by what decides them and never by the client: a worker that
    serves many clients of one federation splits the data set once, not once per client (that made a
    round of N clients cost O(N²) in the workers)."""

    def __init__(self) -> None:
        self._made: dict[tuple[str, int, str, int], list[np.ndarray]] = {}

    def share(
        self, name: str, labels: np.ndarray, num_clients: int, spec: str, seed: int, index: int,
        groups: np.ndarray | None = None,
    ) -> np.ndarray:  # fmt: skip
        """Indices of client ``index``'s examples of data set ``name`` (whose ``labels`` and ``groups``)."""
        key = (name, num_clients, spec, seed)
        if key not in self._made:
            self._made[key] = split(labels, num_clients, spec, seed, groups)
        return self._made[key][index]

    def __len__(self) -> int:
        return len(self._made)
