"""Selection counts live clients: a device is eligible once it has been seen (any request, or its status
on MQTT) within the server's presence window; an enrolled device that never shows up is not selected and
does not hold rounds up; ``--min-clients`` waits for live clients, not for certificates."""

from __future__ import annotations

import time
from pathlib import Path

import httpx
import pytest
from conftest import client_data, toy_server_args, update_body, wait_for
from test_service import open_round, stored_updates

from fedge.client.status import AgentState, AgentStatus, Transport
from fedge.security import pki
from fedge.security.tls import client_context
from fedge.server.announce import sighting
from fedge.server.launcher import launch
from fedge.server.presence import Presence
from fedge.server.schedule import live, select
from fedge.server.trust import Trust
from fedge.transport import FedgeClient
from fedge.wire import RoundState, status_topic


def test_live_clients_are_those_seen_within_the_window() -> None:
    seen = {"alice": 100.0, "bob": 40.0, "carol": 130.0}
    assert live(seen, now=130.0, window=60.0) == ["alice", "carol"]
    assert live(seen, now=100.0, window=60.0) == ["alice", "bob", "carol"]  # carol's clock ran ahead
    assert live(seen, now=1000.0, window=60.0) == []
    assert select(live(seen, now=130.0, window=60.0), 1, 1.0, 1, 0) == ["alice", "carol"]


def test_presence_forgets_the_stopped_and_the_long_gone() -> None:
    presence = Presence()
    presence.seen("alice", 10.0)
    presence.seen("alice", 5.0)  # an older sighting arriving late does not age her
    presence.seen("bob", 10.0)
    presence.gone("bob", 12.0)
    assert presence.live(20.0, 60.0) == ["alice"]
    presence.seen("bob", 13.0)
    presence.gone("bob", 12.5)  # a stop said before he was seen again
    assert presence.live(20.0, 60.0) == ["alice", "bob"]
    assert presence.live(100.0, 60.0) == []
    assert presence.live(20.0, 60.0) == []  # dropped, not kept to be scanned again


def test_a_single_server_keeps_no_sightings_to_publish_until_it_shares_them() -> None:
    presence = Presence()
    presence.seen("alice", 10.0)
    assert presence.fresh() == {}, "no replica to publish to"
    presence.share()
    presence.seen("alice", 11.0)
    presence.seen("bob", 12.0)
    presence.seen("alice", 10.5)  # an older sighting does not replace the newer one to publish
    assert presence.fresh() == {"alice": 11.0, "bob": 12.0}
    assert presence.fresh() == {}, "published once"
    assert presence.live(20.0, 60.0) == ["alice", "bob"]


def status(client: str, state: AgentState = AgentState.IDLE, updated: float = 50.0) -> bytes:
    return (
        AgentStatus(client=client, state=state, transport=Transport.MQTT, updated=updated)
        .model_dump_json()
        .encode()
    )


def test_a_status_on_a_clients_own_topic_is_a_sighting_and_anything_else_is_ignored() -> None:
    topic = status_topic("test", "alice")
    assert sighting(topic, status("alice"), False, "test", 100.0) == ("alice", 100.0, True)
    assert sighting(topic, status("alice"), True, "test", 100.0) == ("alice", 50.0, True)
    assert sighting(topic, status("alice", updated=1e12), True, "test", 100.0) == ("alice", 100.0, True)
    assert sighting(topic, status("alice", AgentState.STOPPED), False, "test", 100.0) == (
        "alice",
        100.0,
        False,
    )
    assert sighting(topic, status("bob"), False, "test", 100.0) is None
    assert sighting(status_topic("other", "alice"), status("alice"), False, "test", 100.0) is None
    assert sighting("fedge/test/rounds", status("alice"), False, "test", 100.0) is None
    assert sighting(topic, b"[" * 5000, False, "test", 100.0) is None
    assert sighting(topic, b"not json", False, "test", 100.0) is None


def test_eligible_clients_are_the_live_whose_certificate_counts(fresh_pki: Path) -> None:
    pki.issue(fresh_pki, pki.Role.CLIENT, "carol")
    trust = Trust.load(fresh_pki)
    now = time.time()
    assert trust.eligible(180.0, now) == []
    assert trust.eligible(0, now) == ["alice", "bob", "carol"]  # window 0: every enrolled client
    for client in ("alice", "bob", "mallory"):
        trust.presence.seen(client, now)
    assert trust.eligible(180.0, now) == ["alice", "bob"]  # mallory holds no certificate
    pki.revoke(fresh_pki, pki.Role.CLIENT, "bob")
    time.sleep(1.1)  # the CRL is re-read at most once a second
    assert trust.eligible(180.0, now) == ["alice"]


@pytest.fixture
def live_server(tmp_path: Path, fresh_pki: Path):
    """``fedge server`` with the default presence window (toy task), stopped after the test."""
    started = []

    def start(*flags: str):
        args = [*toy_server_args(fresh_pki, tmp_path / "initial.safetensors"), "--presence-window", "180"]
        started.append(launch([*args, *flags], tmp_path / "server", tmp_path / "server.log"))
        return started[-1]

    yield start
    for server in started:
        server.stop()


def round_state(server, fresh_pki: Path) -> dict:
    """The federation as an admin sees it (an admin's requests are no client's sign of life)."""
    tls = client_context(pki.credentials(fresh_pki, pki.Role.ADMIN, "ops"))
    with httpx.Client(base_url=server.url, verify=tls, timeout=15) as ops:
        return ops.get("/v1/admin/status").json()["round"]


def test_an_enrolled_client_that_never_shows_up_is_not_selected_and_rounds_do_not_wait_for_it(
    live_server, fresh_pki: Path
) -> None:
    pki.issue(fresh_pki, pki.Role.CLIENT, "carol")  # enrolled, never runs
    server = live_server("--min-clients", "2", "--round-timeout", "600", "--rounds", "2")
    time.sleep(1.0)  # several ticks of the round clock with three certificates and nobody live
    assert round_state(server, fresh_pki)["state"] == RoundState.WAITING
    creds = {c: pki.credentials(fresh_pki, pki.Role.CLIENT, c) for c in ("alice", "bob")}
    with (
        FedgeClient(server.url, creds["alice"], timeout=15) as alice,
        FedgeClient(server.url, creds["bob"], timeout=15) as bob,
    ):
        assert alice.current_round().state is RoundState.WAITING
        time.sleep(0.6)
        assert round_state(server, fresh_pki)["state"] == RoundState.WAITING  # one live, two needed
        started = time.monotonic()
        first = open_round(bob)
        assert first.selected == ["alice", "bob"]
        for api in (alice, bob):
            api.post_update(first.round, update_body(1.0))
        second = open_round(alice)
        assert (second.round, second.selected) == (first.round + 1, ["alice", "bob"])
        for api in (alice, bob):
            api.post_update(second.round, update_body(2.0))
        wait_for(lambda: round_state(server, fresh_pki)["state"] == RoundState.FINISHED, 30, "the last round")
        assert time.monotonic() - started < 60  # nowhere near the 600 s a wait for carol would take


def test_a_status_on_mqtt_makes_a_client_live_before_it_sends_any_request(
    live_server, start_broker, probe, fresh_pki: Path
) -> None:
    mqtt_broker = start_broker(fresh_pki)
    server = live_server("--mqtt", str(mqtt_broker.address))
    alice = probe(mqtt_broker, client_context(pki.credentials(fresh_pki, pki.Role.CLIENT, "alice")))
    assert alice.admitted()
    time.sleep(1.0)
    assert round_state(server, fresh_pki)["state"] == RoundState.WAITING
    alice.client.publish(status_topic("test", "alice"), status("alice", updated=time.time()), qos=1)
    info = wait_for(
        lambda: (r := round_state(server, fresh_pki))["state"] == RoundState.OPEN and r, 30, "round 1"
    )
    assert info["selected"] == ["alice"]


def test_agents_are_live_before_round_1_and_an_enrolled_device_that_never_runs_is_not_waited_for(
    make_pki, start_broker, start_task_server, start_agent, tmp_path: Path
) -> None:
    pki_dir = make_pki("dev-1", "dev-2", "dev-3")  # dev-3 is enrolled and never runs
    broker = start_broker(pki_dir)
    flags = ("--mqtt", str(broker.address), "--presence-window", "180", "--min-clients", "2")
    server = start_task_server(pki_dir, *flags, "--rounds", "1", "--round-timeout", "600")
    time.sleep(1.0)
    assert round_state(server, pki_dir)["state"] == RoundState.WAITING  # three certificates, nobody live
    data = client_data(tmp_path, 2)
    started = time.monotonic()
    for i in range(2):
        start_agent(pki_dir, f"dev-{i + 1}", data[i], server.url, "--broker", str(broker.address))
    wait_for(lambda: round_state(server, pki_dir)["state"] == RoundState.FINISHED, 300, "round 1")
    assert time.monotonic() - started < 300  # a round waiting for dev-3 would take its 600 s
    assert stored_updates(server.data) == [(1, "dev-1"), (1, "dev-2")]
