"""Shared fixtures: a real PKI, the real aggregation service in its own process over mutual TLS, a real
PostgreSQL cluster, a real mosquitto configured by ``fedge broker config``, and agents as separate
``fedge agent run`` processes."""

from __future__ import annotations

import getpass
import json
import os
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import paho.mqtt.client as mqtt_client
import pytest
from loopback import free_port, postgres_cluster

from fedge.codec import Tensors, encode
from fedge.edge_functions.launcher import ExecutorProcess, launch_executor
from fedge.mqtt import BrokerAddress
from fedge.security import broker, pki
from fedge.security.tls import client_context
from fedge.server import intake
from fedge.server.launcher import ServerProcess, launch
from fedge.server.rounds import Federation
from fedge.transport import FedgeClient
from fedge.wire import UpdateReceipt

CLIENTS = ("alice", "bob", "carol")


def require_docker(*images: str) -> None:
    """Skip without Docker (or without ``images``) on a developer's machine; under CI, whatever is missing
    is a failure."""
    docker = shutil.which("docker")
    reason = None
    if docker is None:
        reason = "docker is not installed (apt-get install docker.io; `make images` starts a daemon)"
    elif subprocess.run([docker, "info"], capture_output=True, timeout=60).returncode != 0:
        reason = "no Docker daemon answers: `make images` starts one"
    else:
        missing = [
            image
            for image in images
            if subprocess.run([docker, "image", "inspect", image], capture_output=True).returncode != 0
        ]
        if missing:
            reason = f"images missing ({', '.join(missing)}): run `make images`"
    if reason is None:
        return
    if os.environ.get("CI"):
        pytest.fail(reason)
    pytest.skip(reason)


def toy_model(value: float = 0.0) -> Tensors:
    """A model small enough that server tests need no torch: the server only sees named tensors."""
    return {
        "layer.weight": np.full((4, 3), value, dtype=np.float32),
        "layer.bias": np.full((3,), value, dtype=np.float32),
    }


def toy_server_args(pki_root: Path, initial: Path) -> list[str]:
    """``fedge server`` flags for the toy task on a free port; the toy model is written to ``initial``.

    Every enrolled client counts for selection (``--presence-window 0``): these tests drive clients that
    speak when the test says so; tests/test_presence.py runs the default, live clients only."""
    initial.write_bytes(encode(toy_model()))
    return [
        "--pki", str(pki_root), "--port", "0", "--task", "toy", "--init-model", str(initial),
        "--presence-window", "0",
    ]  # fmt: skip


def federation_pki(directory: Path, federation: str, clients: tuple[str, ...]) -> Path:
    """A CA for ``federation``, the server's certificate for loopback, the clients' and admin ``ops``'s."""
    pki.init_ca(directory, federation)
    pki.issue(directory, pki.Role.SERVER, "server", hosts=("127.0.0.1", "localhost"))
    for client in clients:
        pki.issue(directory, pki.Role.CLIENT, client)
    pki.issue(directory, pki.Role.ADMIN, "ops")
    return directory


@pytest.fixture(scope="session")
def pki_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Federation ``test``: the server, three clients and an admin."""
    return federation_pki(tmp_path_factory.mktemp("pki"), "test", CLIENTS)


@pytest.fixture(scope="session")
def other_pki(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A second CA whose certificates the test federation must not trust."""
    directory = tmp_path_factory.mktemp("other-pki")
    pki.init_ca(directory, "test")
    pki.issue(directory, pki.Role.CLIENT, "alice")
    return directory


@pytest.fixture
def fresh_pki(tmp_path: Path) -> Path:
    """A PKI of one test's own (federation ``test``: server, alice, bob, admin ops) to revoke in."""
    return federation_pki(tmp_path / "own-pki", "test", ("alice", "bob"))


@pytest.fixture
def start_server(tmp_path: Path, pki_dir: Path) -> Iterator[Callable[..., ServerProcess]]:
    """Start ``fedge server`` on the test PKI with a toy model; extra CLI flags pass through."""
    started: list[ServerProcess] = []
    initial = tmp_path / "initial.safetensors"

    def start(*flags: str, data: Path | None = None, pki_root: Path | None = None) -> ServerProcess:
        """``pki_root`` runs the server on another PKI than the session's (one a test may revoke in)."""
        args = [*toy_server_args(pki_root or pki_dir, initial), *flags]
        server = launch(args, data or tmp_path / "server", tmp_path / "server.log")
        started.append(server)
        return server

    yield start
    for server in started:
        server.stop()


@pytest.fixture
def connect(pki_dir: Path) -> Iterator[Callable[..., FedgeClient]]:
    """Open a client of the wire contract as ``id`` (role client unless given)."""
    opened: list[FedgeClient] = []

    def open_client(
        server: ServerProcess, id_: str, role: pki.Role = pki.Role.CLIENT, pki_root: Path | None = None
    ) -> FedgeClient:
        client = FedgeClient(server.url, pki.credentials(pki_root or pki_dir, role, id_), timeout=10)
        opened.append(client)
        return client

    yield open_client
    for client in opened:
        client.close()


def submit(federation: Federation, round_: int, client: str, body: bytes) -> UpdateReceipt:
    """An update through intake and the round, as the API takes it, without a signature to check."""
    checked = intake.check(round_, client, body, federation, federation.settings.max_update_norm)
    return federation.submit(checked)


def update_body(value: float, num_examples: int = 10, model: Tensors | None = None) -> bytes:
    tensors = model if model is not None else toy_model(value)
    return encode(tensors, {"num_examples": str(num_examples)})


@pytest.fixture(scope="session")
def postgres() -> Iterator[str]:
    """The session's PostgreSQL cluster (``loopback.postgres_cluster``): the URL of its ``postgres``
    database."""
    with postgres_cluster() as url:
        yield url


@pytest.fixture
def postgres_url(postgres: str) -> str:
    """A fresh, empty database in the session's cluster."""
    import psycopg

    name = f"test_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(postgres, autocommit=True) as admin:
        admin.execute(f"CREATE DATABASE {name}")
    return postgres.replace("/postgres?", f"/{name}?")


def wait_for(condition: Callable[[], object], timeout: float = 60.0, what: str = "condition") -> object:
    """Poll until ``condition()`` is truthy; generous timeouts, since the machine may be loaded."""
    give_up = time.monotonic() + timeout
    while not (value := condition()):
        if time.monotonic() > give_up:
            raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(0.1)
    return value


@pytest.fixture
def silent_server() -> Iterator[str]:
    """A TCP port that accepts connections and never answers: a server that hangs."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen(8)
        yield f"https://127.0.0.1:{sock.getsockname()[1]}"


MOSQUITTO = shutil.which("mosquitto") or "/usr/sbin/mosquitto"


@dataclass
class Broker:
    """A real mosquitto, configured by ``fedge broker config``; it can be stopped and started again."""

    conf: Path
    address: BrokerAddress
    log: Path
    process: subprocess.Popen | None = None

    def start(self) -> None:
        assert Path(MOSQUITTO).exists(), "mosquitto is missing: apt-get install mosquitto (make test does)"
        with self.log.open("ab") as out:
            self.process = subprocess.Popen([MOSQUITTO, "-c", str(self.conf)], stdout=out, stderr=out)
        wait_for(self._accepting, 30, f"mosquitto on {self.address} (log: {self.log})")

    def _accepting(self) -> bool:
        assert self.process is not None
        if self.process.poll() is not None:
            raise AssertionError(f"mosquitto exited: {self.log.read_text()[-500:]}")
        with socket.socket() as sock:
            return sock.connect_ex((self.address.host, self.address.port)) == 0

    def write_config(self, pki_dir: Path) -> None:
        """What the operator runs after issuing or revoking a certificate (then SIGHUP)."""
        broker.write_config(
            pki_dir, self.conf.parent, self.address.port, "127.0.0.1", run_as=getpass.getuser()
        )

    def stop(self, sig: int = signal.SIGTERM) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(sig)
            self.process.wait(15)


@pytest.fixture
def start_broker(tmp_path: Path) -> Iterator[Callable[[Path], Broker]]:
    """Start mosquitto with the config ``fedge broker config`` writes for the federation in ``pki_dir``."""
    started: list[Broker] = []

    def start(pki_dir: Path) -> Broker:
        port = free_port()
        out = tmp_path / f"broker-{port}"
        running = Broker(out / "mosquitto.conf", BrokerAddress("127.0.0.1", port), out.with_suffix(".log"))
        running.write_config(pki_dir)
        running.start()
        started.append(running)
        return running

    yield start
    for running in started:
        running.stop()


class MqttProbe:
    """A plain MQTT v5 client for tests: records what it receives, and whether the broker let it in."""

    def __init__(self, address: BrokerAddress, tls: ssl.SSLContext, subscribe: tuple[str, ...] = ()) -> None:
        self.messages: list[mqtt_client.MQTTMessage] = []
        self.connected = threading.Event()
        self.refused = threading.Event()
        self.client = mqtt_client.Client(mqtt_client.CallbackAPIVersion.VERSION2, protocol=mqtt_client.MQTTv5)
        self.client.tls_set_context(tls)

        def on_connect(client, _userdata, _flags, reason, _properties) -> None:
            if reason.is_failure:
                self.refused.set()
                return
            if subscribe:
                client.subscribe([(topic, 1) for topic in subscribe])
            else:
                self.connected.set()

        self.client.on_connect = on_connect
        self.client.on_subscribe = lambda *_: self.connected.set()
        self.client.on_connect_fail = lambda *_: self.refused.set()
        self.client.on_disconnect = lambda *_: None if self.connected.is_set() else self.refused.set()
        self.client.on_message = lambda _c, _u, message: self.messages.append(message)
        self.client.connect_async(address.host, address.port)
        self.client.loop_start()

    def admitted(self, timeout: float = 30.0) -> bool:
        """True once connected and subscribed; False as soon as the broker refuses (or at the timeout)."""
        give_up = time.monotonic() + timeout
        while time.monotonic() < give_up:
            if self.connected.is_set():
                return True
            if self.refused.is_set():
                return False
            time.sleep(0.05)
        return False

    def payloads(self, topic: str) -> list[bytes]:
        return [m.payload for m in list(self.messages) if m.topic == topic]

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


@pytest.fixture
def probe() -> Iterator[Callable[..., MqttProbe]]:
    opened: list[MqttProbe] = []

    def open_probe(broker_: Broker, tls: ssl.SSLContext, subscribe: tuple[str, ...] = ()) -> MqttProbe:
        opened.append(MqttProbe(broker_.address, tls, subscribe))
        return opened[-1]

    yield open_probe
    for opened_probe in opened:
        opened_probe.close()


@pytest.fixture
def make_pki(tmp_path: Path) -> Callable[..., Path]:
    """A fresh federation ``edge`` with a server certificate and the given clients."""

    def make(*clients: str) -> Path:
        return federation_pki(tmp_path / "edge-pki", "edge", clients)

    return make


@pytest.fixture
def start_task_server(tmp_path: Path) -> Iterator[Callable[..., ServerProcess]]:
    """``fedge server`` training a real task (default ``digits``, its model built by the server); every
    enrolled client counts for selection, as in ``toy_server_args``."""
    started: list[ServerProcess] = []

    def start(pki_dir: Path, *flags: str, task: str = "digits") -> ServerProcess:
        args = ["--pki", str(pki_dir), "--port", "0", "--task", task, "--presence-window", "0", *flags]
        server = launch(args, tmp_path / "task-server", tmp_path / "task-server.log", timeout=120)
        started.append(server)
        return server

    yield start
    for server in started:
        server.stop()


@dataclass
class AgentProcess:
    process: subprocess.Popen
    state_dir: Path
    log: Path

    def status(self) -> dict:
        path = self.state_dir / "status.json"
        try:
            return json.loads(path.read_text())
        except (OSError, ValueError):
            return {}

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 120) -> int:
        if self.process.poll() is None:
            self.process.send_signal(sig)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        return self.process.returncode


class AgentStarter:
    """Starts ``fedge agent run`` as a device runs it, each agent its own process."""

    def __init__(self, tmp_path: Path) -> None:
        self.tmp_path = tmp_path
        self.started: list[AgentProcess] = []

    def __call__(self, pki_dir: Path, client: str, data: Path, server: str, *flags: str) -> AgentProcess:
        """Client ``client`` of the PKI in ``pki_dir``, its credentials given as flags."""
        creds = pki.credentials(pki_dir, pki.Role.CLIENT, client)
        args = ["--server", server, "--ca", str(creds.ca), "--cert", str(creds.cert), "--key", str(creds.key)]
        return self.enrolled(self.tmp_path / f"agent-{client}", data, *args, *flags)

    def enrolled(self, state: Path, data: Path, *flags: str) -> AgentProcess:
        """An agent whose state directory holds what ``fedge agent enroll`` wrote."""
        log = state.with_name(f"{state.name}.log")
        args = ["--dir", str(state), "--data", str(data), *flags]
        with log.open("ab") as out:
            process = subprocess.Popen(
                [sys.executable, "-m", "fedge", "agent", "run", *args],
                stdout=out,
                stderr=subprocess.STDOUT,
                env={**os.environ, "FEDGE_CONFIG": os.devnull},
            )
        self.started.append(AgentProcess(process, state, log))
        return self.started[-1]


@pytest.fixture
def start_agent(tmp_path: Path) -> Iterator[AgentStarter]:
    starter = AgentStarter(tmp_path)
    yield starter
    for agent in starter.started:
        agent.stop(signal.SIGKILL)


def client_data(directory: Path, parts: int) -> list[Path]:
    """Real digits split into ``parts`` device data files (.npz with x and y), as ``--data`` takes them."""
    from fedge.edge_functions import datasets

    digits = datasets.load("digits")
    files = []
    for index, chunk in enumerate(np.array_split(np.arange(len(digits.y_train)), parts)):
        path = directory / f"data-{index}.npz"
        np.savez(path, x=digits.x_train[chunk], y=digits.y_train[chunk])
        files.append(path)
    return files


def tls_for(pki_dir: Path, role: pki.Role, id_: str) -> ssl.SSLContext:
    """The TLS context of a party of the federation in ``pki_dir`` (for MQTT probes)."""
    return client_context(pki.credentials(pki_dir, role, id_))


@dataclass
class IsolatedExecutor:
    running: ExecutorProcess
    cwd: Path
    tmp: Path

    @property
    def url(self) -> str:
        return self.running.url

    @property
    def process(self) -> subprocess.Popen:
        return self.running.process

    @property
    def log(self) -> Path:
        return self.running.log


@pytest.fixture
def start_executor(tmp_path: Path) -> Iterator[Callable[..., IsolatedExecutor]]:
    """``fedge executor`` as its own process, in an empty working directory with an empty TMPDIR of its own,
    so a test can prove it leaves nothing behind."""
    started: list[ExecutorProcess] = []

    def start(pki_dir: Path, id_: str, server: str) -> IsolatedExecutor:
        cwd, tmp = tmp_path / f"{id_}-cwd", tmp_path / f"{id_}-tmp"
        cwd.mkdir()
        tmp.mkdir()
        log = tmp_path / f"{id_}.log"
        started.append(launch_executor(pki_dir, id_, server, log, cwd=cwd, env={"TMPDIR": str(tmp)}))
        return IsolatedExecutor(started[-1], cwd, tmp)

    yield start
    for executor in started:
        executor.stop()


def agreed_suite(host: str, port: int, ctx: ssl.SSLContext, ciphers: str | None, tls13: bool = False) -> str:
    """The suite a TLS listener agrees to with a client offering only ``ciphers`` (over TLS 1.2 unless
    ``tls13``); an ``ssl.SSLError`` when it agrees to none of them."""
    if not tls13:
        ctx.maximum_version = ssl.TLSVersion.TLSv1_2
    if ciphers:
        ctx.set_ciphers(ciphers)
    with (
        socket.create_connection((host, port), timeout=10) as raw,
        ctx.wrap_socket(raw, server_hostname=host) as tls,
    ):
        cipher = tls.cipher()
        assert cipher is not None
        return cipher[0]
