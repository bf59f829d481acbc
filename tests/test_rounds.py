"""The round state machine on a real store, without a server: who may write what, and what it produces."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from conftest import toy_model, update_body

from fedge.codec import decode, encode
from fedge.server.errors import Rejected
from fedge.server.rounds import Action, Federation, FederationSettings, decide
from fedge.server.store import Store
from fedge.wire import RoundState

SELECTED = ["alice", "bob", "carol"]
WRONG_SHAPE = {**toy_model(), "layer.weight": np.zeros((3, 4), np.float32)}
EXTRA_TENSOR = {**toy_model(), "extra": np.zeros(1, np.float32)}
WRONG_DTYPE = {name: t.astype(np.float64) for name, t in toy_model().items()}


def federation(data: Path, rounds: int = 3, **settings: object) -> Federation:
    return Federation(
        Store(data),
        FederationSettings(federation="test", task="toy", rounds=rounds, **settings),  # type: ignore[arg-type]
        registered_clients=lambda: SELECTED,
        initial_model=encode(toy_model()),
    )


@pytest.mark.parametrize(
    ("updates", "now", "expected"),
    [(3, 0.0, Action.AGGREGATE), (2, 0.0, Action.WAIT), (2, 10.0, Action.AGGREGATE), (0, 10.0, Action.FAIL)],
)
def test_a_round_closes_when_all_report_or_at_the_deadline_with_a_quorum(
    updates: int, now: float, expected: Action
) -> None:
    assert decide(updates, selected=3, min_updates=1, now=now, deadline=5.0) is expected


def test_a_round_averages_the_updates_weighted_by_examples(tmp_path: Path) -> None:
    fed = federation(tmp_path)
    fed.tick()
    assert fed.round_info().state is RoundState.OPEN
    for client, value, examples in [("alice", 1.0, 10), ("bob", 2.0, 30), ("carol", 4.0, 60)]:
        fed.submit(1, client, update_body(value, examples))
    expected = (1.0 * 10 + 2.0 * 30 + 4.0 * 60) / 100
    np.testing.assert_allclose(fed.model.tensors["layer.weight"], expected, rtol=1e-6)
    assert fed.model.round == 1
    assert fed.round_info().round == 2


@pytest.mark.parametrize(
    ("round_", "client", "body", "status", "code"),
    [
        (2, "alice", update_body(1.0), 409, "round_not_open"),
        (0, "alice", update_body(1.0), 409, "round_closed"),
        (1, "mallory", update_body(1.0), 403, "not_selected"),
        (1, "alice", b"\x00" * 64, 400, "malformed_update"),
        (1, "alice", encode(toy_model(1.0)), 400, "bad_metadata"),
        (1, "alice", update_body(1.0, num_examples=0), 400, "bad_metadata"),
        (1, "alice", update_body(np.nan), 422, "non_finite"),
        (1, "alice", update_body(0, model=WRONG_SHAPE), 422, "tensor_mismatch"),
        (1, "alice", update_body(0, model=EXTRA_TENSOR), 422, "tensor_mismatch"),
        (1, "alice", update_body(0, model=WRONG_DTYPE), 422, "tensor_mismatch"),
    ],
    ids=["future-round", "past-round", "not-selected", "garbage", "no-metadata", "zero-examples", "nan",
         "shape", "extra-tensor", "dtype"],
)  # fmt: skip
def test_a_refused_update_leaves_store_and_aggregate_untouched(
    tmp_path: Path, round_: int, client: str, body: bytes, status: int, code: str
) -> None:
    fed = federation(tmp_path)
    fed.tick()
    before = fed.model.sha256
    with pytest.raises(Rejected) as refused:
        fed.submit(round_, client, body)
    assert (refused.value.status, refused.value.code) == (status, code)
    assert Store(tmp_path).updates(1) == []
    # The refused update must not have been folded in: the round's result is the clean average.
    for name in SELECTED:
        fed.submit(1, name, update_body(2.0))
    assert fed.model.sha256 != before
    np.testing.assert_allclose(fed.model.tensors["layer.bias"], 2.0)


def test_a_second_update_from_the_same_client_is_refused(tmp_path: Path) -> None:
    fed = federation(tmp_path)
    fed.tick()
    fed.submit(1, "alice", update_body(1.0))
    with pytest.raises(Rejected) as refused:
        fed.submit(1, "alice", update_body(100.0))
    assert refused.value.code == "duplicate_update"
    fed.submit(1, "bob", update_body(1.0))
    fed.submit(1, "carol", update_body(1.0))
    np.testing.assert_allclose(fed.model.tensors["layer.bias"], 1.0)


def test_a_restarted_federation_resumes_the_open_round_with_every_accepted_update(tmp_path: Path) -> None:
    uninterrupted = federation(tmp_path / "a")
    uninterrupted.tick()
    crashed = federation(tmp_path / "b")
    crashed.tick()
    for fed in (uninterrupted, crashed):
        fed.submit(1, "alice", update_body(1.0, 10))
        fed.submit(1, "bob", update_body(3.0, 20))
    del crashed  # the process dies here; only what is on disk survives
    resumed = federation(tmp_path / "b")
    assert resumed.round_info().round == 1
    assert resumed.round_info().state is RoundState.OPEN
    for fed in (uninterrupted, resumed):
        fed.submit(1, "carol", update_body(5.0, 30))
    assert resumed.model.sha256 == uninterrupted.model.sha256
    with pytest.raises(Rejected):
        resumed.submit(1, "alice", update_body(1.0))


def test_an_overdue_round_without_quorum_fails_and_the_next_keeps_the_model(tmp_path: Path) -> None:
    fed = federation(tmp_path, round_timeout=5.0, min_updates=2)
    fed.tick(now=1000.0)
    before = fed.model.sha256
    fed.tick(now=10**10)
    assert Store(tmp_path).round(1).state == "failed"  # type: ignore[union-attr]
    info = fed.round_info()
    assert (info.round, info.state, info.model_sha256) == (2, RoundState.OPEN, before)


def test_the_federation_finishes_after_its_rounds(tmp_path: Path) -> None:
    fed = federation(tmp_path, rounds=2)
    fed.tick()
    for round_ in (1, 2):
        for client in SELECTED:
            fed.submit(round_, client, update_body(float(round_)))
    assert fed.round_info().state is RoundState.FINISHED
    assert decode(fed.model.body)[1]["round"] == "2"
    with pytest.raises(Rejected, match="round_not_open"):
        fed.submit(3, "alice", update_body(1.0))
