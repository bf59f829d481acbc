"""Shared fixtures: a real PKI, the real aggregation service in its own process over mutual TLS, and a real
PostgreSQL cluster."""

from __future__ import annotations

import os
import pwd
import shutil
import socket
import subprocess
import tempfile
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest

from fedge.codec import Tensors, encode
from fedge.security import pki
from fedge.server.launcher import ServerProcess, launch
from fedge.transport import FedgeClient

CLIENTS = ("alice", "bob", "carol")


def toy_model(value: float = 0.0) -> Tensors:
    """A model small enough that server tests need no torch: the server only sees named tensors."""
    return {
        "layer.weight": np.full((4, 3), value, dtype=np.float32),
        "layer.bias": np.full((3,), value, dtype=np.float32),
    }


def toy_server_args(pki_root: Path, initial: Path) -> list[str]:
    """``fedge server`` flags for the toy task on a free port; the toy model is written to ``initial``."""
    initial.write_bytes(encode(toy_model()))
    return ["--pki", str(pki_root), "--port", "0", "--task", "toy", "--init-model", str(initial)]


@pytest.fixture(scope="session")
def pki_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Federation ``test``: the server, three clients and an admin."""
    directory = tmp_path_factory.mktemp("pki")
    pki.init_ca(directory, "test")
    pki.issue(directory, pki.Role.SERVER, "server", hosts=("127.0.0.1", "localhost"))
    for client in CLIENTS:
        pki.issue(directory, pki.Role.CLIENT, client)
    pki.issue(directory, pki.Role.ADMIN, "ops")
    return directory


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
    directory = tmp_path / "own-pki"
    pki.init_ca(directory, "test")
    pki.issue(directory, pki.Role.SERVER, "server", hosts=("127.0.0.1", "localhost"))
    for client in ("alice", "bob"):
        pki.issue(directory, pki.Role.CLIENT, client)
    pki.issue(directory, pki.Role.ADMIN, "ops")
    return directory


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


def update_body(value: float, num_examples: int = 10, model: Tensors | None = None) -> bytes:
    tensors = model if model is not None else toy_model(value)
    return encode(tensors, {"num_examples": str(num_examples)})


@pytest.fixture(scope="session")
def postgres() -> Iterator[str]:
    """A PostgreSQL cluster of its own in a temporary directory, reached over its Unix socket there; yields
    the URL of its ``postgres`` database. PostgreSQL refuses to run as root, so as root (CI) it runs as
    ``nobody``."""
    pg_ctl = shutil.which("pg_ctl") or "/usr/local/bin/pg_ctl"
    initdb = str(Path(pg_ctl).with_name("initdb"))
    directory = Path(tempfile.mkdtemp(prefix="fedge-pg-"))
    as_user: list[str] = []
    if os.geteuid() == 0:
        nobody = pwd.getpwnam("nobody")
        os.chown(directory, nobody.pw_uid, nobody.pw_gid)
        as_user = ["runuser", "-u", "nobody", "--"]
    data = directory / "data"
    with socket.create_server(("127.0.0.1", 0)) as probe:
        port = probe.getsockname()[1]
    subprocess.run(
        [*as_user, initdb, "-D", str(data), "-U", "postgres", "--auth=trust", "-E", "UTF8"],
        check=True,
        capture_output=True,
    )
    options = f"-k {directory} -p {port} -c listen_addresses= -c fsync=on"
    subprocess.run(
        [*as_user, pg_ctl, "-D", str(data), "-l", str(directory / "log"), "-o", options, "-w", "start"],
        check=True,
        capture_output=True,
    )
    try:
        yield f"postgresql://postgres@/postgres?host={directory}&port={port}"
    finally:
        subprocess.run([*as_user, pg_ctl, "-D", str(data), "-m", "immediate", "stop"], capture_output=True)
        shutil.rmtree(directory, ignore_errors=True)


@pytest.fixture
def postgres_url(postgres: str) -> str:
    """A fresh, empty database in the session's cluster."""
    import psycopg

    name = f"test_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(postgres, autocommit=True) as admin:
        admin.execute(f"CREATE DATABASE {name}")
    return postgres.replace("/postgres?", f"/{name}?")
