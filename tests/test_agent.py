"""The edge agent as a device runs it: ``fedge agent run`` processes, a real broker, a real server."""

from __future__ import annotations

import json
import signal
from pathlib import Path

import pytest
from conftest import client_data, free_port, tls_for, wait_for
from test_service import stored_updates
from test_simulate import run_cli

from fedge.security import pki
from fedge.transport import FedgeClient
from fedge.wire import RoundState, status_topic


def finished(server, pki_dir: Path) -> bool:
    with FedgeClient(server.url, pki.credentials(pki_dir, pki.Role.ADMIN, "ops")) as api:
        return api.current_round().state is RoundState.FINISHED


def test_agents_train_every_round_announced_on_mqtt_and_report_their_status(
    make_pki, start_broker, start_task_server, start_agent, probe, tmp_path: Path
) -> None:
    pki_dir = make_pki("dev-1", "dev-2")
    broker = start_broker(pki_dir)
    server = start_task_server(pki_dir, "--mqtt", str(broker.address), "--rounds", "2")
    ops = probe(broker, tls_for(pki_dir, pki.Role.ADMIN, "ops"), (status_topic("edge", "+"),))
    assert ops.admitted()
    data = client_data(tmp_path, 2)
    # The agents start after round 1 was announced: the retained announcement brings it to them.
    agents = [
        start_agent(pki_dir, f"dev-{i + 1}", data[i], server.url, "--broker", str(broker.address))
        for i in range(2)
    ]
    wait_for(lambda: finished(server, pki_dir), 300, "both rounds to finish")
    assert stored_updates(server.data) == [(1, "dev-1"), (1, "dev-2"), (2, "dev-1"), (2, "dev-2")]
    for agent in agents:
        # The server may finish the run while an agent still reports "uploading": wait for it to settle.
        status = wait_for(
            lambda a=agent: (s := a.status()).get("round") == 2 and s.get("state") == "idle" and s,
            60,
            "the last status",
        )
        assert status["transport"] == "mqtt"
        assert status["last_invocation"]["seconds"] > 0
    published = [json.loads(p)["state"] for p in ops.payloads(status_topic("edge", "dev-1"))]
    assert {"training", "uploading", "idle"} <= set(published)
    for agent in agents:
        assert agent.stop() == 0
        assert agent.status()["state"] == "stopped"
    shown = run_cli("agent", "status", "--dir", str(agents[0].state_dir))
    assert shown.returncode == 0
    assert "dev-1: stopped" in shown.stdout


def test_an_agent_that_cannot_reach_the_broker_long_polls_the_server_and_says_so(
    make_pki, start_task_server, start_agent, tmp_path: Path
) -> None:
    pki_dir = make_pki("dev-1")
    server = start_task_server(pki_dir, "--rounds", "2")
    (data,) = client_data(tmp_path, 1)
    nobody = f"127.0.0.1:{free_port()}"
    agent = start_agent(pki_dir, "dev-1", data, server.url, "--broker", nobody, "--poll-wait", "2")
    wait_for(lambda: finished(server, pki_dir), 300, "both rounds to finish")
    assert stored_updates(server.data) == [(1, "dev-1"), (2, "dev-1")]
    assert agent.status()["transport"] == "long-poll"


@pytest.fixture
def one_device(make_pki, start_broker, start_task_server, start_agent, tmp_path: Path):
    """A federation of one device: a broker, a server (rounds as asked) and a starter for its agent."""
    pki_dir = make_pki("dev-1")
    broker = start_broker(pki_dir)

    def start(rounds: int) -> tuple:
        flags = ("--mqtt", str(broker.address), "--rounds", str(rounds), "--local-epochs", "5")
        server = start_task_server(pki_dir, *flags)
        (data,) = client_data(tmp_path, 1)
        args = (pki_dir, "dev-1", data, server.url, "--broker", str(broker.address), "--poll-wait", "2")
        return broker, server, lambda: start_agent(*args)

    return pki_dir, start


def training(agent) -> None:
    wait_for(lambda: agent.status().get("state") == "training", 120, "training to start")


def test_sigterm_while_training_sends_the_trained_update_before_the_agent_exits(one_device) -> None:
    _, start = one_device
    _, server, start_agent = start(rounds=1)
    agent = start_agent()
    training(agent)
    assert agent.stop(signal.SIGTERM) == 0
    assert stored_updates(server.data) == [(1, "dev-1")]
    assert agent.status()["state"] == "stopped"


def test_an_agent_killed_mid_round_and_restarted_completes_the_round_with_one_update(one_device) -> None:
    pki_dir, start = one_device
    _, server, start_agent = start(rounds=1)
    first = start_agent()
    training(first)
    first.stop(signal.SIGKILL)
    assert stored_updates(server.data) == []
    second = start_agent()
    wait_for(lambda: finished(server, pki_dir), 300, "the round to finish after the restart")
    assert stored_updates(server.data) == [(1, "dev-1")]
    wait_for(lambda: second.status().get("state") == "idle", 60, "the agent to settle")


def test_a_broker_restart_mid_round_loses_no_round_and_the_agent_reconnects(one_device) -> None:
    pki_dir, start = one_device
    broker, server, start_agent = start(rounds=2)
    agent = start_agent()
    training(agent)
    broker.stop()
    wait_for(lambda: finished(server, pki_dir), 300, "both rounds to finish while the broker is down")
    broker.start()
    wait_for(lambda: agent.status().get("transport") == "mqtt", 120, "the agent to reconnect to the broker")
    assert stored_updates(server.data) == [(1, "dev-1"), (2, "dev-1")]


def test_agent_commands_refuse_bad_input_with_one_line(make_pki, tmp_path: Path) -> None:
    pki_dir = make_pki("dev-1")
    creds = pki.credentials(pki_dir, pki.Role.CLIENT, "dev-1")
    (data,) = client_data(tmp_path, 1)
    url = "https://127.0.0.1:1"
    given = ["--ca", str(creds.ca), "--cert", str(creds.cert), "--key", str(creds.key)]
    cases = [
        (
            ["--data", str(tmp_path / "missing.npz"), "--server", url, *given],
            "cannot read data",
        ),
        (["--data", str(data), "--server", url], "enroll the device"),
        (["--data", str(data), "--server", "http://127.0.0.1:1", *given], "https:// URL"),
        (
            ["--data", str(data), "--server", url, "--broker", "nowhere", *given],
            "HOST:PORT",
        ),
    ]
    for flags, message in cases:
        done = run_cli("agent", "run", "--dir", str(tmp_path / "state"), *flags)
        assert done.returncode == 1, done.stdout
        assert "Traceback" not in done.stderr
        assert message in " ".join(done.stderr.split())
    done = run_cli("agent", "status", "--dir", str(tmp_path / "nothing-here"))
    assert done.returncode == 1
    assert "has `fedge agent run" in " ".join(done.stderr.split())


def test_a_worker_hung_past_the_round_deadline_is_replaced_and_the_round_reported_failed(
    make_pki, start_broker, start_task_server, start_agent, probe, tmp_path: Path
) -> None:
    pki_dir = make_pki("dev-1")
    broker = start_broker(pki_dir)
    ops = probe(broker, tls_for(pki_dir, pki.Role.ADMIN, "ops"), (status_topic("edge", "dev-1"),))
    assert ops.admitted()
    # Far more training than the round's 3 seconds allow: the worker is still busy at the deadline.
    flags = ("--mqtt", str(broker.address), "--rounds", "1", "--round-timeout", "3", "--local-epochs", "1000")
    server = start_task_server(pki_dir, *flags)
    (data,) = client_data(tmp_path, 1)
    agent = start_agent(pki_dir, "dev-1", data, server.url, "--broker", str(broker.address))

    def failure() -> dict | None:
        statuses = [json.loads(p) for p in ops.payloads(status_topic("edge", "dev-1"))]
        return next((s for s in statuses if s["state"] == "error"), None)

    failed = wait_for(failure, 120, "the round to be reported failed")
    assert "round 1 failed" in failed["detail"]
    assert "hung" in failed["detail"]
    assert stored_updates(server.data) == []
    assert agent.process.poll() is None  # the agent itself goes on


def test_an_enrolled_device_runs_the_agent_from_its_state_directory_alone(
    make_pki, start_broker, start_task_server, start_agent, probe, tmp_path: Path
) -> None:
    pki_dir = make_pki()
    broker = start_broker(pki_dir)
    server = start_task_server(pki_dir, "--mqtt", str(broker.address), "--rounds", "1")
    token = run_cli("pki", "token", "--dir", str(pki_dir), "--client", "dev-1", "--ttl", "1").stdout.strip()
    state = tmp_path / "device"
    enrolled = run_cli(
        "agent", "enroll", "--server", server.url, "--token", token,
        "--ca-fingerprint", pki.ca_fingerprint(pki_dir), "--dir", str(state),
    )  # fmt: skip
    assert enrolled.returncode == 0, enrolled.stderr
    # The operator lets the new device on the broker: the ACL again, then SIGHUP.
    broker.write_config(pki_dir)
    broker.process.send_signal(signal.SIGHUP)
    (data,) = client_data(tmp_path, 1)
    agent = start_agent.enrolled(state, data, "--broker", str(broker.address))
    wait_for(lambda: finished(server, pki_dir), 300, "the round to finish")
    assert stored_updates(server.data) == [(1, "dev-1")]
    assert agent.status()["transport"] == "mqtt"
    ops = probe(broker, tls_for(pki_dir, pki.Role.ADMIN, "ops"), (status_topic("edge", "dev-1"),))
    assert ops.admitted()
    # The reloaded ACL lets the device write its status: the retained one reaches the operator.
    wait_for(lambda: ops.payloads(status_topic("edge", "dev-1")), 30, "the device's status")
