"""Federated evaluation, the decisions and the maths: which rounds' models are scored by clients, which
clients are asked, and what their reports add up to. Pure functions; ``server.rounds`` applies them.

After a round produces a model, a ``fraction_evaluate`` share of the clients that may be selected is asked
(in the round announcement, ``RoundInfo.evaluate``) to score it on their own held-out data, as Flower's
``fraction_evaluate`` does; every ``evaluate_every`` rounds, and always the last. Their figures combine
as Flower's FedAvg combines them: the loss weighted by examples, each metric averaged over the clients that
report it, weighted by theirs.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from fedge.edge_functions.app import weighted_mean
from fedge.server.schedule import select

SOURCE = "federated"  # the evaluations row and the metrics' label these figures go under
_SEED_OFFSET = 7919  # evaluators are drawn apart from the round's trainers, reproducibly


@dataclass(frozen=True)
class Combined:
    loss: float
    examples: int
    metrics: dict[str, float]

    @property
    def accuracy(self) -> float | None:
        """The ``accuracy`` metric, or None where the app reports none."""
        return self.metrics.get("accuracy")


def due(round_: int, every: int, last_round: int) -> bool:
    """Whether the model of ``round_`` is scored by clients: every ``every`` rounds, and the final one."""
    return round_ % every == 0 or round_ == last_round


def evaluators(clients: Sequence[str], round_: int, fraction: float, seed: int) -> list[str]:
    """The clients asked: ``max(ceil(fraction * n), 1)`` of the sorted ``clients``, none at fraction 0."""
    if fraction <= 0 or not clients:
        return []
    return select(clients, round_, fraction, 1, seed + _SEED_OFFSET)


def combine(reports: Mapping[str, tuple[float, int, Mapping[str, float]]]) -> Combined:
    """What the clients' reports (client -> (loss, examples, metrics)) say of the model, together."""
    examples = sum(n for _, n, _ in reports.values())
    loss = sum(loss * n for loss, n, _ in reports.values()) / examples
    return Combined(loss, examples, weighted_mean([(n, m) for _, n, m in reports.values()]))
