"""Round announcements: the server publishes each round on the broker, QoS 1 and retained."""

from __future__ import annotations

import json
from pathlib import Path

from conftest import CLIENTS, tls_for, update_body, wait_for

from fedge.security import pki
from fedge.wire import RoundInfo, RoundState, rounds_topic


def announced(probe_, state: RoundState, round_: int) -> RoundInfo | None:
    for payload in probe_.payloads(rounds_topic("test")):
        info = RoundInfo.model_validate(json.loads(payload))
        if info.state is state and info.round == round_:
            return info
    return None


def test_each_round_is_announced_retained_to_clients_that_subscribe_later(
    start_broker, start_server, probe, connect, pki_dir: Path
) -> None:
    broker = start_broker(pki_dir)
    server = start_server("--mqtt", str(broker.address), "--rounds", "2")
    api = connect(server, "alice")
    wait_for(lambda: api.current_round().state is RoundState.OPEN, 30, "round 1 to open")
    # Subscribing after the announcement: the retained message still brings round 1.
    alice = probe(broker, tls_for(pki_dir, pki.Role.CLIENT, "alice"), (rounds_topic("test"),))
    assert alice.admitted()
    first = wait_for(lambda: announced(alice, RoundState.OPEN, 1), 30, "the announcement of round 1")
    assert first.model_sha256 == api.model_meta().sha256
    assert first.deadline is not None
    assert sorted(first.selected) == sorted(CLIENTS)
    assert first.config.local_epochs == 1
    assert alice.messages[0].retain
    for client in CLIENTS:
        connect(server, client).post_update(1, update_body(1.0))
    second = wait_for(lambda: announced(alice, RoundState.OPEN, 2), 30, "the announcement of round 2")
    assert second.model_sha256 == api.model_meta().sha256 != first.model_sha256


def test_a_server_started_while_the_broker_is_down_announces_once_it_is_up(
    start_broker, start_server, probe, connect, pki_dir: Path
) -> None:
    broker = start_broker(pki_dir)
    broker.stop()
    server = start_server("--mqtt", str(broker.address))
    wait_for(lambda: connect(server, "bob").current_round().state is RoundState.OPEN, 30, "round 1 to open")
    broker.start()
    admin = probe(broker, tls_for(pki_dir, pki.Role.ADMIN, "ops"), (rounds_topic("test"),))
    assert admin.admitted()
    wait_for(lambda: announced(admin, RoundState.OPEN, 1), 60, "the announcement after the broker came up")
