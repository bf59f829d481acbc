"""Early skip notices: a selected client that cannot fit a round says so, and the round stops waiting for it.

Every test runs the real ``fedge server`` with a round timeout of an hour, so a round that closes within the
test closed because of the notices, not at its deadline.
"""

from __future__ import annotations

import sqlite3
import time
from pathlib import Path

import numpy as np
import pytest
from conftest import client_data, update_body, wait_for
from test_attacks import raw_client, refusal, state_of
from test_durability import rows
from test_offload_agent import STARVED
from test_service import open_round

from fedge.codec import decode
from fedge.security import pki
from fedge.server.launcher import ServerProcess
from fedge.transport import FedgeClient, ServerError
from fedge.wire import RoundState

HOUR = ("--round-timeout", "3600")
NEVER_FITS = ("--offload", "never", *STARVED)  # an agent that cannot train and may not offload: it skips


def skips_of(server: ServerProcess) -> list[tuple]:
    with sqlite3.connect(server.data / "state.db") as db:
        return db.execute("SELECT round, client, reason FROM skips ORDER BY round, client").fetchall()


def admin_rounds(server: ServerProcess, pki_root: Path) -> list[dict]:
    with raw_client(server, pki_root, "ops", pki.Role.ADMIN) as http:
        return http.get("/v1/admin/rounds").json()


def test_a_round_closes_as_soon_as_the_other_selected_clients_skip_and_aggregates(
    start_server, connect, pki_dir: Path
) -> None:
    server = start_server(*HOUR)
    alice, bob, carol = (connect(server, name) for name in ("alice", "bob", "carol"))
    info = open_round(alice)
    assert info.selected == ["alice", "bob", "carol"]
    alice.post_update(info.round, update_body(2.0))
    receipt = bob.skip(info.round, "out of memory")
    assert (receipt.round, receipt.client, receipt.reason) == (info.round, "bob", "out of memory")
    assert alice.current_round().round == info.round  # carol still owes her report
    with raw_client(server, pki_dir, "ops", pki.Role.ADMIN) as http:
        assert http.get("/v1/admin/status").json()["skipped"] == {"bob": "out of memory"}

    carol.skip(info.round, "not even the fewest steps fit")

    after = alice.current_round()
    assert (after.round, after.state) == (info.round + 1, RoundState.OPEN)
    model = alice.model()
    assert model is not None
    assert model.round == info.round
    np.testing.assert_allclose(decode(model.body)[0]["layer.bias"], 2.0)
    first = admin_rounds(server, pki_dir)[0]
    assert (first["state"], first["reported"]) == ("done", ["alice"])
    assert first["skipped"] == {"bob": "out of memory", "carol": "not even the fewest steps fit"}
    assert first["deadline"] - time.time() > 1800  # closed long before its deadline
    with raw_client(server, pki_dir, "ops", pki.Role.ADMIN) as http:
        assert http.get("/v1/admin/status").json()["skipped"] == {}
        assert "fedge_skips_accepted_total 2.0" in http.get("/metrics").text


def test_a_round_fails_at_once_when_the_skips_leave_too_few_updates_for_the_quorum(
    start_server, connect, pki_dir: Path
) -> None:
    server = start_server(*HOUR, "--min-updates", "2")
    alice, bob, carol = (connect(server, name) for name in ("alice", "bob", "carol"))
    info = open_round(alice)
    before = alice.model_meta().sha256
    alice.post_update(info.round, update_body(2.0))
    bob.skip(info.round, "out of memory")
    assert alice.current_round().round == info.round

    carol.skip(info.round, "out of memory")

    after = alice.current_round()
    assert (after.round, after.state, after.model_sha256) == (info.round + 1, RoundState.OPEN, before)
    assert admin_rounds(server, pki_dir)[0]["state"] == "failed"


def test_refused_skip_notices_leave_the_store_unchanged(start_server, connect, fresh_pki: Path) -> None:
    pki.issue(fresh_pki, pki.Role.CLIENT, "carol")
    server = start_server(*HOUR, pki_root=fresh_pki)
    alice, bob, carol = (connect(server, name, pki_root=fresh_pki) for name in ("alice", "bob", "carol"))
    info = open_round(alice)
    assert info.selected == ["alice", "bob", "carol"]
    pki.issue(fresh_pki, pki.Role.CLIENT, "dave")  # registered after the round was drawn
    dave = connect(server, "dave", pki_root=fresh_pki)
    alice.post_update(info.round, update_body(1.0))
    bob.skip(info.round, "out of memory")

    def refused(call, status: int, code: str) -> None:
        before = state_of(server), skips_of(server)
        with pytest.raises(ServerError) as refusal_:
            call()
        assert (refusal_.value.status, refusal_.value.code) == (status, code)
        assert (state_of(server), skips_of(server)) == before

    refused(lambda: alice.skip(info.round, "changed my mind"), 409, "duplicate_update")
    refused(lambda: bob.skip(info.round, "again"), 409, "already_skipped")
    refused(lambda: bob.post_update(info.round, update_body(1.0)), 409, "already_skipped")
    refused(lambda: dave.skip(info.round, "out of memory"), 403, "not_selected")
    refused(lambda: carol.skip(info.round + 1, "out of memory"), 409, "round_not_open")
    refused(lambda: carol.skip(info.round - 1, "out of memory"), 409, "round_closed")
    before = state_of(server), skips_of(server)
    with raw_client(server, fresh_pki, "carol") as http:
        too_long = http.post(f"/v1/rounds/{info.round}/skip", json={"reason": "x" * 201})
        assert refusal(too_long) == (422, "invalid_request")
        assert refusal(http.post(f"/v1/rounds/{info.round}/skip", json={})) == (422, "invalid_request")
    with raw_client(server, fresh_pki, "ops", pki.Role.ADMIN) as http:
        assert refusal(http.post(f"/v1/rounds/{info.round}/skip", json={"reason": "x"})) == (
            403,
            "wrong_role",
        )
    assert (state_of(server), skips_of(server)) == before
    assert skips_of(server) == [(info.round, "bob", "out of memory")]

    carol.skip(info.round, "out of memory")  # none of the refusals counted: this is the last report
    assert alice.current_round().round == info.round + 1


def test_asynchronous_rounds_refuse_a_skip_notice(start_server, connect) -> None:
    server = start_server(*HOUR, "--buffer", "2")
    alice = connect(server, "alice")
    info = open_round(alice)
    before = state_of(server), skips_of(server)
    with pytest.raises(ServerError) as refused:
        alice.skip(info.round, "out of memory")
    assert (refused.value.status, refused.value.code) == (409, "asynchronous_mode")
    assert (state_of(server), skips_of(server)) == before


@pytest.mark.parametrize("backend", ["sqlite", "postgresql"])
def test_a_restarted_server_remembers_who_skipped(
    start_server, connect, pki_dir: Path, tmp_path: Path, request: pytest.FixtureRequest, backend: str
) -> None:
    url = request.getfixturevalue("postgres_url") if backend == "postgresql" else None
    flags = [*HOUR, *(["--store", url] if url else [])]
    data = tmp_path / "restarted"
    server = start_server(*flags, data=data)
    info = open_round(connect(server, "bob"))
    connect(server, "bob").skip(info.round, "out of memory")
    server.stop()

    server = start_server(*flags, data=data)
    alice, bob, carol = (connect(server, name) for name in ("alice", "bob", "carol"))
    assert admin_rounds(server, pki_dir)[0]["skipped"] == {"bob": "out of memory"}
    with pytest.raises(ServerError) as refused:
        bob.skip(info.round, "out of memory")
    assert refused.value.code == "already_skipped"
    alice.post_update(info.round, update_body(1.0))
    carol.post_update(info.round, update_body(3.0))
    assert alice.current_round().round == info.round + 1  # bob's skip still counted after the restart
    np.testing.assert_allclose(decode(alice.model().body)[0]["layer.bias"], 2.0)  # type: ignore[union-attr]
    assert rows(url, data, "SELECT round, client, reason FROM skips") == [
        (info.round, "bob", "out of memory")
    ]


def test_an_agent_that_cannot_fit_the_round_tells_the_server_which_closes_the_round_early(
    make_pki, start_task_server, start_agent, tmp_path: Path
) -> None:
    pki_dir = make_pki("alice", "bob")
    server = start_task_server(pki_dir, "--rounds", "1", *HOUR)
    alice_data, bob_data = client_data(tmp_path, 2)
    start_agent(pki_dir, "alice", alice_data, server.url, "--poll-wait", "2")
    bob = start_agent(pki_dir, "bob", bob_data, server.url, "--poll-wait", "2", *NEVER_FITS)

    creds = pki.credentials(pki_dir, pki.Role.CLIENT, "alice")
    with FedgeClient(server.url, creds) as api:
        wait_for(lambda: api.current_round().state is RoundState.FINISHED, 240, "round 1 to close")
    # The round is over, and bob's status still says it skipped it, and why.
    skipped = wait_for(lambda: bob.status().get("state") == "skipped" and bob.status(), 60, "bob's status")
    assert (skipped["round"], skipped["placements"]) == (1, {"skip": 1})
    assert skipped["detail"] == "round 1: out of memory; the server was told"
    with sqlite3.connect(server.data / "state.db") as db:
        assert db.execute("SELECT round, client, reason FROM skips").fetchall() == [
            (1, "bob", "out of memory")
        ]
        assert db.execute("SELECT round, client FROM updates").fetchall() == [(1, "alice")]
        state, closed, deadline = db.execute(
            "SELECT state, closed_at, deadline FROM rounds WHERE round = 1"
        ).fetchone()
    assert state == "done"
    assert closed < deadline - 1800  # it did not wait for bob until its deadline


def test_a_refused_skip_notice_is_reported_and_the_agent_keeps_running(
    make_pki, start_task_server, start_agent, tmp_path: Path
) -> None:
    """An asynchronous server refuses the notice: the agent says so in its status and stays up."""
    pki_dir = make_pki("bob")
    server = start_task_server(pki_dir, "--buffer", "1", *HOUR)
    (data,) = client_data(tmp_path, 1)
    bob = start_agent(pki_dir, "bob", data, server.url, "--poll-wait", "2", *NEVER_FITS)
    skipped = wait_for(lambda: bob.status().get("state") == "skipped" and bob.status(), 240, "bob to skip")
    assert "the skip notice failed: 409 asynchronous_mode" in skipped["detail"]
    assert bob.process.poll() is None
