"""Watching a real federation: the server's own evaluation (``--eval-data``), ``/metrics`` after a round,
and the shipped Prometheus scrape config and Grafana dashboard checked against that running server.

One ``fedge server`` process (task digits, scored on 360 held-out digits) plays round 1 for the whole
module: alice and carol send updates, carol's resend is refused, bob skips; round 2 is then open."""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import numpy as np
import pytest
from conftest import federation_pki, free_port, wait_for
from cryptography import x509
from prometheus_client.parser import text_string_to_metric_families
from test_service import open_round

from fedge.codec import decode, encode
from fedge.console import UserError
from fedge.edge_functions import datasets, tasks
from fedge.edge_functions.functions import score
from fedge.security import pki
from fedge.security.tls import client_context
from fedge.server.evaluation import ServerEvaluation
from fedge.server.launcher import ServerProcess, launch
from fedge.server.store import Store
from fedge.transport import FedgeClient, ServerError

ROOT = Path(__file__).resolve().parents[1]
PROMETHEUS_YML = ROOT / "deploy" / "prometheus" / "prometheus.yml"
DASHBOARD = ROOT / "deploy" / "grafana" / "fedge-dashboard.json"
EVALUATED = re.compile(r"round (\d+) evaluated \(server, (\d+) examples\): accuracy ([\d.]+), loss ([\d.]+)")


@dataclass
class Watched:
    server: ServerProcess
    pki_dir: Path
    eval_file: Path
    update_size: int
    model_size: int


def needs(binary: str) -> str:
    """The binary's path; without it, a skip on a developer's machine and a failure in CI."""
    found = shutil.which(binary)
    if found is None:
        if os.environ.get("CI"):
            pytest.fail(f"{binary} is missing: make system installs it (Debian's prometheus package)")
        pytest.skip(f"{binary} is missing (Debian's prometheus package)")
    return found


def digits_update(seed: float) -> bytes:
    return encode(tasks.get("digits").initial_tensors(int(seed)), {"num_examples": "50"})


@pytest.fixture(scope="module")
def watched(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Watched]:
    work = tmp_path_factory.mktemp("watched")
    pki_dir = federation_pki(work / "pki", "watch", ("alice", "bob", "carol"))
    pki.issue(pki_dir, pki.Role.ADMIN, "prometheus")
    digits = datasets.load("digits")
    eval_file = work / "held-out.npz"
    np.savez(eval_file, x=digits.x_test, y=digits.y_test)
    args = ["--pki", str(pki_dir), "--port", "0", "--task", "digits", "--presence-window", "0", "--rounds",
            "2", "--round-timeout", "3600", "--eval-data", str(eval_file)]  # fmt: skip
    server = launch(args, work / "state", work / "server.log", timeout=120)
    clients = {
        n: FedgeClient(server.url, pki.credentials(pki_dir, pki.Role.CLIENT, n))
        for n in ("alice", "bob", "carol")
    }
    try:
        first = open_round(clients["alice"])
        downloaded = clients["alice"].model()
        assert downloaded is not None
        body = digits_update(1)
        clients["alice"].post_update(first.round, body)
        clients["bob"].skip(first.round, "out of memory")
        clients["carol"].post_update(first.round, digits_update(2))
        with pytest.raises(ServerError, match="duplicate_update"):
            clients["carol"].post_update(first.round, digits_update(2))
        wait_for(lambda: "round 1 evaluated" in server.log.read_text(), 60, "round 1's evaluation")
        yield Watched(server, pki_dir, eval_file, len(body), len(downloaded.body))
    finally:
        for client in clients.values():
            client.close()
        server.stop()


def scrape(watched: Watched, role: pki.Role = pki.Role.ADMIN, id_: str = "prometheus") -> httpx.Response:
    creds = pki.credentials(watched.pki_dir, role, id_)
    with httpx.Client(base_url=watched.server.url, verify=client_context(creds), timeout=15) as http:
        return http.get("/metrics")


def samples(watched: Watched) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every exported sample: (name, sorted labels) -> value."""
    text = scrape(watched).text
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def test_the_server_scores_each_new_model_on_the_eval_data_and_logs_stores_and_exports_it(
    watched: Watched,
) -> None:
    lines = watched.server.log.read_text().splitlines()
    scored = {
        int(m[1]): (int(m[2]), float(m[3]), float(m[4])) for line in lines if (m := EVALUATED.search(line))
    }
    assert sorted(scored) == [0, 1]  # the model it started from, then round 1's
    closed = next(i for i, line in enumerate(lines) if "round 1 closed" in line)
    assert "round 1 evaluated" in "".join(lines[closed + 1 :])  # scored after its round closed
    store = Store(watched.server.data)
    try:
        round_one = store.round(1)
        assert round_one is not None
        assert round_one.result_sha256 is not None
        model = tasks.get("digits").build_model()
        tasks.load_tensors(model, decode(store.model_path(round_one.result_sha256).read_bytes())[0])
        with np.load(watched.eval_file) as held_out:
            loss, accuracy = score(model, held_out["x"], held_out["y"])
        stored = {(e.round, e.source): e for e in store.evaluations()}
    finally:
        store.close()
    assert scored[1][0] == 360
    assert scored[1][1] == pytest.approx(accuracy, abs=1e-4)
    assert scored[1][2] == pytest.approx(loss, abs=1e-4)
    assert set(stored) == {(0, "server"), (1, "server")}
    assert (stored[1, "server"].accuracy, stored[1, "server"].examples) == (pytest.approx(accuracy), 360)
    exported = samples(watched)
    assert exported["fedge_model_accuracy", (("source", "server"),)] == pytest.approx(accuracy)
    assert exported["fedge_model_loss", (("source", "server"),)] == pytest.approx(loss)
    assert exported["fedge_model_evaluated_round", (("source", "server"),)] == 1
    assert not [key for key in exported if ("source", "federated") in key[1]]  # never set: not exported


def test_the_dashboards_overview_carries_the_servers_evaluation_of_each_round(watched: Watched) -> None:
    creds = pki.credentials(watched.pki_dir, pki.Role.ADMIN, "prometheus")
    with httpx.Client(base_url=watched.server.url, verify=client_context(creds), timeout=15) as http:
        overview = http.get("/v1/admin/overview").json()
    store = Store(watched.server.data)
    try:
        stored = {e.round: e for e in store.evaluations()}
    finally:
        store.close()
    assert [p["round"] for p in overview["evaluations"]] == [0, 1]
    assert overview["evaluations"][1]["accuracy"] == pytest.approx(stored[1].accuracy)
    round_one = next(r for r in overview["rounds"] if r["round"] == 1)
    assert (round_one["accuracy"], round_one["loss"]) == (
        pytest.approx(stored[1].accuracy),
        pytest.approx(stored[1].loss),
    )
    assert next(r for r in overview["rounds"] if r["round"] == 2)["accuracy"] is None  # still open


def test_metrics_after_a_round_say_what_happened_in_it(watched: Watched) -> None:
    exported = samples(watched)
    assert exported["fedge_round", ()] == 2
    assert exported["fedge_round_state", (("fedge_round_state", "open"),)] == 1
    assert exported["fedge_round_state", (("fedge_round_state", "waiting"),)] == 0
    assert (exported["fedge_round_selected", ()], exported["fedge_round_updates", ()]) == (3, 0)
    assert exported["fedge_rounds_total", (("outcome", "done"),)] == 1
    assert exported["fedge_round_duration_seconds_count", ()] == 1
    assert exported["fedge_aggregation_seconds_count", ()] == 1
    assert exported["fedge_update_bytes_count", ()] == 2
    assert exported["fedge_update_bytes_sum", ()] == 2 * watched.update_size
    assert exported["fedge_received_bytes_total", ()] == 2 * watched.update_size
    assert exported["fedge_sent_bytes_total", ()] >= watched.model_size
    assert exported["fedge_placements_total", (("kind", "device"),)] == 2
    assert exported["fedge_placements_total", (("kind", "skip"),)] == 1
    assert exported["fedge_updates_rejected_total", (("code", "duplicate_update"),)] == 1
    assert exported["fedge_offloaded_raw_bytes_total", ()] == 0
    assert exported["fedge_agents_seen_last_minute", ()] == 3  # the admins' scrapes are nobody's presence
    now = time.time()
    for name, path in (
        ("server", watched.pki_dir / "server" / "server.pem"),
        ("ca", watched.pki_dir / "ca.pem"),
    ):
        expires = x509.load_pem_x509_certificate(path.read_bytes()).not_valid_after_utc.timestamp()
        assert exported["fedge_certificate_expiry_seconds", (("certificate", name),)] == pytest.approx(
            expires - now, abs=60
        )
    crl = watched.pki_dir / "crl.pem"
    due = exported["fedge_certificate_expiry_seconds", (("certificate", "crl"),)]
    if crl.exists():
        next_update = x509.load_pem_x509_crl(crl.read_bytes()).next_update_utc
        assert next_update is not None
        assert due == pytest.approx(next_update.timestamp() - now, abs=60)
    else:
        assert math.isnan(due)


def test_metrics_answer_admin_certificates_only(watched: Watched) -> None:
    refused = scrape(watched, pki.Role.CLIENT, "alice")
    assert (refused.status_code, refused.json()["error"]) == (403, "wrong_role")
    assert scrape(watched).status_code == 200


def test_every_metric_the_grafana_dashboard_shows_is_exported_by_a_running_server(watched: Watched) -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    expressions = [t["expr"] for panel in dashboard["panels"] for t in panel["targets"]]
    referenced = {name for expr in expressions for name in re.findall(r"\bfedge_[a-z0-9_]+", expr)}
    exported = {name for name, _ in samples(watched)}
    assert referenced, "the dashboard shows no fedge series"
    assert referenced <= exported, sorted(referenced - exported)
    assert {"fedge_model_accuracy", "fedge_round", "fedge_certificate_expiry_seconds"} <= referenced
    assert all(panel["datasource"]["type"] == "prometheus" for panel in dashboard["panels"])


def scrape_config(watched: Watched, folder: Path) -> Path:
    """The shipped config, beside the files it names (the federation's CA, Prometheus's admin pair)."""
    (folder / "fedge").mkdir(parents=True)
    creds = pki.credentials(watched.pki_dir, pki.Role.ADMIN, "prometheus")
    for source, name in ((creds.ca, "ca.pem"), (creds.cert, "prometheus.pem"), (creds.key, "prometheus.key")):
        shutil.copy(source, folder / "fedge" / name)
    config = folder / "prometheus.yml"
    shutil.copy(PROMETHEUS_YML, config)
    return config


def test_the_prometheus_config_passes_promtool(watched: Watched, tmp_path: Path) -> None:
    promtool = needs("promtool")
    config = scrape_config(watched, tmp_path)
    checked = subprocess.run([promtool, "check", "config", str(config)], capture_output=True, text=True)
    assert checked.returncode == 0, checked.stdout + checked.stderr
    (tmp_path / "fedge" / "prometheus.key").unlink()  # the check is real: a missing key fails it
    assert subprocess.run([promtool, "check", "config", str(config)], capture_output=True).returncode != 0


def test_prometheus_scrapes_the_server_over_mutual_tls_with_the_shipped_config(
    watched: Watched, tmp_path: Path
) -> None:
    prometheus = needs("prometheus")
    config = scrape_config(watched, tmp_path)
    target = watched.server.url.removeprefix("https://")
    text = config.read_text().replace('"localhost:8443"', f'"{target}"').replace("15s", "1s")
    config.write_text(text)
    port = free_port()
    with (tmp_path / "prometheus.log").open("wb") as log:
        process = subprocess.Popen(
            [prometheus, f"--config.file={config}", f"--storage.tsdb.path={tmp_path / 'tsdb'}",
             f"--web.listen-address=127.0.0.1:{port}"],
            stdout=log, stderr=log,
        )  # fmt: skip
    try:

        def current_round() -> float | None:
            try:
                answer = httpx.get(f"http://127.0.0.1:{port}/api/v1/query", params={"query": "fedge_round"})
                result = answer.json()["data"]["result"]
            except (httpx.HTTPError, ValueError, KeyError):
                return None
            return float(result[0]["value"][1]) if result else None

        assert wait_for(current_round, 60, "Prometheus's first scrape") == 2
    finally:
        process.terminate()
        process.wait(30)


def test_a_bad_eval_data_file_is_refused_in_one_line_before_anything_is_made(
    watched: Watched, tmp_path: Path
) -> None:
    digits = datasets.load("digits")
    cases = {
        "not-npz.npz": b"x,y\n1,2\n",
        "no-y.npz": {"x": digits.x_test},
        "wrong-shape.npz": {"x": np.zeros((5, 3), np.float32), "y": np.zeros(5, np.int64)},
        "mismatched.npz": {"x": digits.x_test[:5], "y": digits.y_test[:4]},
        "bad-labels.npz": {"x": digits.x_test[:5], "y": np.full(5, 99)},
        "pickled.npz": {"x": np.array([{"code": "run me"}] * 5, dtype=object), "y": np.zeros(5, np.int64)},
    }
    for name, content in cases.items():  # each a UserError naming the file
        path = tmp_path / name
        if isinstance(content, bytes):
            path.write_bytes(content)
        else:
            np.savez(path, **content)  # type: ignore[arg-type]
        with pytest.raises(UserError, match=re.escape(str(path))):
            ServerEvaluation.load("digits", path)
    state = tmp_path / "state"
    done = subprocess.run(
        [sys.executable, "-m", "fedge", "server", "--pki", str(watched.pki_dir), "--data", str(state),
         "--port", "0", "--task", "digits", "--eval-data", str(tmp_path / "wrong-shape.npz")],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert done.returncode != 0
    assert "Traceback" not in done.stdout + done.stderr
    assert len(done.stderr.strip().splitlines()) == 1, done.stderr
    assert "does not fit the model of task digits" in done.stderr
    assert not state.exists()
