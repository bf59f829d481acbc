"""Replicas: several aggregation servers over one PostgreSQL store and one blob directory.

In process, two ``Federation`` objects on one store show the rules: either takes updates, a round closes
once, and the other follows. Then two ``fedge server`` processes behind a real haproxy in TCP mode (TLS
passes through, so the client certificates reach the replicas): one is SIGKILLed mid-round, and nothing
acknowledged is lost or doubled, and every round's model is the one a single server makes of the same
updates."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import psycopg
import pytest
from conftest import CLIENTS, submit, tls_for, toy_model, update_body, wait_for
from loopback import Haproxy, free_port
from raw_http import open_tls, read_until_closed

from fedge.codec import encode, sha256
from fedge.security import pki
from fedge.server.errors import Rejected
from fedge.server.launcher import ServerProcess, launch
from fedge.server.presence import Presence, PresenceExchange
from fedge.server.rounds import Federation, FederationSettings
from fedge.server.store import Store, StoreError
from fedge.transport import FedgeClient, ServerError
from fedge.wire import RoundState

ROUNDS = 3
# Each client's update in each round: small integers and weights, so every sum is exact in any order and a
# model's sha256 says whether two servers made the same one.
VALUES = {(r, c): float(r * 10 + i) for r in range(1, ROUNDS + 1) for i, c in enumerate(CLIENTS)}
EXAMPLES = {c: 10 * (i + 1) for i, c in enumerate(CLIENTS)}


def federation(blobs: Path, url: str | None, data: Path | None = None) -> Federation:
    return Federation(
        Store(data or blobs, url, blobs),
        FederationSettings(federation="test", task="toy", rounds=ROUNDS, min_updates=len(CLIENTS)),
        registered_clients=lambda: list(CLIENTS),
        initial_model=encode(toy_model()),
    )


def two_replicas(tmp_path: Path, url: str) -> tuple[Federation, Federation]:
    """Two federations on one PostgreSQL store and one blob directory, each with a --data of its own."""
    blobs = tmp_path / "blobs"
    return federation(blobs, url, tmp_path / "one"), federation(blobs, url, tmp_path / "two")


def single_server_models(tmp_path: Path) -> list[str]:
    """Each round's model as one server on SQLite makes it of the same updates."""
    alone = federation(tmp_path / "single", None)
    alone.tick()
    for round_ in range(1, ROUNDS + 1):
        for client in CLIENTS:
            submit(alone, round_, client, update_body(VALUES[round_, client], EXAMPLES[client]))
    return [h.record.result_sha256 for h in alone.history()]


def test_two_federations_on_one_store_take_updates_alike_and_close_each_round_once(
    tmp_path: Path, postgres_url: str
) -> None:
    one, two = two_replicas(tmp_path, postgres_url)
    one.tick()
    two.tick()
    assert one.round_info().round == two.round_info().round == 1, "round 1 opened once, seen by both"
    for round_ in range(1, ROUNDS + 1):
        for i, client in enumerate(CLIENTS):  # alternately: each replica takes some of every round
            submit(
                (one, two)[(round_ + i) % 2],
                round_,
                client,
                update_body(VALUES[round_, client], EXAMPLES[client]),
            )
        one.tick()
        two.tick()
        assert one.model.sha256 == two.model.sha256
    assert one.round_info().state is two.round_info().state is RoundState.FINISHED
    assert [h.record.result_sha256 for h in two.history()] == single_server_models(tmp_path)
    with psycopg.connect(postgres_url) as db:
        assert db.execute("SELECT round, COUNT(*) FROM updates GROUP BY round ORDER BY round").fetchall() == [
            (r, len(CLIENTS)) for r in range(1, ROUNDS + 1)
        ]


def test_a_second_upload_of_one_client_to_another_replica_is_a_duplicate(
    tmp_path: Path, postgres_url: str
) -> None:
    one, two = two_replicas(tmp_path, postgres_url)
    one.tick()
    submit(one, 1, "alice", update_body(1.0, 10))
    with pytest.raises(Rejected, match="already sent"):
        submit(two, 1, "alice", update_body(2.0, 10))
    (stored,) = Store(tmp_path / "one", postgres_url, tmp_path / "blobs").updates(1)
    assert stored.sha256 == sha256(update_body(1.0, 10)), "the first upload's file, not overwritten"
    assert sorted(p.name.split(".")[0] for p in (tmp_path / "blobs" / "updates" / "1").iterdir()) == ["alice"]


def test_a_client_seen_by_one_replica_is_live_on_every_replica(tmp_path: Path, postgres_url: str) -> None:
    replicas = [
        (presence, PresenceExchange(presence, Store(tmp_path / name, postgres_url, tmp_path / "blobs")))
        for name, presence in (("one", Presence()), ("two", Presence()))
    ]
    (first, first_exchange), (second, second_exchange) = replicas
    now = time.time()
    first.seen("alice", now - 5)
    first.seen("carol", now - 3)  # two sightings in one exchange: one batch, each its own stamp
    second.seen("bob", now - 1)
    for _, exchange in replicas:
        exchange.exchange()
    first_exchange.exchange()  # hears what the second published after its own first exchange
    assert first.live(now, 60) == second.live(now, 60) == ["alice", "bob", "carol"]
    second.seen("alice", now)  # seen again, at the other replica this time
    second_exchange.exchange()
    first_exchange.exchange()
    assert first.sightings()["alice"] == now
    assert first.live(now + 59.5, 60) == ["alice"], "bob's and carol's, wherever made, are too old"


def test_a_replica_with_a_blob_directory_of_its_own_is_refused(tmp_path: Path, postgres_url: str) -> None:
    Store(tmp_path / "one", postgres_url, tmp_path / "shared").claim_blobs()
    with pytest.raises(StoreError, match="not the blob directory of this store"):
        Store(tmp_path / "two", postgres_url, tmp_path / "elsewhere").claim_blobs()


@pytest.fixture
def replicas(
    tmp_path: Path, pki_dir: Path, postgres_url: str
) -> Iterator[tuple[list[ServerProcess], Haproxy, list[list[str]]]]:
    initial = tmp_path / "initial.safetensors"
    initial.write_bytes(encode(toy_model()))
    ports = [free_port(), free_port()]
    shared = [
        "--pki", str(pki_dir), "--task", "toy", "--init-model", str(initial), "--min-clients", "3",
        "--store", postgres_url, "--blobs", str(tmp_path / "blobs"), "--rounds", str(ROUNDS),
        "--min-updates", str(len(CLIENTS)), "--round-timeout", "120",
    ]  # fmt: skip
    flags = [[*shared, "--port", str(port)] for port in ports]
    servers: list[ServerProcess] = [
        launch(args, tmp_path / f"replica{i}", tmp_path / f"replica{i}.log") for i, args in enumerate(flags)
    ]
    balancer = Haproxy(tmp_path, ports)
    yield servers, balancer, flags
    balancer.stop()
    for server in servers:
        server.stop()


def test_replicas_behind_haproxy_lose_nothing_acknowledged_when_one_is_killed_mid_round(
    tmp_path: Path, pki_dir: Path, postgres_url: str, replicas: tuple[list, Haproxy, list[list[str]]]
) -> None:
    servers, balancer, flags = replicas
    clients = {
        name: FedgeClient(balancer.url, pki.credentials(pki_dir, pki.Role.CLIENT, name), timeout=10)
        for name in CLIENTS
    }
    acknowledged: dict[tuple[int, str], str] = {}

    def deliver(round_: int, name: str) -> None:
        """Send as an agent does: again after a lost connection, and a duplicate means delivered."""
        body = update_body(VALUES[round_, name], EXAMPLES[name])
        give_up = time.monotonic() + 60
        while True:
            try:
                receipt = clients[name].post_update(round_, body)
            except httpx.TransportError:
                assert time.monotonic() < give_up, f"{name}'s update for round {round_} never got through"
                time.sleep(0.3)
                continue
            except ServerError as exc:
                if exc.code != "duplicate_update":
                    raise
                return  # recorded before the kill; the answer was lost with the connection
            acknowledged[round_, name] = receipt.sha256
            return

    def open_round(round_: int) -> None:
        wait_for(
            lambda: (
                clients["alice"].current_round().round == round_
                and clients["alice"].current_round().state is RoundState.OPEN
            ),
            what=f"round {round_} to open",
        )

    # Each client's connection is one haproxy spreads over the replicas: every round has updates on both,
    # and round 1 opens only once the replicas' presence, shared through the store, counts all three.
    for api in clients.values():
        api.current_round()
    open_round(1)
    for name in CLIENTS:
        deliver(1, name)
    open_round(2)
    # Replica 0 acknowledges bob's update, has carol's half received, and is killed.
    with FedgeClient(servers[0].url, pki.credentials(pki_dir, pki.Role.CLIENT, "bob")) as direct:
        acknowledged[2, "bob"] = direct.post_update(2, update_body(VALUES[2, "bob"], EXAMPLES["bob"])).sha256
    body = update_body(VALUES[2, "carol"], EXAMPLES["carol"])
    head = {**clients["carol"].sign_update(2, body), "Content-Length": str(len(body))}
    in_flight = open_tls(servers[0].url, tls_for(pki_dir, pki.Role.CLIENT, "carol"))
    in_flight.sendall(
        b"POST /v1/rounds/2/updates HTTP/1.1\r\nHost: 127.0.0.1\r\n"
        + "".join(f"{name}: {value}\r\n" for name, value in head.items()).encode()
        + b"\r\n"
        + body[: len(body) // 2]
    )
    servers[0].process.kill()
    servers[0].process.wait(10)
    assert read_until_closed(in_flight)[0] == b"", "carol's upload died with its replica, unanswered"
    in_flight.close()
    for name in ("alice", "carol"):  # as agents do: carol sends again, and haproxy takes both to replica 1
        deliver(2, name)
    # The killed replica comes back on its port and follows the rounds the other moved on meanwhile.
    servers[0] = launch(flags[0], tmp_path / "replica0", tmp_path / "replica0.log")
    open_round(3)
    for name in CLIENTS:
        deliver(3, name)
    for server in servers:
        with FedgeClient(server.url, pki.credentials(pki_dir, pki.Role.CLIENT, "alice")) as direct:
            wait_for(lambda api=direct: api.current_round().state is RoundState.FINISHED, what="the end")
    for api in clients.values():
        api.close()

    with psycopg.connect(postgres_url) as db:
        stored = db.execute("SELECT round, client, sha256 FROM updates ORDER BY round, client").fetchall()
        models = db.execute("SELECT result_sha256 FROM rounds ORDER BY round").fetchall()
    assert len(stored) == len({(r, c) for r, c, _ in stored}) == ROUNDS * len(CLIENTS), "none doubled"
    assert acknowledged.items() <= {(r, c): s for r, c, s in stored}.items(), "every acknowledged update kept"
    assert [m for (m,) in models] == single_server_models(tmp_path)
