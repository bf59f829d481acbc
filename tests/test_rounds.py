"""The round state machine on a real store, without a server: who may write what, and what it produces."""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import pytest
from conftest import submit, toy_model, update_body

from fedge.codec import decode, encode
from fedge.server.errors import Rejected
from fedge.server.rounds import Action, Federation, FederationSettings, decide, select
from fedge.server.store import Store
from fedge.server.strategies import create
from fedge.server.strategies.dp import gaussian_epsilon
from fedge.wire import RoundState, TrainConfig

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


@pytest.mark.parametrize(
    ("updates", "skipped", "min_updates", "now", "expected"),
    [
        (1, 2, 1, 0.0, Action.AGGREGATE),  # everyone reported, a quorum of updates: no need to wait
        (0, 3, 1, 0.0, Action.FAIL),  # everyone skipped: nothing left to wait for
        (1, 2, 2, 0.0, Action.FAIL),  # too few updates left to reach the quorum
        (2, 1, 2, 0.0, Action.AGGREGATE),
        (1, 1, 1, 0.0, Action.WAIT),  # one client still owes its report
        (0, 2, 1, 0.0, Action.WAIT),
        (1, 1, 1, 10.0, Action.AGGREGATE),  # the deadline rule is unchanged
        (0, 2, 1, 10.0, Action.FAIL),
    ],
)
def test_a_round_closes_once_every_selected_client_sent_an_update_or_skipped(
    updates: int, skipped: int, min_updates: int, now: float, expected: Action
) -> None:
    assert decide(updates, 3, min_updates, now, deadline=5.0, skipped=skipped) is expected


def test_a_round_averages_the_updates_weighted_by_examples(tmp_path: Path) -> None:
    fed = federation(tmp_path)
    fed.tick()
    assert fed.round_info().state is RoundState.OPEN
    for client, value, examples in [("alice", 1.0, 10), ("bob", 2.0, 30), ("carol", 4.0, 60)]:
        submit(fed, 1, client, update_body(value, examples))
    expected = (1.0 * 10 + 2.0 * 30 + 4.0 * 60) / 100
    np.testing.assert_allclose(fed.model.tensors["layer.weight"], expected, rtol=1e-6)
    assert fed.model.round == 1
    assert fed.round_info().round == 2


def test_the_ledger_is_read_again_only_after_the_store_wrote(tmp_path: Path) -> None:
    fed = federation(tmp_path)
    fed.tick()
    first = fed.ledger()
    assert fed.ledger() is first  # nothing written: the rows read last time stand
    submit(fed, 1, "alice", update_body(1.0))
    after = fed.ledger()
    assert after is not first
    assert [(u.round, u.client) for u in after.updates] == [(1, "alice")]
    fed.skip(1, "bob", "battery low")
    assert [(s.client, s.reason) for s in fed.ledger().skips] == [("bob", "battery low")]


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
        submit(fed, round_, client, body)
    assert (refused.value.status, refused.value.code) == (status, code)
    assert Store(tmp_path).updates(1) == []
    # The refused update must not have been folded in: the round's result is the clean average.
    for name in SELECTED:
        submit(fed, 1, name, update_body(2.0))
    assert fed.model.sha256 != before
    np.testing.assert_allclose(fed.model.tensors["layer.bias"], 2.0)


def test_a_second_update_from_the_same_client_is_refused(tmp_path: Path) -> None:
    fed = federation(tmp_path)
    fed.tick()
    submit(fed, 1, "alice", update_body(1.0))
    with pytest.raises(Rejected) as refused:
        submit(fed, 1, "alice", update_body(100.0))
    assert refused.value.code == "duplicate_update"
    submit(fed, 1, "bob", update_body(1.0))
    submit(fed, 1, "carol", update_body(1.0))
    np.testing.assert_allclose(fed.model.tensors["layer.bias"], 1.0)


def test_a_restarted_federation_resumes_the_open_round_with_every_accepted_update(tmp_path: Path) -> None:
    uninterrupted = federation(tmp_path / "a")
    uninterrupted.tick()
    crashed = federation(tmp_path / "b")
    crashed.tick()
    for fed in (uninterrupted, crashed):
        submit(fed, 1, "alice", update_body(1.0, 10))
        submit(fed, 1, "bob", update_body(3.0, 20))
    del crashed  # the process dies here; only what is on disk survives
    resumed = federation(tmp_path / "b")
    assert resumed.round_info().round == 1
    assert resumed.round_info().state is RoundState.OPEN
    for fed in (uninterrupted, resumed):
        submit(fed, 1, "carol", update_body(5.0, 30))
    assert resumed.model.sha256 == uninterrupted.model.sha256
    with pytest.raises(Rejected):
        submit(resumed, 1, "alice", update_body(1.0))


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
            submit(fed, round_, client, update_body(float(round_)))
    assert fed.round_info().state is RoundState.FINISHED
    assert decode(fed.model.body)[1]["round"] == "2"
    with pytest.raises(Rejected, match="round_not_open"):
        submit(fed, 3, "alice", update_body(1.0))


def strategy_federation(data: Path, name: str, clients: list[str], **params: object) -> Federation:
    return Federation(
        Store(data),
        FederationSettings(federation="test", task="toy", rounds=3),
        registered_clients=lambda: clients,
        initial_model=encode(toy_model()),
        strategy=create(name, params),
    )


def test_a_server_optimizer_keeps_its_moments_across_a_restart(tmp_path: Path) -> None:
    uninterrupted = strategy_federation(tmp_path / "a", "fedadam", SELECTED)
    restarted = strategy_federation(tmp_path / "b", "fedadam", SELECTED)
    for round_ in (1, 2):
        if round_ == 2:
            restarted = strategy_federation(tmp_path / "b", "fedadam", SELECTED)
        for fed in (uninterrupted, restarted):
            fed.tick()
            for value, client in enumerate(SELECTED):
                submit(fed, round_, client, update_body(value + round_, 10 * (value + 1)))
    assert restarted.model.round == 2
    assert restarted.model.sha256 == uninterrupted.model.sha256


def test_trimmed_mean_reads_the_stored_updates_and_ignores_an_outlier(tmp_path: Path) -> None:
    clients = ["alice", "bob", "carol", "dave", "erin"]
    fed = strategy_federation(tmp_path, "trimmed-mean", clients, trim_fraction=0.2)
    fed.tick()
    for client, value in zip(clients, [1.0, 2.0, 3.0, 4.0, 1000.0], strict=True):
        submit(fed, 1, client, update_body(value))
    np.testing.assert_allclose(fed.model.tensors["layer.weight"], 3.0)  # mean of 2, 3, 4
    assert fed.model.round == 1


def test_a_round_waits_for_as_many_clients_as_bulyan_needs(tmp_path: Path) -> None:
    clients = ["alice", "bob", "carol"]
    fed = strategy_federation(tmp_path, "bulyan", clients, malicious=1)
    fed.tick()
    assert fed.round_info().state is RoundState.WAITING
    clients += ["dave", "erin", "frank", "grace"]
    fed.tick()
    assert fed.round_info().state is RoundState.OPEN
    assert len(fed.round_info().selected) == 7


def test_dp_fedavg_writes_the_privacy_spent_into_the_model(tmp_path: Path) -> None:
    fed = strategy_federation(tmp_path, "dp-fedavg", SELECTED, clip_norm=1.0, noise_multiplier=2.0)
    fed.tick()
    for client in SELECTED:
        submit(fed, 1, client, update_body(100.0))
    metadata = decode(fed.model.body)[1]
    assert float(metadata["dp_epsilon"]) == pytest.approx(gaussian_epsilon(2.0, 1, 1e-5), rel=1e-5)
    # Every change was clipped to norm 1 before the mean: the model moved about 1 plus noise, not 100.
    assert np.abs(fed.model.tensors["layer.weight"]).max() < 10


def test_a_fraction_of_clients_is_selected_reproducibly_and_only_they_may_send(tmp_path: Path) -> None:
    clients = [f"c{i}" for i in range(10)]
    picks = []
    for run in ("a", "b"):
        fed = Federation(
            Store(tmp_path / run),
            FederationSettings(federation="test", task="toy", fraction=0.3, min_updates=2, seed=5),
            registered_clients=lambda: clients,
            initial_model=encode(toy_model()),
        )
        fed.tick()
        picks.append(fed.round_info().selected)
    assert picks[0] == picks[1]
    assert len(picks[0]) == 3
    outsider = next(c for c in clients if c not in picks[0])
    with pytest.raises(Rejected) as refused:
        submit(fed, 1, outsider, update_body(1.0))
    assert refused.value.code == "not_selected"
    assert len(select(clients, 1, 0.1, minimum=4, seed=0)) == 4
    assert len({tuple(select(clients, r, 0.3, 1, 0)) for r in range(1, 8)}) > 1  # rounds differ


def test_a_late_update_is_refused_as_round_closed_but_a_resend_of_a_counted_one_as_a_duplicate(
    tmp_path: Path,
) -> None:
    """Duplication is checked before lateness: a client whose first answer was lost learns that its
    update was delivered, not that the round closed."""
    fed = federation(tmp_path, round_timeout=5.0)
    fed.tick(now=time.time())
    for client in SELECTED:
        submit(fed, 1, client, update_body(1.0))
    with pytest.raises(Rejected) as refused:
        submit(fed, 1, "alice", update_body(1.0))
    assert (refused.value.status, refused.value.code) == (409, "duplicate_update")
    submit(fed, 2, "carol", update_body(1.0))
    fed.skip(2, "alice", "out of memory")
    fed.tick(now=time.time() + 3600)  # round 2 passes its deadline without a quorum; round 3 opens
    with pytest.raises(Rejected) as refused:
        submit(fed, 2, "bob", update_body(1.0))
    assert refused.value.code == "round_closed"
    with pytest.raises(Rejected) as refused:
        submit(fed, 2, "carol", update_body(1.0))
    assert refused.value.code == "duplicate_update"
    with pytest.raises(Rejected) as refused:
        fed.skip(2, "alice", "out of memory")
    assert refused.value.code == "already_skipped"
    assert [(r.record.round, r.reported, r.skipped) for r in Store(tmp_path).history()][:2] == [
        (1, SELECTED, {}),
        (2, ["carol"], {"alice": "out of memory"}),
    ]


def test_an_update_after_the_deadline_of_the_open_round_is_refused(tmp_path: Path) -> None:
    fed = federation(tmp_path, round_timeout=5.0)
    fed.tick(now=time.time() - 60)  # the round opened a minute ago; its deadline has passed
    with pytest.raises(Rejected) as refused:
        submit(fed, 1, "alice", update_body(1.0))
    assert (refused.value.code, refused.value.detail) == ("round_closed", "round 1 passed its deadline")
    assert Store(tmp_path).updates(1) == []


def test_a_resend_after_the_deadline_of_an_update_the_open_round_counted_is_a_duplicate(
    tmp_path: Path,
) -> None:
    fed = federation(tmp_path, round_timeout=2.0)
    fed.tick(now=time.time())
    submit(fed, 1, "alice", update_body(1.0))
    time.sleep(2.1)  # the deadline passes; no tick has closed the round yet
    with pytest.raises(Rejected) as refused:
        submit(fed, 1, "alice", update_body(1.0))
    assert refused.value.code == "duplicate_update"
    with pytest.raises(Rejected) as refused:
        submit(fed, 1, "bob", update_body(1.0))
    assert refused.value.code == "round_closed"


def async_federation(data: Path, clients: list[str], **settings: object) -> Federation:
    return Federation(
        Store(data),
        FederationSettings(federation="test", task="toy", rounds=5, buffer=2, **settings),  # type: ignore[arg-type]
        registered_clients=lambda: clients,
        initial_model=encode(toy_model()),
    )


def test_async_mode_makes_a_version_every_k_updates_and_folds_stragglers_discounted(tmp_path: Path) -> None:
    clients = ["alice", "bob", "carol"]
    fed = async_federation(tmp_path, clients)
    fed.tick()
    submit(fed, 1, "alice", update_body(1.0, 10))
    assert fed.model.round == 0
    submit(fed, 1, "bob", update_body(3.0, 30))
    assert fed.model.round == 1  # two updates made version 1, without waiting for carol
    version1 = fed.model.tensors["layer.weight"].copy()
    np.testing.assert_allclose(version1, 2.5)

    straggler = submit(fed, 1, "carol", update_body(9.0, 20))  # trained from version 0
    assert (straggler.round, straggler.staleness) == (2, 1)
    fresh = submit(fed, 2, "alice", update_body(4.0, 20))
    assert fresh.staleness == 0
    # FedBuff: carol's change from her base (9 - 0), discounted by (1 + 1) ** -0.5, applied to version 1.
    carol = 2.5 + 2**-0.5 * (9.0 - 0.0)
    np.testing.assert_allclose(fed.model.tensors["layer.weight"], (20 * carol + 20 * 4.0) / 40, rtol=1e-6)
    assert [(u.client, u.staleness) for u in Store(tmp_path).updates(2)] == [("carol", 1), ("alice", 0)]


def test_async_mode_uses_the_base_model_an_update_names(tmp_path: Path) -> None:
    fed = async_federation(tmp_path, ["alice", "bob", "carol"])
    fed.tick()
    submit(fed, 1, "alice", update_body(1.0))
    submit(fed, 1, "bob", update_body(1.0))
    base = fed.model.sha256  # version 1, the base of round 2
    body = encode(toy_model(5.0), {"num_examples": "10", "base_sha256": base})
    assert submit(fed, 1, "carol", body).staleness == 0  # asked for round 1, but trained from version 1
    unknown = encode(toy_model(5.0), {"num_examples": "10", "base_sha256": "0" * 64})
    with pytest.raises(Rejected) as refused:
        submit(fed, 2, "alice", unknown)
    assert refused.value.code == "too_stale"


def test_async_mode_refuses_updates_staler_than_the_limit(tmp_path: Path) -> None:
    fed = async_federation(tmp_path, ["alice", "bob", "carol"], max_staleness=1)
    fed.tick()
    for round_ in (1, 2):
        submit(fed, round_, "alice", update_body(1.0))
        submit(fed, round_, "bob", update_body(1.0))
    with pytest.raises(Rejected) as refused:
        submit(fed, 1, "carol", update_body(1.0))
    assert (refused.value.status, refused.value.code) == (409, "too_stale")
    assert Store(tmp_path).updates(3) == []


def test_a_restarted_async_federation_refolds_stale_updates_identically(tmp_path: Path) -> None:
    clients = ["alice", "bob", "carol"]
    feds = [async_federation(tmp_path / name, clients) for name in ("a", "b")]
    for fed in feds:
        fed.tick()
        submit(fed, 1, "alice", update_body(1.0))
        submit(fed, 1, "bob", update_body(2.0))
        submit(fed, 1, "carol", update_body(7.0, 30))  # stale, into round 2
    feds[1] = async_federation(tmp_path / "b", clients)  # crash and restart
    for fed in feds:
        submit(fed, 2, "bob", update_body(3.0))
    assert feds[0].model.round == feds[1].model.round == 2
    assert feds[1].model.sha256 == feds[0].model.sha256


def test_async_mode_refuses_a_strategy_that_needs_every_update(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="streaming"):
        Federation(
            Store(tmp_path),
            FederationSettings(federation="test", task="toy", buffer=2),
            registered_clients=lambda: SELECTED,
            initial_model=encode(toy_model()),
            strategy=create("fedmedian"),
        )


def test_a_choice_stored_with_every_strategys_knobs_still_loads(tmp_path: Path) -> None:
    """Before strategies declared their own parameters, a stored choice held all of them and the seed."""
    store = Store(tmp_path)
    every = {"proximal_mu": 0.0, "trim_fraction": 0.3, "malicious": 0, "keep": 0, "clip_norm": 1.0, "seed": 0}
    store.set_meta("strategy", json.dumps({"name": "trimmed-mean", "params": every}))
    fed = Federation(
        store,
        FederationSettings(federation="test", task="toy"),
        registered_clients=lambda: SELECTED,
        initial_model=encode(toy_model()),
    )
    assert (fed.strategy.name, fed.strategy.params.trim_fraction) == ("trimmed-mean", 0.3)


def test_the_store_hands_strategies_updates_memory_mapped_with_their_examples(tmp_path: Path) -> None:
    store = Store(tmp_path)
    store.open_round(1, "base", ["alice", "bob"], TrainConfig(), time.time() + 60)
    store.add_update(1, "alice", update_body(1.0, 10), 10)
    store.add_update(1, "bob", update_body(2.0, 30), 30)
    updates = store.update_tensors(1)
    assert len(updates) == 2
    (_, alice_examples), (bob, bob_examples) = updates[0], updates[1]
    assert (alice_examples, bob_examples) == (10, 30)
    assert isinstance(bob["layer.weight"].base, np.memmap)
    np.testing.assert_allclose(bob["layer.weight"], 2.0)
    assert [n for _, n in updates[:1]] == [10]
