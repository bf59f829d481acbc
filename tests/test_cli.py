"""Commands a user types: they work, and bad input gets one clear line and a non-zero exit."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from test_simulate import run_cli

from fedge.security import pki


def assert_one_line_error(done, *fragments: str) -> None:
    assert done.returncode != 0
    assert "Traceback" not in done.stderr + done.stdout
    message = " ".join(done.stderr.split())
    for fragment in fragments:
        assert fragment in message


def test_pki_commands_make_a_ca_and_issue_certificates(tmp_path: Path) -> None:
    directory = tmp_path / "pki"
    assert run_cli("pki", "init", "--dir", str(directory), "--federation", "acme").returncode == 0
    assert (
        run_cli(
            "pki", "server-cert", "--dir", str(directory), "--host", "fl.acme.test", "--ip", "10.0.0.5"
        ).returncode
        == 0
    )
    assert run_cli("pki", "client-cert", "--dir", str(directory), "--client", "dev-1").returncode == 0
    cert = pki.credentials(directory, pki.Role.CLIENT, "dev-1").cert
    der = x509.load_pem_x509_certificate(cert.read_bytes()).public_bytes(serialization.Encoding.DER)
    assert pki.identity_of(der) == pki.Identity("acme", pki.Role.CLIENT, "dev-1")
    assert oct((directory / "client" / "dev-1.key").stat().st_mode & 0o777) == "0o600"
    assert pki.issued(directory, pki.Role.CLIENT) == ["dev-1"]
    assert run_cli("pki", "admin-cert", "--dir", str(directory), "--admin", "ops").returncode == 0
    assert run_cli("pki", "executor-cert", "--dir", str(directory), "--executor", "gpu-1").returncode == 0
    for role, id_ in ((pki.Role.ADMIN, "ops"), (pki.Role.EXECUTOR, "gpu-1")):
        cert = x509.load_pem_x509_certificate(pki.credentials(directory, role, id_).cert.read_bytes())
        assert pki.identity_of(cert.public_bytes(serialization.Encoding.DER)) == pki.Identity(
            "acme", role, id_
        )


def test_pki_init_refuses_to_overwrite_a_ca(tmp_path: Path) -> None:
    run_cli("pki", "init", "--dir", str(tmp_path), "--federation", "acme")
    before = (tmp_path / "ca.pem").read_bytes()
    assert_one_line_error(
        run_cli("pki", "init", "--dir", str(tmp_path), "--federation", "acme"), "already holds a CA"
    )
    assert (tmp_path / "ca.pem").read_bytes() == before


@pytest.mark.parametrize("client", ["../../etc/passwd", "Alice", "a/b", ""])
def test_client_ids_with_path_tricks_are_refused(tmp_path: Path, client: str) -> None:
    run_cli("pki", "init", "--dir", str(tmp_path), "--federation", "acme")
    assert_one_line_error(
        run_cli("pki", "client-cert", "--dir", str(tmp_path), "--client", client), "invalid client id"
    )
    assert not (tmp_path / "client").exists() or not list((tmp_path / "client").iterdir())


@pytest.mark.parametrize(
    ("args", "fragments"),
    [
        (["--clients", "0"], ["clients"]),
        (["--dataset", "cifar"], ["unknown data set 'cifar'"]),
        (["--partition", "dirichlet:-1"], ["unknown partition"]),
        (["--rounds", "many"], ["many"]),
    ],
)
def test_simulate_rejects_bad_flags_in_one_line(
    tmp_path: Path, args: list[str], fragments: list[str]
) -> None:
    assert_one_line_error(run_cli("simulate", "--out", str(tmp_path), *args), *fragments)


def test_server_on_a_busy_port_says_so(tmp_path: Path, pki_dir: Path) -> None:
    with socket.create_server(("127.0.0.1", 0)) as busy:
        port = busy.getsockname()[1]
        done = run_cli(
            "server", "--pki", str(pki_dir), "--data", str(tmp_path), "--port", str(port), "--task", "toy"
        )
    assert_one_line_error(done, f"port {port}", "already in use")


def test_server_without_a_pki_says_what_to_do(tmp_path: Path) -> None:
    done = run_cli("server", "--pki", str(tmp_path / "nowhere"), "--data", str(tmp_path))
    assert_one_line_error(done, "fedge pki init")


def test_settings_come_from_flags_then_environment_then_fedge_toml(tmp_path: Path, monkeypatch) -> None:
    from fedge.settings import SimulationSettings

    (tmp_path / "fedge.toml").write_text("[simulate]\nclients = 7\nrounds = 3\nlr = 0.2\n")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("FEDGE_ROUNDS", "5")
    settings = SimulationSettings.from_flags(lr=0.3, clients=None)
    assert (settings.clients, settings.rounds, settings.lr) == (7, 5, 0.3)


def test_pki_revoke_says_what_is_wrong_in_one_line(tmp_path: Path) -> None:
    run_cli("pki", "init", "--dir", str(tmp_path), "--federation", "acme")
    run_cli("pki", "client-cert", "--dir", str(tmp_path), "--client", "dev-1")
    assert run_cli("pki", "revoke", "--dir", str(tmp_path), "--client", "dev-1").returncode == 0
    assert_one_line_error(
        run_cli("pki", "revoke", "--dir", str(tmp_path), "--client", "dev-1"), "already revoked"
    )
    assert_one_line_error(run_cli("pki", "revoke", "--dir", str(tmp_path), "--client", "ghost"), "no client")
    assert_one_line_error(run_cli("pki", "revoke", "--dir", str(tmp_path)), "exactly one of")
    assert list(pki.revoked(tmp_path)) == [
        x509.load_pem_x509_certificate((tmp_path / "client" / "dev-1.pem").read_bytes()).serial_number
    ]
