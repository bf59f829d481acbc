"""Enrollment as an operator and a device owner run it: `fedge pki token`, then `fedge agent enroll`."""

from __future__ import annotations

import json
import shutil
import ssl
from datetime import timedelta
from pathlib import Path

import httpx
import pytest
from conftest import update_body
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from test_cli import assert_one_line_error
from test_service import open_round
from test_simulate import run_cli

from fedge.client.enrollment import make_csr
from fedge.security import pki, tokens
from fedge.transport import FedgeClient, ServerError


def mint(pki_dir: Path, client: str) -> str:
    done = run_cli("pki", "token", "--dir", str(pki_dir), "--client", client, "--ttl", "1")
    assert done.returncode == 0, done.stderr
    return done.stdout.strip()


def certificate(path: Path) -> x509.Certificate:
    return x509.load_pem_x509_certificate(path.read_bytes())


def test_a_device_enrolls_with_a_one_time_token_and_joins_the_next_round(
    start_server, connect, fresh_pki: Path, tmp_path: Path
) -> None:
    server = start_server("--enrolled-days", "2", pki_root=fresh_pki)
    token = mint(fresh_pki, "dev-1")
    stored = (fresh_pki / "tokens.json").read_text()
    assert token not in stored
    assert tokens.digest(token) in json.loads(stored)

    state = tmp_path / "device"
    fingerprint = pki.ca_fingerprint(fresh_pki).upper()
    done = run_cli(
        "agent", "enroll", "--server", server.url, "--token", token, "--ca-fingerprint", fingerprint,
        "--dir", str(state),
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert "dev-1" in done.stdout
    assert oct((state / "client.key").stat().st_mode & 0o777) == "0o600"
    cert = certificate(state / "client.pem")
    der = cert.public_bytes(serialization.Encoding.DER)
    assert pki.identity_of(der) == pki.Identity("test", pki.Role.CLIENT, "dev-1")
    key = serialization.load_pem_private_key((state / "client.key").read_bytes(), password=None)
    assert cert.public_key() == key.public_key()
    lifetime = cert.not_valid_after_utc - cert.not_valid_before_utc
    assert lifetime == timedelta(days=2, minutes=5)  # --enrolled-days, from 5 min back for clock skew
    assert (fresh_pki / "client" / "dev-1.pem").exists()
    assert not (fresh_pki / "client" / "dev-1.key").exists()

    again = run_cli(
        "agent", "enroll", "--server", server.url, "--token", token, "--ca-fingerprint", fingerprint,
        "--dir", str(tmp_path / "thief"),
    )  # fmt: skip
    assert_one_line_error(again, "token_used")
    assert not (tmp_path / "thief" / "client.pem").exists()

    alice, bob = connect(server, "alice", pki_root=fresh_pki), connect(server, "bob", pki_root=fresh_pki)
    first = open_round(alice)
    assert "dev-1" not in first.selected
    alice.post_update(first.round, update_body(1.0))
    bob.post_update(first.round, update_body(2.0))
    device = FedgeClient(
        server.url, pki.Credentials(state / "ca.pem", state / "client.pem", state / "client.key")
    )
    with device:
        second = open_round(device)
        assert second.selected == ["alice", "bob", "dev-1"]
        assert device.post_update(second.round, update_body(3.0)).client == "dev-1"

    shutil.copytree(state, tmp_path / "before-renewal")
    renewed = run_cli("agent", "renew", "--dir", str(state))
    assert renewed.returncode == 0, renewed.stderr
    fresh = certificate(state / "client.pem")
    assert fresh.serial_number != cert.serial_number
    assert fresh.public_key() != cert.public_key()
    with FedgeClient(
        server.url, pki.Credentials(state / "ca.pem", state / "client.pem", state / "client.key")
    ) as api:
        assert api.current_round().round == second.round
    old = tmp_path / "before-renewal"
    with (
        FedgeClient(
            server.url, pki.Credentials(old / "ca.pem", old / "client.pem", old / "client.key")
        ) as api,
        pytest.raises(ServerError) as superseded,
    ):
        api.current_round()
    assert (superseded.value.status, superseded.value.code) == (401, "certificate_superseded")


def test_enroll_refuses_a_server_whose_ca_is_not_the_pinned_one(
    start_server, fresh_pki: Path, other_pki: Path, tmp_path: Path
) -> None:
    server = start_server(pki_root=fresh_pki)
    token = mint(fresh_pki, "dev-2")
    done = run_cli(
        "agent", "enroll", "--server", server.url, "--token", token,
        "--ca-fingerprint", pki.ca_fingerprint(other_pki), "--dir", str(tmp_path / "device"),
    )  # fmt: skip
    assert_one_line_error(done, "does not match the pinned fingerprint")
    assert not (tmp_path / "device" / "client.pem").exists()
    assert all(
        record["used_at"] is None for record in json.loads((fresh_pki / "tokens.json").read_text()).values()
    )


def test_a_bad_csr_is_refused_without_spending_the_token(start_server, fresh_pki: Path) -> None:
    server = start_server(pki_root=fresh_pki)
    token = mint(fresh_pki, "dev-3")
    pinned = ssl.create_default_context(cafile=fresh_pki / "ca.pem")
    with httpx.Client(base_url=server.url, verify=pinned) as http:
        garbage = http.post("/v1/enroll", json={"token": token, "csr": "-----BEGIN CERTIFICATE REQUEST-----"})
        assert (garbage.status_code, garbage.json()["error"]) == (400, "bad_csr")
        key = ec.generate_private_key(ec.SECP256R1())
        assert http.post("/v1/enroll", json={"token": token, "csr": make_csr(key)}).status_code == 201


def test_tokens_are_refused_for_a_client_with_a_valid_certificate_or_a_bad_id(fresh_pki: Path) -> None:
    assert_one_line_error(
        run_cli("pki", "token", "--dir", str(fresh_pki), "--client", "alice"), "revoke it before re-enrolling"
    )
    assert_one_line_error(
        run_cli("pki", "token", "--dir", str(fresh_pki), "--client", "../x"), "invalid client id"
    )
    assert not (fresh_pki / "tokens.json").exists()


def test_enroll_rejects_a_malformed_fingerprint_in_one_line(tmp_path: Path) -> None:
    done = run_cli(
        "agent", "enroll", "--server", "https://127.0.0.1:9", "--token", "t", "--ca-fingerprint", "abc",
        "--dir", str(tmp_path),
    )  # fmt: skip
    assert_one_line_error(done, "64 hex digits")
