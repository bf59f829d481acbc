"""One rule for identity everywhere: only a client's current, unrevoked certificate counts.

A re-issued client's superseded certificate is refused on connections to the server, as the signer of an
executor grant, as a caller of the executor and by the broker; revoking an id revokes every certificate it
ever had, in the CRL the server, the executor and mosquitto read. Real certificates, real processes.
"""

from __future__ import annotations

import datetime as dt
import shutil
import time
from pathlib import Path

import httpx
import pytest
from conftest import tls_for, update_body
from cryptography import x509
from test_attacks import refusal, state_of
from test_service import open_round
from test_simulate import run_cli

from fedge.security import broker, pki
from fedge.security.revocation import NotStanding, standing
from fedge.security.tls import client_context
from fedge.transport import FedgeClient, ServerError


def keep_credentials(pki_dir: Path, id_: str, where: Path) -> pki.Credentials:
    """A copy of ``id_``'s certificate and key as they are now, for the device that keeps using them."""
    where.mkdir(parents=True, exist_ok=True)
    creds = pki.credentials(pki_dir, pki.Role.CLIENT, id_)
    kept = pki.Credentials(ca=creds.ca, cert=where / f"{id_}.pem", key=where / f"{id_}.key")
    shutil.copyfile(creds.cert, kept.cert)
    shutil.copyfile(creds.key, kept.key)
    return kept


def serial(cert: Path) -> int:
    return x509.load_pem_x509_certificate(cert.read_bytes()).serial_number


def crl_serials(path: Path) -> set[int]:
    return {entry.serial_number for entry in x509.load_pem_x509_crl(path.read_bytes())}


def test_standing_refuses_revoked_expired_foreign_unknown_and_superseded_certificates(
    fresh_pki: Path,
) -> None:
    cert = x509.load_pem_x509_certificate((fresh_pki / "client" / "alice.pem").read_bytes())
    now = dt.datetime.now(dt.UTC)

    def code(**changed: object) -> str | None:
        args = {
            "federation": "test",
            "is_revoked": lambda _serial: False,
            "current_serial": lambda _role, _id: cert.serial_number,
            "now": now,
            **changed,
        }
        try:
            standing(cert, **args)  # type: ignore[arg-type]
        except NotStanding as exc:
            return exc.code
        return None

    assert code() is None
    assert code(is_revoked=lambda s: s == cert.serial_number) == "certificate_revoked"
    assert code(now=now + dt.timedelta(days=400)) == "certificate_expired"
    assert code(federation="other") == "wrong_federation"
    assert code(current_serial=lambda _role, _id: None) == "unknown_certificate"
    assert code(current_serial=lambda _role, _id: cert.serial_number + 1) == "certificate_superseded"


def test_re_issuing_an_id_puts_its_old_certificate_on_the_crl_and_revoking_the_id_lists_every_serial(
    fresh_pki: Path, tmp_path: Path
) -> None:
    serials = [serial(fresh_pki / "client" / "alice.pem")]
    for _ in range(2):
        pki.issue(fresh_pki, pki.Role.CLIENT, "alice")
        serials.append(serial(fresh_pki / "client" / "alice.pem"))
    assert crl_serials(fresh_pki / "crl.pem") == set(serials[:2])
    reasons = {
        entry.serial_number: entry.extensions.get_extension_for_class(x509.CRLReason).value.reason
        for entry in x509.load_pem_x509_crl((fresh_pki / "crl.pem").read_bytes())
    }
    assert set(reasons.values()) == {x509.ReasonFlags.superseded}
    assert pki.active(fresh_pki, pki.Role.CLIENT) == ["alice", "bob"]

    done = run_cli("pki", "revoke", "--dir", str(fresh_pki), "--client", "alice")
    assert done.returncode == 0, done.stderr
    assert crl_serials(fresh_pki / "crl.pem") == set(serials)
    assert set(pki.revoked(fresh_pki)) == set(serials)  # the CA's signature still checks
    assert pki.active(fresh_pki, pki.Role.CLIENT) == ["bob"]
    files = broker.write_config(fresh_pki, tmp_path / "broker", port=8883)
    assert files.crl is not None
    assert crl_serials(files.crl) >= set(serials)


def test_a_superseded_certificate_is_refused_for_connections_and_as_a_grant_signer(
    start_server, connect, fresh_pki: Path, tmp_path: Path
) -> None:
    pki.issue(fresh_pki, pki.Role.EXECUTOR, "gpu-1")
    server = start_server(pki_root=fresh_pki)
    alice = connect(server, "alice", pki_root=fresh_pki)
    gpu = connect(server, "gpu-1", pki.Role.EXECUTOR, pki_root=fresh_pki)
    r = open_round(alice).round
    old = keep_credentials(fresh_pki, "alice", tmp_path / "old")
    stale_grant = alice.grant(r, "gpu-1")  # signed with the certificate about to be superseded
    pki.issue(fresh_pki, pki.Role.CLIENT, "alice")
    before = state_of(server)

    with httpx.Client(base_url=server.url, verify=client_context(old), timeout=15) as http:
        assert refusal(http.get("/v1/rounds/current")) == (401, "certificate_superseded")
    with pytest.raises(ServerError) as refused:
        gpu.post_update(r, update_body(5.0), grant=stale_grant)
    assert (refused.value.status, refused.value.code) == (403, "bad_grant")
    assert "newer certificate" in refused.value.detail
    assert state_of(server) == before

    with FedgeClient(server.url, pki.credentials(fresh_pki, pki.Role.CLIENT, "alice"), timeout=15) as renewed:
        assert gpu.post_update(r, update_body(5.0), grant=renewed.grant(r, "gpu-1")).client == "alice"


def test_revoking_an_id_refuses_a_grant_signed_with_any_of_its_certificates(
    start_server, connect, fresh_pki: Path, tmp_path: Path
) -> None:
    pki.issue(fresh_pki, pki.Role.EXECUTOR, "gpu-1")
    server = start_server(pki_root=fresh_pki)
    bob = connect(server, "bob", pki_root=fresh_pki)
    gpu = connect(server, "gpu-1", pki.Role.EXECUTOR, pki_root=fresh_pki)
    r = open_round(bob).round
    old = keep_credentials(fresh_pki, "alice", tmp_path / "old")
    pki.issue(fresh_pki, pki.Role.CLIENT, "alice")
    pki.revoke(fresh_pki, pki.Role.CLIENT, "alice")
    with FedgeClient(server.url, old, timeout=15) as stale:
        grant = stale.grant(r, "gpu-1")
    before = state_of(server)
    with pytest.raises(ServerError) as refused:
        gpu.post_update(r, update_body(5.0), grant=grant)
    assert (refused.value.status, refused.value.code) == (403, "bad_grant")
    assert state_of(server) == before
    assert serial(old.cert) in pki.revoked(fresh_pki)  # so the broker and any executor refuse it too


def test_the_executor_refuses_a_superseded_caller_and_a_grant_signed_with_a_superseded_certificate(
    start_executor, fresh_pki: Path, tmp_path: Path
) -> None:
    """Every refusal comes before the job runs, so the executor never reaches its server."""
    pki.issue(fresh_pki, pki.Role.EXECUTOR, "gpu-1", hosts=("127.0.0.1",))
    executor = start_executor(fresh_pki, "gpu-1", "https://127.0.0.1:9")
    old = keep_credentials(fresh_pki, "alice", tmp_path / "old")
    with FedgeClient(executor.url, old, timeout=15) as stale:
        stale_grant = stale.grant(1, "gpu-1")
    pki.issue(fresh_pki, pki.Role.CLIENT, "alice")
    job = {"task": "toy", "round": 1, "config": {}, "shard": {}, "grant": stale_grant}

    with httpx.Client(base_url=executor.url, verify=client_context(old), timeout=30) as http:
        answer = http.post("/v1/jobs", json=job)
        assert refusal(answer) == (401, "certificate_superseded")
        assert refusal(http.post("/v1/calibrate", json={})) == (401, "certificate_superseded")
    current = pki.credentials(fresh_pki, pki.Role.CLIENT, "alice")
    with httpx.Client(base_url=executor.url, verify=client_context(current), timeout=30) as http:
        answer = http.post("/v1/jobs", json=job)
        assert refusal(answer) == (403, "bad_grant")
        assert "newer certificate" in answer.json()["detail"]

    pki.revoke(fresh_pki, pki.Role.CLIENT, "alice")
    give_up = time.monotonic() + 30
    with httpx.Client(base_url=executor.url, verify=client_context(current), timeout=30) as http:
        while (answer := http.post("/v1/jobs", json=job)).status_code != 401 and time.monotonic() < give_up:
            time.sleep(0.2)
        assert refusal(answer) == (401, "certificate_revoked")


def test_the_broker_refuses_a_superseded_certificate_and_admits_the_current_one(
    start_broker, probe, fresh_pki: Path, tmp_path: Path
) -> None:
    old = keep_credentials(fresh_pki, "alice", tmp_path / "old")
    pki.issue(fresh_pki, pki.Role.CLIENT, "alice")
    mqtt_broker = start_broker(fresh_pki)
    assert not probe(mqtt_broker, client_context(old)).admitted(timeout=10)
    assert probe(mqtt_broker, tls_for(fresh_pki, pki.Role.CLIENT, "alice")).admitted()
