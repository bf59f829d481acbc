"""Atomic files and the client key: what is written is whole, and a key is read once per client."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from fedge.codec import sha256
from fedge.files import write_file
from fedge.security import pki, signing
from fedge.transport import FedgeClient


def test_a_write_replaces_the_file_whole_and_leaves_nothing_beside_it(tmp_path: Path) -> None:
    target = tmp_path / "state.json"
    write_file(target, b"old")
    write_file(target, b"new")
    assert target.read_bytes() == b"new"
    assert [p.name for p in tmp_path.iterdir()] == ["state.json"]


def test_a_failed_write_keeps_the_old_file_and_no_temporary(tmp_path: Path) -> None:
    target = tmp_path / "state.json"
    write_file(target, b"old")
    with pytest.raises(TypeError):
        write_file(target, "not bytes")  # type: ignore[arg-type]
    assert target.read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["state.json"]


def test_private_files_are_for_their_owner_only(tmp_path: Path) -> None:
    write_file(tmp_path / "client.key", b"secret", private=True)
    assert (tmp_path / "client.key").stat().st_mode & 0o777 == 0o600


def test_a_client_reads_its_key_once_and_signs_every_update_with_it(pki_dir: Path, tmp_path: Path) -> None:
    original = pki.credentials(pki_dir, pki.Role.CLIENT, "alice")
    creds = pki.Credentials(
        ca=original.ca, cert=original.cert, key=Path(shutil.copy(original.key, tmp_path / "alice.key"))
    )
    with FedgeClient("https://127.0.0.1:9", creds) as api:
        first = api.sign_update(1, b"body")
        creds.key.unlink()  # a second read from disk would fail now
        second = api.sign_update(1, b"body")
        grant = api.grant(1, "gpu-1")
    public = signing.load_private_key(original.key.read_bytes()).public_key()
    for headers in (first, second):
        claim = signing.UpdateClaim("test", 1, "alice", sha256(b"body"), headers[signing.NONCE_HEADER])
        signing.verify(public, claim.message(), headers[signing.SIGNATURE_HEADER])
    assert signing.grant_client(grant) == "alice"
