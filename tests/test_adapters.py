"""The same functions on other platforms: HTTP function in a real uvicorn process, Lambda handler. (Flower's
clients run as apps: tests/test_flower_apps.py.)"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import httpx
import numpy as np
import pytest
from conftest import client_data, free_port, wait_for
from test_service import stored_updates

from fedge.edge_functions.adapters import aws_lambda
from fedge.security import pki


def credentials(pki_dir: Path, client: str) -> dict:
    creds = pki.credentials(pki_dir, pki.Role.CLIENT, client)
    return {"ca": str(creds.ca), "cert": str(creds.cert), "key": str(creds.key)}


def train_event(server, pki_dir: Path, client: str, data: Path) -> dict:
    return {
        "server": server.url,
        "credentials": credentials(pki_dir, client),
        "task": "digits",
        "round": 1,
        "config": {"local_epochs": 1},
        "data": {"path": str(data)},
    }


@pytest.fixture
def http_function(tmp_path: Path):
    port = free_port()
    log = (tmp_path / "uvicorn.log").open("wb")
    process = subprocess.Popen(
        [sys.executable, "-m", "uvicorn", "fedge.edge_functions.adapters.http:app", "--port", str(port)],
        cwd=tmp_path,  # uvicorn puts its cwd on sys.path: in the tree, the source would shadow the install
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    url = f"http://127.0.0.1:{port}"

    def healthy() -> bool:
        try:
            return httpx.get(f"{url}/healthz").status_code == 200
        except httpx.TransportError:
            return False

    wait_for(healthy, 60, "the HTTP function to start")
    yield url
    process.terminate()
    process.wait(15)
    log.close()


def test_the_http_function_trains_and_evaluates_for_a_real_server(
    http_function: str, make_pki, start_task_server, tmp_path: Path
) -> None:
    pki_dir = make_pki("dev-1")
    server = start_task_server(pki_dir, "--rounds", "1")
    (data,) = client_data(tmp_path, 1)
    with httpx.Client(base_url=http_function, timeout=120) as http:
        trained = http.post("/train", json=train_event(server, pki_dir, "dev-1", data))
        assert trained.status_code == 200, trained.text
        assert trained.headers["x-fedge-cold"] == "true"
        assert trained.json()["num_examples"] == len(np.load(data)["y"])
        assert stored_updates(server.data) == [(1, "dev-1")]
        evaluation = {"server": server.url, "credentials": credentials(pki_dir, "dev-1"), "task": "digits"}
        evaluated = http.post("/evaluate", json=evaluation)
        assert evaluated.status_code == 200
        assert evaluated.headers["x-fedge-cold"] == "false"
        assert 0 <= evaluated.json()["accuracy"] <= 1
        again = http.post("/train", json=train_event(server, pki_dir, "dev-1", data))
        assert again.status_code == 502
        assert again.json()["error"] == "duplicate_update"  # its round-1 update was counted
        bad = http.post("/train", json={"server": server.url})
        assert bad.status_code == 400
        assert bad.json()["error"] == "bad_event"
        assert http.post("/nothing", json={}).json()["error"] == "unknown_function"
        assert http.get("/train").status_code == 405
    assert stored_updates(server.data) == [(1, "dev-1")]


def test_the_lambda_handler_trains_on_a_real_event_and_stays_warm(
    make_pki, start_task_server, tmp_path: Path
) -> None:
    pki_dir = make_pki("dev-1", "dev-2")
    server = start_task_server(pki_dir, "--rounds", "1")
    first, second = client_data(tmp_path, 2)
    cold = aws_lambda.handler(train_event(server, pki_dir, "dev-1", first), None)
    warm = aws_lambda.handler(train_event(server, pki_dir, "dev-2", second), None)
    assert stored_updates(server.data) == [(1, "dev-1"), (1, "dev-2")]
    assert cold["result"]["round"] == 1
    assert not warm["cold"]
    assert warm["startup_seconds"] == 0
    with pytest.raises(ValueError, match="validation error"):
        aws_lambda.handler({"function": "train", "round": 1}, None)
