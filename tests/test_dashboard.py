"""The operator's views of a federation: the admin overview, the live dashboard (in a real headless
Chromium during a real simulation), ``fedge runs`` and ``fedge report``."""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from conftest import free_port, update_body, wait_for
from fastapi.testclient import TestClient
from test_admin_control import admin_http
from test_service import open_round
from test_simulate import run_cli

from fedge.security import pki
from fedge.server.dashboard import Watch, create_app, serving, with_local
from fedge.sim.fleet import Outcome
from fedge.sim.report import Report, RoundMetrics

CHROMIUM = shutil.which("chromium")
needs_chromium = pytest.mark.skipif(
    CHROMIUM is None and not os.environ.get("CI"), reason="Debian's chromium is not installed (make system)"
)


def play_a_round_with_a_skip_and_a_straggler(start_server, connect, pki_dir, tmp_path):
    """Round 1: alice sends an update, carol skips, bob says nothing until the deadline; round 2 fails (no
    one reports)."""
    server = start_server("--rounds", "2", "--round-timeout", "2", data=tmp_path / "state")
    alice, carol = connect(server, "alice"), connect(server, "carol")
    info = open_round(alice)
    carol.skip(info.round, "out of memory")
    alice.post_update(info.round, update_body(1.0))
    with admin_http(server, pki_dir) as admin:
        wait_for(lambda: admin.get("/v1/admin/rounds").json()[-1]["state"] == "failed", 30, "round 2 to fail")
    return server


def test_the_overview_counts_updates_skips_stragglers_and_failures(
    start_server, connect, pki_dir, tmp_path
) -> None:
    server = play_a_round_with_a_skip_and_a_straggler(start_server, connect, pki_dir, tmp_path)
    with admin_http(server, pki_dir) as admin:
        overview = admin.get("/v1/admin/overview").json()
    first, second = overview["rounds"]
    assert (first["state"], first["updates"], first["skipped"]) == ("done", 1, 1)
    assert first["skips"] == {"carol": "out of memory"}
    assert first["stragglers"] == ["bob"]
    assert first["bytes"] == len(update_body(1.0))
    assert first["waiting"] >= 0
    assert first["closing"] >= 0
    assert (second["state"], second["stragglers"]) == ("failed", ["alice", "bob", "carol"])
    clients = {c["id"]: c for c in overview["clients"]}
    assert set(clients) == {"alice", "bob", "carol"}
    assert (clients["alice"]["trained"], clients["alice"]["placements"], clients["alice"]["missed"]) == (
        1, {"device": 1}, 1,
    )  # fmt: skip
    assert (clients["carol"]["skipped"], clients["carol"]["last_skip"]) == (1, "out of memory")
    assert clients["bob"]["missed"] == 2
    assert clients["alice"]["last_seen"] is not None
    assert all(c["certificate_status"] == "valid" for c in clients.values())


def test_a_quiet_rounds_overview_moves_on_with_the_clock_and_shows_an_update_at_once(
    start_server, connect, pki_dir, tmp_path
) -> None:
    server = start_server("--rounds", "2", "--round-timeout", "60", data=tmp_path / "state")
    alice = connect(server, "alice")
    info = open_round(alice)
    with admin_http(server, pki_dir) as admin:
        before = admin.get("/v1/admin/overview").json()
        time.sleep(0.3)
        quiet = admin.get("/v1/admin/overview").json()
        alice.post_update(info.round, update_body(1.0))
        after = admin.get("/v1/admin/overview").json()
    assert quiet["now"] > before["now"]
    assert quiet["rounds"][0]["seconds"] == pytest.approx(
        quiet["now"] - quiet["rounds"][0]["opened_at"], abs=1e-6
    )
    assert quiet["rounds"][0]["seconds"] > before["rounds"][0]["seconds"]
    assert {k: v for k, v in quiet.items() if k not in ("now", "rounds")} == {
        k: v for k, v in before.items() if k not in ("now", "rounds")
    }
    assert (before["rounds"][0]["updates"], after["rounds"][0]["updates"]) == (0, 1)
    assert {c["id"]: c["trained"] for c in after["clients"]}["alice"] == 1


def test_a_client_certificate_reads_no_overview(start_server, connect) -> None:
    refused = connect(start_server(), "alice")._http.get("/v1/admin/overview")
    assert (refused.status_code, refused.json()["error"]) == (403, "wrong_role")


def test_a_dashboard_with_a_client_certificate_is_one_line_and_exits(start_server, pki_dir) -> None:
    server = start_server()
    creds = pki.credentials(pki_dir, pki.Role.CLIENT, "alice")
    done = run_cli(
        "dashboard", "--server", server.url, "--ca", str(creds.ca), "--cert", str(creds.cert),
        "--key", str(creds.key), "--port", str(free_port()),
    )  # fmt: skip
    assert done.returncode != 0
    assert done.stderr.strip().splitlines() == [
        "error: the dashboard needs an admin certificate: the server says this route is for admins, not"
        " client"
    ]


def test_a_dashboard_that_cannot_reach_its_server_is_one_line(pki_dir) -> None:
    creds = pki.credentials(pki_dir, pki.Role.ADMIN, "ops")
    done = run_cli(
        "dashboard", "--server", f"https://127.0.0.1:{free_port()}", "--ca", str(creds.ca),
        "--cert", str(creds.cert), "--key", str(creds.key),
    )  # fmt: skip
    assert done.returncode != 0
    assert len(done.stderr.strip().splitlines()) == 1
    assert done.stderr.startswith("error: cannot reach the server")


def test_a_dashboard_on_a_port_in_use_is_one_line(start_server, pki_dir) -> None:
    server = start_server()
    creds = pki.credentials(pki_dir, pki.Role.ADMIN, "ops")
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        done = run_cli(
            "dashboard", "--server", server.url, "--ca", str(creds.ca), "--cert", str(creds.cert),
            "--key", str(creds.key), "--port", str(taken.getsockname()[1]),
        )  # fmt: skip
    assert done.returncode == 1
    assert len(done.stderr.strip().splitlines()) == 1, done.stderr
    assert "error: the dashboard cannot listen on 127.0.0.1:" in done.stderr


def test_the_page_answers_only_requests_to_loopback_and_keeps_what_clients_wrote_inert(pki_dir) -> None:
    """A name rebound to 127.0.0.1 by another site (DNS rebinding) gets nothing; a skip reason that looks
    like markup stays text inside the page's JSON."""
    watch = Watch("https://127.0.0.1:1", pki.credentials(pki_dir, pki.Role.ADMIN, "ops"))
    watch.state = json.dumps({"skips": {"mallory": "</script><script>alert(1)</script>"}})
    app = create_app(watch)
    with TestClient(app, base_url="http://127.0.0.1:8500") as local:
        page = local.get("/")
        assert page.status_code == 200
        assert "alert(1)" in page.text
        assert "</script><script>alert" not in page.text
        assert local.get("/api/state").json() == json.loads(watch.state)
    with TestClient(app, base_url="http://fedge.attacker.example:8500") as rebound:
        assert rebound.get("/").status_code == 400
        assert rebound.get("/api/state").status_code == 400


def test_the_page_hears_of_a_closed_round_at_once_not_at_the_next_refresh(
    start_server, connect, pki_dir
) -> None:
    """With refreshes 60 s apart, only the long poll on the round can bring the closed round to the page's
    event stream within seconds."""
    server = start_server("--rounds", "2")
    watch = Watch(server.url, pki.credentials(pki_dir, pki.Role.ADMIN, "ops"), refresh=60)
    watch.check()
    apis = [connect(server, name) for name in ("alice", "bob", "carol")]
    info = open_round(apis[0])
    with serving(watch, free_port()) as page, httpx.stream("GET", f"{page}api/events", timeout=30) as events:
        states = overviews(events)
        assert next(states)["round"]["round"] == info.round
        for api in apis:
            api.post_update(info.round, update_body(1.0))
        started = time.monotonic()
        state = next(s for s in states if s["rounds"][0]["state"] == "done")
        assert time.monotonic() - started < 10
        assert state["round"]["round"] == info.round + 1


def overviews(events: httpx.Response) -> Iterator[dict]:
    """The overviews a server-sent event stream carries, as they come."""
    for line in events.iter_lines():
        if line.startswith("data: "):
            yield json.loads(line.removeprefix("data: "))


def chromium(*args: str) -> subprocess.CompletedProcess[str]:
    if CHROMIUM is None:
        pytest.fail("chromium is not installed, and CI is set: `make system` installs it")
    return subprocess.run(
        [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars", *args],
        capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip


def keep_artifact(path: Path) -> None:
    """Screenshots stay in the test's tmp dir, and in test-artifacts/ when FEDGE_ARTIFACTS is set (CI)."""
    if os.environ.get("FEDGE_ARTIFACTS"):
        kept = Path(__file__).resolve().parents[1] / "test-artifacts"
        kept.mkdir(exist_ok=True)
        shutil.copy(path, kept / path.name)


@needs_chromium
def test_chromium_shows_the_current_round_a_point_per_finished_round_and_every_client(tmp_path) -> None:
    """A real simulation with --dashboard; the page opened in Chromium while rounds go on."""
    port = free_port()
    log = (tmp_path / "simulate.log").open("w")
    simulation = subprocess.Popen(
        [sys.executable, "-m", "fedge", "simulate", "--dataset", "digits", "--clients", "3", "--rounds", "6",
         "--stragglers", "0.34", "--straggler-delay", "3", "--out", str(tmp_path / "run"),
         "--dashboard", str(port)],
        stdout=log, stderr=subprocess.STDOUT,
    )  # fmt: skip
    url = f"http://127.0.0.1:{port}/"
    try:

        def two_rounds_evaluated() -> dict | None:
            try:
                state = httpx.get(f"{url}api/state", timeout=5).json()
            except httpx.HTTPError:
                return None
            evaluated = len(state.get("evaluations", []))
            return state if evaluated >= 2 and state["round"]["state"] == "open" else None

        seen = wait_for(two_rounds_evaluated, 240, "two evaluated rounds on the dashboard")
        dumped = chromium("--dump-dom", url)
        shot = tmp_path / "dashboard.png"
        chromium(f"--screenshot={shot}", "--window-size=1200,1100", url)
    finally:
        assert simulation.wait(timeout=300) == 0, (tmp_path / "simulate.log").read_text()[-2000:]
    dom = dumped.stdout
    current = int(re.search(r'id="current-round">(\d+)<', dom).group(1))
    assert current >= seen["round"]["round"]
    done = sorted(int(r) for r in re.findall(r'class="round state-done" data-round="(\d+)"', dom))
    assert done == list(range(1, current))  # every round before the current one closed, and shows so
    points = [int(r) for r in re.findall(r'class="point" data-round="(\d+)"', dom)]
    assert points == list(range(1, len(points) + 1))  # one point per round, in order
    assert len(points) in (len(done), len(done) - 1)  # the last close may still be under evaluation
    assert len(points) >= 2
    assert sorted(re.findall(r'class="client" data-id="([^"]+)"', dom)) == [
        "client-0000", "client-0001", "client-0002",
    ]  # fmt: skip
    assert float(re.search(r'id="cost-total">([\d.]+)<', dom).group(1)) >= 0  # the run's bill, shown
    assert shot.stat().st_size > 10_000
    keep_artifact(shot)


def test_runs_lists_the_rounds_in_a_servers_data(
    start_server, connect, pki_dir, tmp_path, monkeypatch
) -> None:
    monkeypatch.setenv("COLUMNS", "200")  # rich fits the table to the terminal: one this wide shows it whole
    server = play_a_round_with_a_skip_and_a_straggler(start_server, connect, pki_dir, tmp_path)
    server.stop()
    done = run_cli("runs", "--data", str(tmp_path / "state"))
    assert done.returncode == 0, done.stderr
    rows = [line for line in done.stdout.splitlines() if re.match(r"\W+[12] ", line)]
    assert len(rows) == 2
    assert "done" in rows[0]
    assert "failed" in rows[1]


@pytest.mark.parametrize("flags", [("runs", "--data"), ("report",)])
def test_a_directory_that_holds_no_run_is_one_line(tmp_path, flags) -> None:
    (tmp_path / "empty").mkdir()
    (tmp_path / "garbage").mkdir()
    (tmp_path / "garbage" / "state.db").write_bytes(b"not a database, but named like one" * 100)
    for directory in (tmp_path / "empty", tmp_path / "missing", tmp_path / "garbage"):
        done = run_cli(*flags, str(directory))
        assert done.returncode == 1
        assert len(done.stderr.strip().splitlines()) == 1, done.stderr
        assert done.stderr.startswith("error: ")
    assert not (tmp_path / "missing").exists()
    assert list((tmp_path / "empty").iterdir()) == []
    assert [p.name for p in (tmp_path / "garbage").iterdir()] == ["state.db"]


def test_report_of_a_servers_data_splits_round_time_and_plots_it(
    start_server, connect, pki_dir, tmp_path
) -> None:
    server = play_a_round_with_a_skip_and_a_straggler(start_server, connect, pki_dir, tmp_path)
    done = run_cli("report", str(tmp_path / "state"), "--out", str(tmp_path / "plots"))
    assert done.returncode == 0, done.stderr
    assert "waiting" in done.stdout
    assert "closing" in done.stdout
    assert "1 device" in done.stdout
    assert sorted(p.name for p in (tmp_path / "plots").iterdir()) == ["placements.png", "round-time.png"]
    server.stop()


def test_report_of_a_simulation_plots_accuracy_and_placements(tmp_path) -> None:
    metrics = {
        "rounds": [
            {"round": 1, "accuracy": 0.5, "loss": 1.2, "updates": 3, "seconds": 2.0, "bytes_up": 1000},
            {"round": 2, "accuracy": 0.8, "loss": 0.6, "updates": 2, "seconds": 1.5, "bytes_up": 800},
        ],
        "placements": {"edge": 4, "offload:executor-0": 1},
    }
    (tmp_path / "metrics.json").write_text(json.dumps(metrics))
    done = run_cli("report", str(tmp_path))
    assert done.returncode == 0, done.stderr
    assert "0.8000" in done.stdout
    assert "1 offload:executor-0" in done.stdout
    assert {"accuracy.png", "placements.png"} <= {p.name for p in tmp_path.iterdir()}
    assert not (tmp_path / "round-time.png").exists()  # a simulation's output does not split round time


def test_a_malformed_metrics_json_is_one_line(tmp_path) -> None:
    (tmp_path / "metrics.json").write_text('{"rounds": [{"round": 1}]}')
    done = run_cli("report", str(tmp_path))
    assert done.returncode == 1
    assert done.stderr.strip().splitlines() == [
        f"error: {tmp_path / 'metrics.json'} is not a simulation's metrics.json: no 'updates' in it"
    ]


def test_a_simulation_adds_its_evaluations_and_where_each_device_trained() -> None:
    report = Report(settings={})
    report.count(Outcome("client-0000", "edge", accepted=True))
    report.count(Outcome("client-0000", "offload:executor-0", accepted=True, raw_bytes=4096))
    report.count(Outcome("client-0001", "fewer-steps", accepted=False))
    report.rounds.append(RoundMetrics(1, 0.5, 1.0, 2, 1.0, 10, 10, ended=0.0))
    server_view = {
        "clients": [
            {"id": "client-0000", "placements": {"device": 1, "offload": 1}, "raw_bytes_offloaded": None},
            {"id": "client-0001", "placements": {}, "raw_bytes_offloaded": None},
            {"id": "client-0002", "placements": {"device": 2}, "raw_bytes_offloaded": None},
        ]
    }
    shown = with_local(server_view, report.live())
    clients = {c["id"]: c for c in shown["clients"]}
    assert clients["client-0000"]["placements"] == {"edge": 1, "offload:executor-0": 1}
    assert clients["client-0000"]["raw_bytes_offloaded"] == 4096
    assert clients["client-0001"]["placements"] == {"fewer-steps": 1}
    assert clients["client-0001"]["raw_bytes_offloaded"] is None  # it offloaded nothing
    assert clients["client-0002"]["placements"] == {"device": 2}  # the simulation knows nothing more
    assert shown["evaluations"] == [{"round": 1, "accuracy": 0.5, "loss": 1.0}]
