"""What a simulated federation reports: a row per round, and the run's totals (``metrics.json``)."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from typing import Any

from fedge.sim.fleet import Outcome


@dataclass
class RoundMetrics:
    round: int
    accuracy: float | None  # None: the app reports no accuracy
    loss: float
    updates: int
    seconds: float
    bytes_up: int
    bytes_down: int
    ended: float  # Unix time when the round's evaluation finished
    stale_updates: int = 0  # asynchronous mode: updates folded from an older version
    train_metrics: dict[str, float] = field(default_factory=dict)  # the clients' fit metrics, aggregated
    evaluate_metrics: dict[str, float] = field(default_factory=dict)  # the evaluation's, aggregated
    cost: float | None = None  # what the server billed the round's updates at its --prices
    # Federated evaluation (--fraction-evaluate): the asked clients' figures on their own held-out shares,
    # as the server combined and stored them, beside the central ones above.
    federated_accuracy: float | None = None
    federated_loss: float | None = None
    federated_examples: int = 0


@dataclass
class Report:
    settings: dict
    rounds: list[RoundMetrics] = field(default_factory=list)
    seconds: float = 0.0
    cold_invocations: int = 0
    warm_invocations: int = 0
    attackers: list[str] = field(default_factory=list)
    stragglers: list[str] = field(default_factory=list)
    refused: dict[str, int] = field(default_factory=dict)  # updates the server refused, by error code
    model_metadata: dict[str, str] = field(default_factory=dict)  # e.g. the privacy spent (dp-fedavg)
    asked: int = 0  # updates asked for: the selected clients of every round
    arrived: int = 0  # updates the server took before their round closed
    placements: dict[str, int] = field(default_factory=dict)  # client-rounds by where they ran
    raw_bytes_offloaded: int = 0  # raw training data that left devices, sealed to the executor
    oracle_agreement: float | None = None  # share of placements the oracle would have made the same
    agreements: list[bool] = field(default_factory=list, repr=False)
    client_placements: dict[str, dict[str, int]] = field(default_factory=dict)  # client -> where -> rounds
    client_raw_bytes: dict[str, int] = field(default_factory=dict)  # client -> raw data it offloaded
    nodes: dict[str, int] = field(default_factory=dict)  # with --backend ray: invocations per Ray node
    cost: float | None = None  # the run's bill: every round's, at the server's --prices
    usage: dict[str, float] = field(default_factory=dict)  # what the bill is made of, summed over the run

    @property
    def completion_rate(self) -> float | None:
        return self.arrived / self.asked if self.asked else None

    def count(self, outcome: Outcome) -> None:
        self.asked += 1
        self.arrived += outcome.accepted
        self.placements[outcome.where] = self.placements.get(outcome.where, 0) + 1
        mine = self.client_placements.setdefault(outcome.client, {})
        mine[outcome.where] = mine.get(outcome.where, 0) + 1
        self.raw_bytes_offloaded += outcome.raw_bytes
        self.client_raw_bytes[outcome.client] = (
            self.client_raw_bytes.get(outcome.client, 0) + outcome.raw_bytes
        )
        if outcome.refused is not None:
            self.refused[outcome.refused] = self.refused.get(outcome.refused, 0) + 1
        if outcome.agrees is not None:
            self.agreements.append(outcome.agrees)
            self.oracle_agreement = sum(self.agreements) / len(self.agreements)

    def bill(self, rounds: list[dict[str, Any]]) -> None:
        """Each round's cost and usage as the server billed them (its overview's ``rounds``), and the run's
        totals."""
        by_round = {int(r["round"]): r for r in rounds}
        for row in self.rounds:
            if (billed := by_round.get(row.round)) is not None:
                row.cost = float(billed["cost"])
        self.cost = sum(float(r["cost"]) for r in rounds)
        usage: dict[str, float] = {}
        for r in rounds:
            for name, value in r["usage"].items():
                usage[name] = usage.get(name, 0) + value
        self.usage = usage

    def live(self) -> dict[str, Any]:
        """What the dashboard adds to the server's view while the run goes on (``server.dashboard``): each
        round's evaluation, and per device where it trained and the raw data it offloaded. Read from another
        thread than the one that records: every collection is copied whole before it is read."""
        rounds = list(self.rounds)
        placements = dict(self.client_placements)
        raw = dict(self.client_raw_bytes)
        return {
            "evaluations": [{"round": r.round, "accuracy": r.accuracy, "loss": r.loss} for r in rounds],
            "clients": {
                c: {"placements": dict(where), "raw_bytes_offloaded": raw.get(c)}
                for c, where in placements.items()
            },
        }

    def to_json(self) -> str:
        fields = asdict(self)
        del fields["agreements"]
        return json.dumps({**fields, "completion_rate": self.completion_rate}, indent=2, default=str)
