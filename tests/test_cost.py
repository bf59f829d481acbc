"""Cost per round end to end: usage an update reports is stored (SQLite and PostgreSQL), billed at the
server's ``--prices`` and shown in its overview, ``fedge runs`` and ``/metrics``; a simulation's
metrics.json carries the bill per round and per run; a bad price file is one line naming the key."""

from __future__ import annotations

import json
from pathlib import Path

import httpx
import pytest
from conftest import federation_pki
from prometheus_client.parser import text_string_to_metric_families
from test_service import open_round
from test_simulate import run_cli

from fedge.codec import encode
from fedge.edge_functions import tasks
from fedge.pricing import GB, Prices, Usage, cost
from fedge.security import pki
from fedge.security.tls import client_context
from fedge.server.launcher import launch
from fedge.server.store import Store
from fedge.transport import FedgeClient
from fedge.wire import UpdateMeta

PRICES_TOML = """\
device_gb_second = 0.1
executor_gb_second = 1.0
executor_gpu_second = 2.0
executor_invocation = 0.5
gb_up = 1000.0
gb_down = 0.0
"""
PRICES = Prices(device_gb_second=0.1, executor_gb_second=1.0, executor_gpu_second=2.0,
                executor_invocation=0.5, gb_up=1000.0, gb_down=0.0)  # fmt: skip
ON_EXECUTOR = Usage(executor_seconds=2.0, executor_gb_seconds=2.0, executor_invocations=1, gpu_seconds=1.0,
                    bytes_down=5000)  # fmt: skip
ON_DEVICE = Usage(device_seconds=5.0, device_gb_seconds=10.0, device_invocations=1, bytes_down=5000)


def _update(seed: int, usage: Usage) -> bytes:
    tensors = tasks.get("digits").initial_tensors(seed)
    return encode(tensors, UpdateMeta(50, usage=usage).to_metadata())


def _samples(url: str, creds: pki.Credentials) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    with httpx.Client(base_url=url, verify=client_context(creds), timeout=15) as http:
        text = http.get("/metrics").text
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def test_a_server_stores_usage_and_bills_each_round_at_its_prices(tmp_path: Path) -> None:
    pki_dir = federation_pki(tmp_path / "pki", "billed", ("alice", "bob"))
    prices = tmp_path / "prices.toml"
    prices.write_text(PRICES_TOML)
    data = tmp_path / "state"
    args = ["--pki", str(pki_dir), "--port", "0", "--task", "digits", "--presence-window", "0",
            "--rounds", "2", "--min-updates", "2", "--round-timeout", "3600",
            "--prices", str(prices)]  # fmt: skip
    server = launch(args, data, tmp_path / "server.log", timeout=120)
    admin = pki.credentials(pki_dir, pki.Role.ADMIN, "ops")
    alice = FedgeClient(server.url, pki.credentials(pki_dir, pki.Role.CLIENT, "alice"))
    bob = FedgeClient(server.url, pki.credentials(pki_dir, pki.Role.CLIENT, "bob"))
    try:
        first = open_round(alice)
        sent = [_update(1, ON_EXECUTOR), _update(2, ON_DEVICE)]
        alice.post_update(first.round, sent[0])
        bob.post_update(first.round, sent[1])
        second = open_round(alice)
        assert second.round == 2
        alice.post_update(second.round, sent[0])  # round 2 stays open: its cost so far is alice's
        # What round 1 cost: the executor's GB-s, GPU-s and invocation, the device's GB-s, the bytes up.
        expected = cost(ON_EXECUTOR + ON_DEVICE + Usage(bytes_up=len(sent[0]) + len(sent[1])), PRICES)
        assert expected.total == pytest.approx(
            2.0 + 2.0 + 0.5 + 1.0 + (len(sent[0]) + len(sent[1])) / GB * 1000
        )
        alice_cost = cost(ON_EXECUTOR + Usage(bytes_up=len(sent[0])), PRICES).total

        with FedgeClient(server.url, admin) as api:
            rounds = {r["round"]: r for r in api.overview()["rounds"]}
        assert rounds[1]["cost"] == pytest.approx(expected.total)
        assert rounds[1]["usage"]["gpu_seconds"] == 1.0
        assert rounds[1]["usage"]["bytes_up"] == len(sent[0]) + len(sent[1])
        assert rounds[2]["cost"] == pytest.approx(alice_cost)

        exported = _samples(server.url, admin)
        assert exported["fedge_round_cost", ()] == pytest.approx(alice_cost)
        components = {
            c: exported["fedge_cost_total", (("component", c),)] for c in expected.as_dict() if c != "total"
        }
        assert sum(components.values()) == pytest.approx(expected.total + alice_cost)
        assert components["gpu"] == pytest.approx(2 * 2.0)
        assert exported["fedge_gb_seconds_total", (("place", "device"),)] == 10.0
        assert exported["fedge_gpu_seconds_total", ()] == 2.0
        assert exported["fedge_invocations_total", (("place", "executor"),)] == 2
        assert exported["fedge_transfer_bytes_total", (("direction", "down"),)] == 3 * 5000
    finally:
        alice.close()
        bob.close()
        server.stop()
    # ``fedge runs`` reads the stopped server's store and bills it at the same table.
    listed = run_cli("runs", "--data", str(data), "--prices", str(prices))
    assert listed.returncode == 0, listed.stderr
    assert f"cost of the run: {expected.total + alice_cost:.6f}" in listed.stdout


@pytest.fixture(params=["sqlite", "postgresql"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Store:
    url = request.getfixturevalue("postgres_url") if request.param == "postgresql" else None
    opened = Store(tmp_path / "data", url)
    yield opened
    opened.close()


def test_usage_is_recorded_once_per_update_and_summed_per_round(store: Store) -> None:
    store.record_usage(1, "alice", ON_EXECUTOR + Usage(bytes_up=3 * 2**31))  # past a 32-bit integer
    store.record_usage(1, "bob", ON_DEVICE)
    store.record_usage(1, "bob", ON_EXECUTOR)  # a second report of one update counts for nothing
    store.record_usage(2, "alice", ON_DEVICE)
    summed = store.usage_by_round()
    assert summed[1] == ON_EXECUTOR + ON_DEVICE + Usage(bytes_up=3 * 2**31)
    assert summed[2] == ON_DEVICE
    assert isinstance(summed[1].device_invocations, int)


def test_a_simulation_reports_the_cost_of_each_round_and_of_the_run(tmp_path: Path) -> None:
    prices = tmp_path / "prices.toml"
    prices.write_text("device_gb_second = 1.0\ndevice_invocation = 0.25\ngb_down = 0\ngb_up = 0\n")
    out = tmp_path / "run"
    done = run_cli(
        "simulate", "--dataset", "digits", "--partition", "iid", "--clients", "2", "--rounds", "2",
        "--workers", "2", "--prices", str(prices), "--out", str(out),
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    metrics = json.loads((out / "metrics.json").read_text())
    costs = [r["cost"] for r in metrics["rounds"]]
    # Two device rounds each: 0.25 an invocation, plus the GB-s the workers held while they trained.
    assert all(c > 2 * 0.25 for c in costs)
    assert metrics["cost"] == pytest.approx(sum(costs))
    assert metrics["usage"]["device_invocations"] == 4
    assert metrics["usage"]["device_gb_seconds"] == pytest.approx(metrics["cost"] - 4 * 0.25)
    assert "cost of the run" in done.stdout
    shown = run_cli("report", str(out))
    assert shown.returncode == 0, shown.stderr
    assert f"{metrics['cost']:.6f}" in shown.stdout


@pytest.mark.parametrize(
    ("text", "key"), [("gpu_price = 1\n", "gpu_price"), ("executor_gpu_second = -2\n", "executor_gpu_second")]
)
def test_a_bad_price_file_is_one_line_naming_the_key_from_every_command(
    tmp_path: Path, text: str, key: str
) -> None:
    prices = tmp_path / "prices.toml"
    prices.write_text(text)
    pki_dir = federation_pki(tmp_path / "pki", "billed", ("alice",))
    commands = [
        ("server", "--pki", str(pki_dir), "--data", str(tmp_path / "state"), "--prices", str(prices)),
        ("simulate", "--dataset", "digits", "--clients", "2", "--out", str(tmp_path / "run"), "--prices",
         str(prices)),
        ("runs", "--data", str(tmp_path / "state"), "--prices", str(prices)),
    ]  # fmt: skip
    for command in commands:
        done = run_cli(*command)
        assert done.returncode == 1, (command, done.stderr)
        lines = done.stderr.strip().splitlines()
        assert len(lines) == 1, done.stderr
        assert key in lines[0]
        assert "Traceback" not in done.stderr
    assert not (tmp_path / "state").exists()  # refused before the server made its --data
    assert not (tmp_path / "run" / "metrics.json").exists()


@pytest.mark.parametrize("budget", [None, 0.5])
def test_a_device_past_its_budget_skips_instead_of_renting_the_executor(
    tmp_path: Path, budget: float | None
) -> None:
    """Two devices: one ordinary, one memory-starved whose owner allows offload. Without a budget the
    executor trains for it at 1.0 an invocation; with a budget of 0.5 that is too dear, so it skips, and
    the run costs nothing."""
    profile = tmp_path / "devices.toml"
    profile.write_text(
        '[default]\noffload = "never"\n\n[[group]]\nshare = 0.5\nmemory_mb = 16\noffload = "when-short"\n'
    )
    prices = tmp_path / "prices.toml"
    prices.write_text("executor_invocation = 1.0\ngb_down = 0\n")
    out = tmp_path / "run"
    done = run_cli(
        "simulate", "--dataset", "digits", "--partition", "iid", "--clients", "2", "--rounds", "2",
        "--round-timeout", "25", "--profile", str(profile), "--prices", str(prices), "--out", str(out),
        *([] if budget is None else ["--max-cost", str(budget)]),
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    metrics = json.loads((out / "metrics.json").read_text())
    if budget is None:
        assert metrics["placements"] == {"edge": 2, "offload:executor-0": 2}
        assert metrics["usage"]["executor_invocations"] == 2
        assert metrics["cost"] >= 2 * 1.0  # and the executor's memory-seconds at the example rate
    else:
        assert metrics["placements"] == {"edge": 2, "skip": 2}
        assert metrics["usage"]["executor_invocations"] == 0
        assert metrics["cost"] == 0.0
