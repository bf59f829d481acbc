"""Faults with real processes: the server, the broker or an agent is killed at a round's start, in the
middle of training and in the middle of an upload, then restarted; every round still completes with every
selected device's update stored exactly once, before its deadline.

Round 1 warms the agents' workers (a cold one is still starting when its round begins); rounds 2, 3 and 4
each meet one kill. The moments are read from the agents' own status files: a round has started when an
agent shows it, training once an agent has shown "training" for a while, uploading when an agent shows
"uploading" (or, if that came and went between two looks, right after it)."""

from __future__ import annotations

import json
import signal
import time
from collections.abc import Callable
from pathlib import Path

import httpx
import pytest
from conftest import AgentProcess, client_data, free_port, tls_for, wait_for
from test_service import stored_updates

from fedge.codec import decode, encode
from fedge.security import pki
from fedge.security.tls import client_context
from fedge.transport import FedgeClient
from fedge.wire import RoundState, status_topic

DEVICES = ("dev-1", "dev-2")
ROUNDS = 4
OUTAGE_S = 2.0  # how long a killed part stays down before it is started again
TIMEOUT_S = 60  # a round's deadline: a device that gave up would leave its round waiting for all of it
TRAINING_S = 0.5  # how long into training the mid-training kill comes (training takes seconds)


def status(agent: AgentProcess) -> tuple[str, int]:
    shown = agent.status()
    return shown.get("state", ""), shown.get("round") or 0


def look(agents: list[AgentProcess], seen: Callable[[list[tuple[str, int]]], bool], what: str) -> None:
    """Every millisecond: a round of this small model takes a few seconds, an upload tens of milliseconds."""
    give_up = time.monotonic() + 120
    while not seen([status(a) for a in agents]):
        if time.monotonic() > give_up:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.001)


def started(agents: list[AgentProcess], round_: int) -> None:
    """As soon as one of them shows the round: the others are at most fetching its model."""
    look(agents, lambda shown: any(r >= round_ for _, r in shown), f"round {round_} to start")


def training(agents: list[AgentProcess], round_: int) -> None:
    """Or, when the round's training was over before the last restart came back (a loaded machine), as
    soon as that is seen: the kill then lands on what follows, and the round must still complete."""

    def seen(shown: list[tuple[str, int]]) -> bool:
        return ("training", round_) in shown or any(
            r > round_ or (r == round_ and s == "idle") for s, r in shown
        )

    look(agents, seen, f"training in round {round_}")
    if any(shown == ("training", round_) for shown in (status(a) for a in agents)):
        time.sleep(TRAINING_S)


def uploading(agents: list[AgentProcess], round_: int) -> None:
    """Or right after it, when the upload came and went between two looks."""

    def seen(shown: list[tuple[str, int]]) -> bool:
        return ("uploading", round_) in shown or any(
            r > round_ or (r == round_ and s == "idle") for s, r in shown
        )

    look(agents, seen, f"an upload in round {round_}")


MOMENTS: dict[int, Callable[[list[AgentProcess], int], None]] = {2: started, 3: training, 4: uploading}


def rounds_seen_by_admin(server_url: str, pki_dir: Path) -> list[tuple[int, str, list[str], dict]]:
    creds = pki.credentials(pki_dir, pki.Role.ADMIN, "ops")
    with httpx.Client(base_url=server_url, verify=client_context(creds), timeout=30) as http:
        response = http.get("/v1/admin/rounds")
    response.raise_for_status()
    return [(r["round"], r["state"], sorted(r["reported"]), r["skipped"]) for r in response.json()]


def finished(server_url: str, pki_dir: Path) -> bool:
    try:
        with FedgeClient(server_url, pki.credentials(pki_dir, pki.Role.ADMIN, "ops"), timeout=10) as api:
            return api.current_round().state is RoundState.FINISHED
    except httpx.TransportError:
        return False  # restarting


@pytest.mark.parametrize("victim", ["server", "broker", "agent"])
def test_a_part_killed_at_round_start_mid_training_and_mid_upload_loses_no_update_and_doubles_none(
    victim: str, make_pki, start_broker, start_task_server, start_agent, probe, tmp_path: Path
) -> None:
    pki_dir = make_pki(*DEVICES)
    broker = start_broker(pki_dir)
    ops = probe(broker, tls_for(pki_dir, pki.Role.ADMIN, "ops"), (status_topic("edge", "+"),))
    assert ops.admitted()
    port = free_port()  # fixed, so that the restarted server is where the agents look for it
    flags = (
        "--port", str(port), "--mqtt", str(broker.address), "--rounds", str(ROUNDS),
        "--round-timeout", str(TIMEOUT_S), "--local-epochs", "1",
    )  # fmt: skip
    servers = [start_task_server(pki_dir, *flags)]
    url = servers[0].url
    data = client_data(tmp_path, len(DEVICES))
    flags_of = {d: (pki_dir, d, data[i], url, "--broker", str(broker.address)) for i, d in enumerate(DEVICES)}
    agents = {d: start_agent(*flags_of[d]) for d in DEVICES}

    def kill_and_restart() -> None:
        if victim == "server":
            servers[-1].process.kill()
            servers[-1].process.wait()
            time.sleep(OUTAGE_S)
            servers.append(start_task_server(pki_dir, *flags))
        elif victim == "broker":
            broker.stop(signal.SIGKILL)
            time.sleep(OUTAGE_S)
            broker.start()
        else:
            agents["dev-1"].stop(signal.SIGKILL)
            time.sleep(OUTAGE_S)
            agents["dev-1"] = start_agent(*flags_of["dev-1"])

    for round_, moment in MOMENTS.items():
        watched = [agents["dev-1"]] if victim == "agent" else list(agents.values())
        moment(watched, round_)
        kill_and_restart()
    wait_for(lambda: finished(url, pki_dir), 4 * TIMEOUT_S, "every round to finish")

    everyone = sorted(DEVICES)
    assert rounds_seen_by_admin(url, pki_dir) == [(r, "done", everyone, {}) for r in range(1, ROUNDS + 1)]
    assert stored_updates(servers[-1].data) == [(r, d) for r in range(1, ROUNDS + 1) for d in everyone]
    logs = {d: agents[d].log.read_text() for d in DEVICES}
    for device, agent in agents.items():
        wait_for(lambda a=agent: status(a) == ("idle", ROUNDS), 60, "the devices to settle")
        assert " failed: " not in logs[device], logs[device]
    if victim == "server":  # the kills met requests in flight, and the agents waited the outage out
        assert any("trying again" in text for text in logs.values())
    # As published live: a retained copy may be an older one the restarted broker restored from disk.
    published = [json.loads(m.payload) for m in list(ops.messages) if not m.retain]
    for device in DEVICES:
        shown = [s["round"] for s in published if s["client"] == device and s["round"] is not None]
        assert shown == sorted(shown), f"{device}'s status went back a round: {shown}"


def test_an_agent_resending_an_update_the_closed_round_already_counted_reports_it_delivered(
    make_pki, start_task_server, start_agent, tmp_path: Path
) -> None:
    """The server took the update but its answer was lost, and the round closed meanwhile: the resend is
    answered as a duplicate (not as late), and the agent shows the update as delivered."""
    pki_dir = make_pki("dev-1")
    server = start_task_server(pki_dir, "--rounds", "1")
    (data,) = client_data(tmp_path, 1)
    with FedgeClient(server.url, pki.credentials(pki_dir, pki.Role.CLIENT, "dev-1")) as api:
        wait_for(lambda: api.current_round().state is RoundState.OPEN, 60, "round 1 to open")
        model = api.model()
        assert model is not None
        body = encode(decode(model.body)[0], {"num_examples": "10"})
        api.post_update(1, body)
        assert api.current_round().state is RoundState.FINISHED
    outbox = tmp_path / "agent-dev-1" / "outbox"
    outbox.mkdir(parents=True)
    (outbox / "round-1.safetensors").write_bytes(body)
    agent = start_agent(pki_dir, "dev-1", data, server.url)
    shown = wait_for(
        lambda: (s := agent.status()).get("round") == 1 and s.get("state") != "uploading" and s,
        60,
        "the resend's answer",
    )
    assert shown["state"] == "idle"
    assert shown["detail"] == "sent the update of round 1 (the server already held it)"
    assert not any(outbox.iterdir())
    assert stored_updates(server.data) == [(1, "dev-1")]


def test_an_agent_refused_for_its_certificate_keeps_its_update_and_stops(
    make_pki, start_task_server, start_agent, tmp_path: Path
) -> None:
    """A 401 refuses the device, not the update: dropping it would lose training a reissued
    certificate could still deliver."""
    pki_dir = make_pki("dev-1")
    server = start_task_server(pki_dir, "--rounds", "1")
    (data,) = client_data(tmp_path, 1)
    with FedgeClient(server.url, pki.credentials(pki_dir, pki.Role.CLIENT, "dev-1")) as api:
        wait_for(lambda: api.current_round().state is RoundState.OPEN, 60, "round 1 to open")
        model = api.model()
        assert model is not None
        body = encode(decode(model.body)[0], {"num_examples": "10"})
    outbox = tmp_path / "agent-dev-1" / "outbox"
    outbox.mkdir(parents=True)
    (outbox / "round-1.safetensors").write_bytes(body)
    pki.revoke(pki_dir, pki.Role.CLIENT, "dev-1")
    agent = start_agent(pki_dir, "dev-1", data, server.url)
    assert agent.process.wait(60) == 1
    assert "update of round 1 kept" in agent.log.read_text()
    assert (outbox / "round-1.safetensors").read_bytes() == body
    assert stored_updates(server.data) == []
