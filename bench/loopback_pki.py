"""The PKI every bench federation runs on: a CA, the server's certificate for 127.0.0.1, and clients."""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

from fedge.security import pki


def make(root: Path, clients: Iterable[str]) -> list[pki.Credentials]:
    """Make the federation ``bench`` in ``root``; returns each client's credentials, in order."""
    pki.init_ca(root, "bench")
    pki.issue(root, pki.Role.SERVER, "server", hosts=("127.0.0.1",))
    return [pki.issue(root, pki.Role.CLIENT, client) for client in clients]
