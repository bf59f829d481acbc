"""Shared fixtures: a real PKI, and the real aggregation service in its own process over mutual TLS."""

from __future__ import annotations

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
