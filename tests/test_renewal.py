"""Certificate lifetimes: chosen with `--days` (bounded), flagged by `fedge pki list` once two thirds have
passed, and renewed by the agent on its own from then on."""

from __future__ import annotations

import datetime as dt
import json
from pathlib import Path

from conftest import client_data, wait_for
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec
from test_simulate import run_cli

from fedge.security import pki

T0 = dt.datetime(2026, 1, 1, tzinfo=dt.UTC)
DAY = dt.timedelta(days=1)


def test_renewal_is_due_from_two_thirds_of_a_certificates_life_on() -> None:
    not_after = T0 + 30 * DAY
    assert not pki.renewal_due(T0, not_after, T0)
    assert not pki.renewal_due(T0, not_after, T0 + 20 * DAY - dt.timedelta(seconds=1))
    assert pki.renewal_due(T0, not_after, T0 + 20 * DAY)
    assert pki.renewal_due(T0, not_after, not_after + DAY)


def test_days_sets_a_leafs_lifetime_and_out_of_bounds_days_are_one_line_errors(fresh_pki: Path) -> None:
    done = run_cli("pki", "executor-cert", "--dir", str(fresh_pki), "--executor", "gpu-1", "--days", "90")
    assert done.returncode == 0, done.stderr
    cert = x509.load_pem_x509_certificate((fresh_pki / "executor" / "gpu-1.pem").read_bytes())
    assert (cert.not_valid_after_utc - cert.not_valid_before_utc).days == 90
    for bad in ("0", "366", "soon"):
        refused = run_cli("pki", "server-cert", "--dir", str(fresh_pki), "--host", "x", "--days", bad)
        assert refused.returncode == 2
        assert "--days" in refused.stderr
        assert "Traceback" not in refused.stderr


def test_pki_list_flags_a_certificate_past_two_thirds_of_its_life(fresh_pki: Path) -> None:
    key = ec.generate_private_key(ec.SECP256R1())
    # Backdated five minutes, a one-minute certificate is past two thirds of its life at once.
    pki.sign_certificate(
        fresh_pki, pki.Role.CLIENT, "old-1", key.public_key(), lifetime=dt.timedelta(minutes=1)
    )
    listed = run_cli("pki", "list", "--dir", str(fresh_pki))
    assert listed.returncode == 0, listed.stderr
    rows = {line.split("│")[2].strip(): line for line in listed.stdout.splitlines() if line.count("│") > 4}
    assert "renew" in rows["old-1"]
    assert "renew" not in rows["alice"]


def test_an_agent_renews_its_certificate_on_its_own_and_keeps_training(
    fresh_pki: Path, tmp_path: Path, start_task_server, start_agent
) -> None:
    server = start_task_server(fresh_pki, "--rounds", "1", "--min-clients", "3")
    state = tmp_path / "device"
    state.mkdir()
    key = ec.generate_private_key(ec.SECP256R1())
    (state / "client.key").write_bytes(pki.key_pem(key))
    (state / "client.key").chmod(0o600)
    short = pki.sign_certificate(
        fresh_pki, pki.Role.CLIENT, "dev-r", key.public_key(), lifetime=dt.timedelta(minutes=1)
    )  # as if enrolled long ago: due for renewal
    (state / "client.pem").write_bytes(short)
    (state / "ca.pem").write_bytes((fresh_pki / "ca.pem").read_bytes())
    (state / "agent.json").write_text(
        json.dumps({"server": server.url, "federation": "test", "client": "dev-r"})
    )
    (data,) = client_data(tmp_path, 1)
    agent = start_agent.enrolled(state, data)

    def renewed() -> x509.Certificate | None:
        cert = x509.load_pem_x509_certificate((state / "client.pem").read_bytes())
        return cert if cert.serial_number != x509.load_pem_x509_certificate(short).serial_number else None

    fresh = wait_for(renewed, 120, "the agent to renew its certificate")
    assert fresh.not_valid_after_utc - fresh.not_valid_before_utc >= pki.ENROLLED_LIFETIME
    # A fresh agent on the new files goes on in the same process.
    wait_for(lambda: "going on with the new one" in agent.log.read_text(), 60, "the agent to go on")
    wait_for(  # the old certificate is superseded: only the new one can have this update taken
        lambda: agent.status().get("detail") == "sent the update of round 1",
        120,
        "the agent to train round 1 on its new certificate",
    )
    log = agent.log.read_text()
    assert log.index("going on with the new one") < log.index("round 1 sent")
    assert agent.process.poll() is None
