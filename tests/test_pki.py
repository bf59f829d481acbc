"""The CA's bookkeeping: an issue that fails keeps the old credentials, and the CRL does not grow forever."""

from __future__ import annotations

import datetime as dt
from pathlib import Path

import pytest
from cryptography import x509

from fedge.security import pki, signing


def test_a_refused_issue_leaves_the_old_key_and_certificate(fresh_pki: Path) -> None:
    creds = pki.credentials(fresh_pki, pki.Role.CLIENT, "alice")
    key, cert = creds.key.read_bytes(), creds.cert.read_bytes()
    with pytest.raises(pki.PKIError, match="at most 365 days"):
        pki.issue(fresh_pki, pki.Role.CLIENT, "alice", lifetime=dt.timedelta(days=366))
    assert creds.key.read_bytes() == key
    assert creds.cert.read_bytes() == cert


def test_a_reissue_replaces_key_and_certificate_together(fresh_pki: Path) -> None:
    old = pki.credentials(fresh_pki, pki.Role.CLIENT, "alice")
    old_key = old.key.read_bytes()
    new = pki.issue(fresh_pki, pki.Role.CLIENT, "alice")
    cert = x509.load_pem_x509_certificate(new.cert.read_bytes())
    assert new.key.read_bytes() != old_key
    assert cert.public_key() == signing.load_private_key(new.key.read_bytes()).public_key()


def test_revoking_drops_crl_entries_older_than_any_certificate_lives(fresh_pki: Path) -> None:
    ca = x509.load_pem_x509_certificate((fresh_pki / "ca.pem").read_bytes())
    now = dt.datetime.now(dt.UTC)

    def entry(serial: int, age: dt.timedelta) -> x509.RevokedCertificate:
        return x509.RevokedCertificateBuilder().serial_number(serial).revocation_date(now - age).build()

    with pki.locked(fresh_pki):
        pki._write_crl(
            fresh_pki,
            [entry(11, pki.MAX_LEAF_LIFETIME + dt.timedelta(days=1)), entry(12, dt.timedelta(days=300))],
        )
    revoked = pki.revoke(fresh_pki, pki.Role.CLIENT, "bob")
    listed = pki.load_crl(fresh_pki / "crl.pem", ca)
    assert set(listed) == {12, revoked.serial}
