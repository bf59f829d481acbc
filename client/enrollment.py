"""The device side of enrollment: make a key here, pin the CA, trade a one-time token and a CSR for a
certificate, and renew it before it expires.

The key is written (owner-only) before anything is sent and never leaves the device. The CA is fetched
over a connection that cannot be verified yet, so it is accepted only when its sha256 equals the
fingerprint the operator handed over out of band; only then is the token sent, over TLS verified against
that CA.

State directory::

    ca.pem               the pinned federation CA
    client.key           this device's key (0600)
    client.pem           its certificate
    agent.json           {"server": URL, "federation": NAME, "client": ID}
"""

from __future__ import annotations

import json
import re
import ssl
from dataclasses import dataclass
from pathlib import Path

import httpx
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from fedge.files import write_file
from fedge.security import pki
from fedge.security.tls import client_context, pinned_context
from fedge.transport import ServerError, raise_for_error

_FINGERPRINT = re.compile(r"[0-9a-f]{64}")


class EnrollmentError(Exception):
    """Enrollment cannot go on; the message says why in one line."""


@dataclass(frozen=True)
class Enrollment:
    """Who this device is in which federation, as enrollment left it in the state directory (the agent's
    activity is ``status.AgentState``)."""

    server: str
    federation: str
    client: str
    credentials: pki.Credentials


def normalize_fingerprint(value: str) -> str:
    """Accept ``AB:CD:...`` or plain hex, in either case, as printed by ``fedge pki list`` or openssl."""
    hex_ = value.replace(":", "").strip().lower()
    if not _FINGERPRINT.fullmatch(hex_):
        raise EnrollmentError("the CA fingerprint must be a sha256: 64 hex digits (colons allowed)")
    return hex_


def enroll(
    server: str, token: str, ca_fingerprint: str, state_dir: Path, timeout: float = 30.0
) -> Enrollment:
    pin = normalize_fingerprint(ca_fingerprint)
    creds = _credentials(state_dir)
    if creds.cert.exists():
        raise EnrollmentError(f"{state_dir} already holds credentials; enroll into an empty directory")
    ca_pem = fetch_pinned_ca(server, pin, timeout)
    state_dir.mkdir(parents=True, exist_ok=True)
    key = ec.generate_private_key(ec.SECP256R1())
    write_file(creds.key, pki.key_pem(key), private=True)
    with httpx.Client(base_url=server, verify=pinned_context(ca_pem), timeout=timeout) as http:
        response = _call(http, "/v1/enroll", {"token": token, "csr": make_csr(key)})
    return _save(state_dir, server, ca_pem, key, response)


def renew(state_dir: Path, timeout: float = 30.0) -> Enrollment:
    """Trade the still-valid certificate for a fresh one on a new key, replacing both on disk."""
    state = load_state(state_dir)
    key = ec.generate_private_key(ec.SECP256R1())
    with httpx.Client(
        base_url=state.server, verify=client_context(state.credentials), timeout=timeout
    ) as http:
        response = _call(http, "/v1/enroll/renew", {"csr": make_csr(key)})
    write_file(state.credentials.key.with_suffix(".key.new"), pki.key_pem(key), private=True)
    renewed = _save(state_dir, state.server, state.credentials.ca.read_bytes(), key, response)
    state.credentials.key.with_suffix(".key.new").replace(state.credentials.key)
    return renewed


def fetch_pinned_ca(server: str, pin: str, timeout: float) -> bytes:
    """Download the CA without verifying the server (we hold no CA yet) and keep it only if it is pinned."""
    unverified = ssl.create_default_context()
    unverified.check_hostname = False
    unverified.verify_mode = ssl.CERT_NONE
    try:
        with httpx.Client(base_url=server, verify=unverified, timeout=timeout) as http:
            response = http.get("/v1/ca")
    except httpx.HTTPError as exc:
        raise EnrollmentError(f"cannot reach {server}: {exc}") from None
    if response.status_code != 200:
        raise EnrollmentError(f"{server} did not hand out its CA (HTTP {response.status_code})")
    try:
        ca = x509.load_pem_x509_certificate(response.content)
    except ValueError:
        raise EnrollmentError(f"{server} sent something that is not a certificate as its CA") from None
    if pki.fingerprint(ca) != pin:
        raise EnrollmentError(f"the CA of {server} does not match the pinned fingerprint: not enrolling")
    return ca.public_bytes(serialization.Encoding.PEM)


def load_state(state_dir: Path) -> Enrollment:
    try:
        meta = json.loads((state_dir / "agent.json").read_text())
    except FileNotFoundError:
        raise EnrollmentError(f"{state_dir} holds no enrollment: run `fedge agent enroll` first") from None
    return Enrollment(meta["server"], meta["federation"], meta["client"], _credentials(state_dir))


def _call(http: httpx.Client, path: str, payload: dict[str, str]) -> dict[str, str]:
    try:
        response = http.post(path, json=payload)
    except httpx.HTTPError as exc:
        raise EnrollmentError(f"cannot reach the server: {exc}") from None
    try:
        raise_for_error(response)
    except ServerError as exc:
        raise EnrollmentError(f"the server refused: {exc.code}: {exc.detail}") from None
    return response.json()


def _save(
    state_dir: Path, server: str, ca_pem: bytes, key: ec.EllipticCurvePrivateKey, response: dict[str, str]
) -> Enrollment:
    """Keep the certificate only if the pinned CA issued it, for our key, with a fedge client identity."""
    cert = x509.load_pem_x509_certificate(response["certificate"].encode())
    try:
        cert.verify_directly_issued_by(x509.load_pem_x509_certificate(ca_pem))
    except (ValueError, TypeError) as exc:
        raise EnrollmentError(f"the certificate was not issued by the pinned CA: {exc}") from None
    if cert.public_key() != key.public_key():
        raise EnrollmentError("the certificate is not for this device's key")
    identity = pki.identity_of(cert.public_bytes(serialization.Encoding.DER))
    if identity.role is not pki.Role.CLIENT:
        raise EnrollmentError(f"the server issued a {identity.role} certificate, not a client one")
    creds = _credentials(state_dir)
    write_file(creds.ca, ca_pem)
    write_file(creds.cert, cert.public_bytes(serialization.Encoding.PEM))
    meta = {"server": server, "federation": identity.federation, "client": identity.id}
    write_file(state_dir / "agent.json", json.dumps(meta).encode())
    return Enrollment(server, identity.federation, identity.id, creds)


def _credentials(state_dir: Path) -> pki.Credentials:
    return pki.Credentials(
        ca=state_dir / "ca.pem", cert=state_dir / "client.pem", key=state_dir / "client.key"
    )


def make_csr(key: ec.EllipticCurvePrivateKey) -> str:
    """The server decides the id from the token, so the subject carries nothing it would trust."""
    csr = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "fedge device")]))
        .sign(key, hashes.SHA256())
    )
    return csr.public_bytes(serialization.Encoding.PEM).decode()
