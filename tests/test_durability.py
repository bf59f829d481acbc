"""Durability: round state in SQLite or a real PostgreSQL, and a server killed at random points of a round
that, restarted, ends exactly as an uninterrupted run."""

from __future__ import annotations

import random
import sqlite3
import threading
import time
from pathlib import Path

import httpx
import numpy as np
import psycopg
import pytest
from conftest import submit, toy_model, update_body

from fedge.codec import decode, encode
from fedge.server.rounds import Federation, FederationSettings
from fedge.server.store import Store
from fedge.transport import FedgeClient, ServerError
from fedge.wire import RoundState

CLIENTS = ["alice", "bob", "carol"]
# (round, client, value, examples): two rounds of three updates.
PLAN = [(r, c, float(r * 10 + i), 10 * (i + 1)) for r in (1, 2) for i, c in enumerate(CLIENTS)]


@pytest.fixture(params=["sqlite", "postgresql"])
def store_url(request: pytest.FixtureRequest) -> str | None:
    return None if request.param == "sqlite" else request.getfixturevalue("postgres_url")


def rows(store_url: str | None, data: Path, sql: str) -> list[tuple]:
    if store_url is None:
        with sqlite3.connect(data / "state.db") as db:
            return db.execute(sql).fetchall()
    with psycopg.connect(store_url) as db:
        return db.execute(sql).fetchall()


def test_a_federation_on_postgresql_resumes_and_matches_one_on_sqlite(
    tmp_path: Path, postgres_url: str
) -> None:
    def federation(data: Path, url: str | None) -> Federation:
        return Federation(
            Store(data, url),
            FederationSettings(federation="test", task="toy", rounds=2),
            registered_clients=lambda: CLIENTS,
            initial_model=encode(toy_model()),
        )

    feds = [federation(tmp_path / "sqlite", None), federation(tmp_path / "pg", postgres_url)]
    for fed in feds:
        fed.tick()
    for step, (round_, client, value, examples) in enumerate(PLAN):
        if step == 4:
            feds[1] = federation(tmp_path / "pg", postgres_url)  # restart mid round 2
            assert feds[1].round_info().round == 2
        for fed in feds:
            submit(fed, round_, client, update_body(value, examples))
    assert feds[1].round_info().state is RoundState.FINISHED
    assert feds[1].model.sha256 == feds[0].model.sha256
    assert rows(postgres_url, tmp_path, "SELECT round, state FROM rounds ORDER BY round") == [
        (1, "done"),
        (2, "done"),
    ]


def open_round(api: FedgeClient) -> int:
    info = api.current_round()
    give_up = time.monotonic() + 30
    while info.state is not RoundState.OPEN and time.monotonic() < give_up:
        info = api.current_round(wait=2, etag=info.etag)
    return info.round


def send(api: FedgeClient, round_: int, body: bytes) -> str:
    try:
        api.post_update(round_, body)
    except ServerError as exc:
        return exc.code
    return "accepted"


def test_a_server_killed_at_random_points_resumes_and_ends_as_an_uninterrupted_run(
    start_server, connect, tmp_path: Path, store_url: str | None
) -> None:
    rng = random.Random(20261128)
    # Each update meets one kill: none, before it is sent, while it is in flight, or right after its 202.
    kills = ["none", "before", "during", "after", "during", "after"]
    rng.shuffle(kills)
    flags = ["--rounds", "2", *(["--store", store_url] if store_url else [])]
    data = tmp_path / "crashed"
    server = start_server(*flags, data=data)
    clients = {name: connect(server, name) for name in CLIENTS}

    def restart() -> None:
        nonlocal server, clients
        server.process.kill()
        server.process.wait()
        server = start_server(*flags, data=data)
        clients = {name: connect(server, name) for name in CLIENTS}

    for kill, (round_, client, value, examples) in zip(kills, PLAN, strict=True):
        if kill == "before":
            restart()
        assert open_round(clients[client]) == round_
        killer = threading.Timer(rng.uniform(0.0, 0.03), server.process.kill) if kill == "during" else None
        if killer:
            killer.start()
        try:
            clients[client].post_update(round_, update_body(value, examples))
        except httpx.TransportError:  # killed in flight: the client does not know, so it sends again
            killer.join()  # type: ignore[union-attr]
            restart()
            assert open_round(clients[client]) == round_
            # "duplicate_update" when the update was stored before the kill.
            assert send(clients[client], round_, update_body(value, examples)) in {
                "accepted",
                "duplicate_update",
            }
        if killer:
            killer.join()
        if kill != "none" and kill != "before":
            restart()
    crashed = clients["alice"].model_meta()

    reference = start_server("--rounds", "2", data=tmp_path / "uninterrupted")
    for round_, client, value, examples in PLAN:
        api = connect(reference, client)
        assert open_round(api) == round_
        api.post_update(round_, update_body(value, examples))
    assert crashed.round == 2
    assert crashed.sha256 == connect(reference, "alice").model_meta().sha256
    # Every acknowledged update is stored once, and each round finished exactly once.
    assert sorted(rows(store_url, data, "SELECT round, client FROM updates")) == sorted(
        (r, c) for r, c, _, _ in PLAN
    )
    assert rows(store_url, data, "SELECT round, state FROM rounds ORDER BY round") == [
        (1, "done"),
        (2, "done"),
    ]
    expected = sum(v * n for r, _, v, n in PLAN if r == 2) / sum(n for r, _, _, n in PLAN if r == 2)
    final = clients["alice"].model()
    assert final is not None
    np.testing.assert_allclose(decode(final.body)[0]["layer.bias"], expected, rtol=1e-6)
