"""The federation's certificate authority.

Every party proves who it is with an X.509 certificate signed by the federation CA. Its identity and role
live in one SAN URI, ``spiffe://<federation>/<role>/<id>``, so the server authorizes from the verified
certificate alone and never from anything a client says about itself.

Layout of a PKI directory::

    pki.json                 {"federation": NAME}
    ca.pem, ca.key           the CA (key readable by its owner only)
    <role>/<id>.pem, .key    issued certificates, role in {server, client, admin, executor}; an enrolled
                             device's certificate comes without a key (the key never left the device)
    crl.pem                  the revocation list, a standard X.509 CRL signed by the CA (mosquitto's crlfile):
                             revoked certificates, and every certificate a newer one of its id superseded
    tokens.json              enrollment tokens, by sha256 only (security/tokens.py)
"""

from __future__ import annotations

import contextlib
import datetime as dt
import fcntl
import hashlib
import ipaddress
import json
import os
import re
from collections.abc import Iterator
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from fedge.files import write_file

CA_LIFETIME = dt.timedelta(days=3650)
LEAF_LIFETIME = dt.timedelta(days=30)
ENROLLED_LIFETIME = dt.timedelta(days=7)
# No leaf outlives this: a CRL entry older than it names a certificate that has expired, so it is pruned.
MAX_LEAF_LIFETIME = dt.timedelta(days=365)
CRL_LIFETIME = dt.timedelta(days=365)
_ID_PATTERN = re.compile(r"[a-z0-9][a-z0-9._-]{0,62}")
_FEDERATION_PATTERN = re.compile(r"[a-z0-9][a-z0-9-]{0,62}")


class PKIError(Exception):
    """A PKI operation a user asked for cannot be done (missing CA, bad name, ...)."""


class Role(StrEnum):
    SERVER = "server"
    CLIENT = "client"
    ADMIN = "admin"
    EXECUTOR = "executor"


@dataclass(frozen=True)
class Identity:
    federation: str
    role: Role
    id: str

    @property
    def uri(self) -> str:
        return f"spiffe://{self.federation}/{self.role}/{self.id}"


@dataclass(frozen=True)
class Credentials:
    """Where one party's certificate, key and trusted CA are on disk."""

    ca: Path
    cert: Path
    key: Path


def check_id(value: str, what: str = "id") -> str:
    """Ids become file names and URI path segments, so only a safe alphabet is accepted."""
    if not _ID_PATTERN.fullmatch(value):
        raise PKIError(f"invalid {what} {value!r}: use 1-63 of a-z 0-9 . _ - starting with a letter or digit")
    return value


def federation_of(pki_dir: Path) -> str:
    try:
        return json.loads((pki_dir / "pki.json").read_text())["federation"]
    except FileNotFoundError:
        raise PKIError(f"{pki_dir} is not a fedge PKI (no pki.json): run `fedge pki init` first") from None


def credentials(pki_dir: Path, role: Role, id_: str) -> Credentials:
    federation_of(pki_dir)
    creds = Credentials(
        ca=pki_dir / "ca.pem", cert=pki_dir / role / f"{id_}.pem", key=pki_dir / role / f"{id_}.key"
    )
    if not creds.cert.exists():
        raise PKIError(f"no {role} certificate {id_!r} in {pki_dir}: issue one with `fedge pki {role}-cert`")
    for path in (creds.ca, creds.cert, creds.key):
        check_readable(path)
    return creds


def check_readable(path: Path) -> None:
    """Refuse, in one line, a file this process may not read: a container that runs as another uid than
    the files' owner (deploy/README.md) learns which file and which uid, instead of failing later, deep in
    a TLS handshake. A file that is not there is not this check's business."""
    try:
        path.open("rb").close()
    except PermissionError:
        raise PKIError(
            f"cannot read {path} as uid {os.geteuid()}: chown it to that uid, or run as its owner"
        ) from None
    except FileNotFoundError:
        pass


def issued(pki_dir: Path, role: Role) -> list[str]:
    """Ids that hold a certificate of ``role``, sorted."""
    return sorted(p.stem for p in (pki_dir / role).glob("*.pem"))


def active(pki_dir: Path, role: Role, now: dt.datetime | None = None) -> list[str]:
    """Ids whose current certificate of ``role`` is neither revoked nor expired: who may be selected."""
    moment = now or dt.datetime.now(dt.UTC)
    revoked_serials = revoked(pki_dir)
    return [c.id for c in certificates(pki_dir, role) if c.status(revoked_serials, moment) == "valid"]


RENEW_AT = 2 / 3  # of a certificate's life: renewed from then on, so a missed attempt still lands in time


def renewal_time(not_before: dt.datetime, not_after: dt.datetime) -> dt.datetime:
    """When a certificate valid from ``not_before`` to ``not_after`` is due for renewal."""
    return not_before + (not_after - not_before) * RENEW_AT


def renewal_due(not_before: dt.datetime, not_after: dt.datetime, now: dt.datetime) -> bool:
    """Whether a certificate should be renewed now: once two thirds of its life have passed."""
    return now >= renewal_time(not_before, not_after)


@dataclass(frozen=True)
class CertificateInfo:
    role: Role
    id: str
    serial: int
    not_after: dt.datetime
    not_before: dt.datetime

    def status(self, revoked_serials: dict[int, dt.datetime], now: dt.datetime) -> str:
        if self.serial in revoked_serials:
            return "revoked"
        return "expired" if now > self.not_after else "valid"


def info_of(role: Role, id_: str, cert: x509.Certificate) -> CertificateInfo:
    return CertificateInfo(role, id_, cert.serial_number, cert.not_valid_after_utc, cert.not_valid_before_utc)


def certificates(pki_dir: Path, role: Role) -> list[CertificateInfo]:
    """The current certificate of every id of ``role``, sorted by id."""
    found = []
    for id_ in issued(pki_dir, role):
        cert = x509.load_pem_x509_certificate((pki_dir / role / f"{id_}.pem").read_bytes())
        found.append(info_of(role, id_, cert))
    return found


def ca_fingerprint(pki_dir: Path) -> str:
    """sha256 of the CA certificate (DER), in hex: what a device pins when it enrolls."""
    return fingerprint(x509.load_pem_x509_certificate((pki_dir / "ca.pem").read_bytes()))


def fingerprint(cert: x509.Certificate) -> str:
    return hashlib.sha256(cert.public_bytes(serialization.Encoding.DER)).hexdigest()


def init_ca(pki_dir: Path, federation: str) -> Path:
    if not _FEDERATION_PATTERN.fullmatch(federation):
        raise PKIError(f"invalid federation name {federation!r}: use a-z 0-9 - (at most 63)")
    if (pki_dir / "ca.key").exists():
        raise PKIError(f"{pki_dir} already holds a CA; refusing to overwrite it")
    pki_dir.mkdir(parents=True, exist_ok=True)
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "fedge"),
            x509.NameAttribute(NameOID.COMMON_NAME, f"fedge {federation} CA"),
        ]
    )
    now = dt.datetime.now(dt.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + CA_LIFETIME)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(_key_usage(issues_certificates=True), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    write_file(pki_dir / "ca.key", key_pem(key), private=True)
    write_file(pki_dir / "ca.pem", cert.public_bytes(serialization.Encoding.PEM))
    write_file(pki_dir / "pki.json", json.dumps({"federation": federation}).encode())
    _write_crl(pki_dir, [])
    return pki_dir / "ca.pem"


def issue(
    pki_dir: Path,
    role: Role,
    id_: str,
    hosts: tuple[str, ...] = (),
    lifetime: dt.timedelta = LEAF_LIFETIME,
) -> Credentials:
    """Issue a certificate for ``role``/``id_``; ``hosts`` (DNS names or IPs) go in the SAN for servers."""
    check_id(id_, f"{role} id")
    federation_of(pki_dir)
    key = ec.generate_private_key(ec.SECP256R1())
    creds = Credentials(
        ca=pki_dir / "ca.pem", cert=pki_dir / role / f"{id_}.pem", key=pki_dir / role / f"{id_}.key"
    )
    sign_certificate(pki_dir, role, id_, key.public_key(), hosts, lifetime, private_key_pem=key_pem(key))
    return creds


def sign_certificate(
    pki_dir: Path,
    role: Role,
    id_: str,
    public_key: ec.EllipticCurvePublicKey,
    hosts: tuple[str, ...] = (),
    lifetime: dt.timedelta = LEAF_LIFETIME,
    private_key_pem: bytes | None = None,
) -> bytes:
    """Sign a certificate for a key made elsewhere (an enrolling device's CSR) and keep a copy (PEM).

    The profile follows the role: servers and executors get serverAuth, everyone clientAuth; every leaf may
    only sign (TLS handshakes, updates, models), never issue certificates. ``private_key_pem``, for a key
    made here, is written only once the certificate is signed: a refused issue leaves the old key and cert.
    """
    check_id(id_, f"{role} id")
    if lifetime > MAX_LEAF_LIFETIME:
        raise PKIError(f"a certificate lives at most {MAX_LEAF_LIFETIME.days} days, not {lifetime.days}")
    federation = federation_of(pki_dir)
    ca_key = serialization.load_pem_private_key((pki_dir / "ca.key").read_bytes(), password=None)
    ca_cert = x509.load_pem_x509_certificate((pki_dir / "ca.pem").read_bytes())
    identity = Identity(federation, role, id_)
    names: list[x509.GeneralName] = [x509.UniformResourceIdentifier(identity.uri)]
    for host in hosts:
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(host)))
        except ValueError:
            names.append(x509.DNSName(host))
    # Servers also connect as clients: the aggregation server to the MQTT broker, to announce rounds.
    # Executors are both: clients dial them with jobs, and they submit to the server.
    usages = [ExtendedKeyUsageOID.CLIENT_AUTH]
    if role in (Role.SERVER, Role.EXECUTOR):
        usages.insert(0, ExtendedKeyUsageOID.SERVER_AUTH)
    now = dt.datetime.now(dt.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, f"{role}:{id_}")]))
        .issuer_name(ca_cert.subject)
        .public_key(public_key)
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + lifetime)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(_key_usage(issues_certificates=False), critical=True)
        .add_extension(x509.SubjectAlternativeName(names), critical=False)
        .add_extension(x509.ExtendedKeyUsage(usages), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_cert.public_key()),  # type: ignore[arg-type]
            critical=False,
        )
        .sign(ca_key, hashes.SHA256())  # type: ignore[arg-type]
    )
    pem = cert.public_bytes(serialization.Encoding.PEM)
    (pki_dir / role).mkdir(exist_ok=True)
    path = pki_dir / role / f"{id_}.pem"
    with locked(pki_dir):
        replaced = _serial_in(path)
        if private_key_pem is not None:
            write_file(path.with_suffix(".key"), private_key_pem, private=True)
        write_file(path, pem)
        if replaced is not None:
            _add_to_crl(pki_dir, {replaced: x509.ReasonFlags.superseded})
    return pem


def _serial_in(path: Path) -> int | None:
    """The serial of the certificate in ``path``, None when there is none (or it cannot be read)."""
    try:
        return x509.load_pem_x509_certificate(path.read_bytes()).serial_number
    except (FileNotFoundError, ValueError):
        return None


def revoke(pki_dir: Path, role: Role, id_: str) -> CertificateInfo:
    """Put the current certificate of ``role``/``id_`` on the CRL (``crl.pem``), re-signed by the CA.

    Every certificate the id held before is on the CRL already, as superseded (``sign_certificate``), so
    revoking an id revokes every certificate it ever had: a stolen older key does not come back through
    the broker, a grant or an executor. The certificate file stays, so ``fedge pki list`` still shows it
    (as revoked); issuing or enrolling the same id again gives a new serial, which the list does not name.
    """
    check_id(id_, f"{role} id")
    federation_of(pki_dir)
    path = pki_dir / role / f"{id_}.pem"
    if not path.exists():
        raise PKIError(f"no {role} certificate {id_!r} in {pki_dir}")
    cert = x509.load_pem_x509_certificate(path.read_bytes())
    with locked(pki_dir):
        if cert.serial_number in revoked(pki_dir):
            raise PKIError(f"the certificate of {role} {id_!r} is already revoked")
        _add_to_crl(pki_dir, {cert.serial_number: x509.ReasonFlags.unspecified})
    return info_of(role, id_, cert)


def revoked(pki_dir: Path) -> dict[int, dt.datetime]:
    """Serial -> revocation time, from ``crl.pem`` (checked against the CA's signature)."""
    return load_crl(pki_dir / "crl.pem", x509.load_pem_x509_certificate((pki_dir / "ca.pem").read_bytes()))


def load_crl(path: Path, ca: x509.Certificate) -> dict[int, dt.datetime]:
    return {entry.serial_number: entry.revocation_date_utc for entry in _verified_crl(path, ca)}


def _verified_crl(path: Path, ca: x509.Certificate) -> list[x509.RevokedCertificate]:
    """The entries of the CRL at ``path`` (none without one), once its signature checks against the CA."""
    if not path.exists():
        return []
    crl = x509.load_pem_x509_crl(path.read_bytes())
    if not crl.is_signature_valid(ca.public_key()):  # type: ignore[arg-type]
        raise PKIError(f"{path} is not signed by the federation CA")
    return list(crl)


def _add_to_crl(pki_dir: Path, additions: dict[int, x509.ReasonFlags]) -> None:
    """Re-sign the CRL with ``additions`` (serial -> reason) added to its entries (under ``locked``).

    Entries revoked longer ago than any leaf lives are dropped: their certificates have expired, and a CRL
    that only grows (every renewal supersedes a serial) would be re-read by every server and broker."""
    ca = x509.load_pem_x509_certificate((pki_dir / "ca.pem").read_bytes())
    now = dt.datetime.now(dt.UTC)
    kept = [
        entry
        for entry in _verified_crl(pki_dir / "crl.pem", ca)
        if now - entry.revocation_date_utc <= MAX_LEAF_LIFETIME + dt.timedelta(minutes=5)
    ]
    listed = {entry.serial_number for entry in kept}
    added = [
        x509.RevokedCertificateBuilder()
        .serial_number(serial)
        .revocation_date(now)
        .add_extension(x509.CRLReason(reason), critical=False)
        .build()
        for serial, reason in sorted(additions.items())
        if serial not in listed
    ]
    _write_crl(pki_dir, [*kept, *added])


def _write_crl(pki_dir: Path, entries: list[x509.RevokedCertificate]) -> None:
    ca_key = serialization.load_pem_private_key((pki_dir / "ca.key").read_bytes(), password=None)
    ca_cert = x509.load_pem_x509_certificate((pki_dir / "ca.pem").read_bytes())
    now = dt.datetime.now(dt.UTC)
    builder = (
        x509.CertificateRevocationListBuilder()
        .issuer_name(ca_cert.subject)
        .last_update(now - dt.timedelta(minutes=5))
        .next_update(now + CRL_LIFETIME)
    )
    for entry in entries:
        builder = builder.add_revoked_certificate(entry)
    crl = builder.sign(ca_key, hashes.SHA256())  # type: ignore[arg-type]
    write_file(pki_dir / "crl.pem", crl.public_bytes(serialization.Encoding.PEM))


@contextlib.contextmanager
def locked(pki_dir: Path) -> Iterator[None]:
    """Serialize read-modify-write of the PKI's shared files (CRL, tokens) across processes."""
    with (pki_dir / ".lock").open("a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def identity_of(cert_der: bytes) -> Identity:
    """Read the fedge identity from a certificate the TLS layer has already verified."""
    return identity_in(x509.load_der_x509_certificate(cert_der))


def identity_in(cert: x509.Certificate) -> Identity:
    """The fedge identity a verified certificate carries in its SAN URI."""
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        raise PKIError("certificate has no subjectAltName") from None
    for uri in san.get_values_for_type(x509.UniformResourceIdentifier):
        match = re.fullmatch(r"spiffe://([a-z0-9-]+)/([a-z]+)/([a-z0-9._-]+)", uri)
        if match and match.group(2) in Role.__members__.values():
            return Identity(match.group(1), Role(match.group(2)), check_id(match.group(3)))
    raise PKIError("certificate carries no fedge identity (spiffe://<federation>/<role>/<id>)")


def _key_usage(issues_certificates: bool) -> x509.KeyUsage:
    """Every key signs; only the CA's also signs certificates and CRLs."""
    return x509.KeyUsage(
        digital_signature=True,
        key_cert_sign=issues_certificates,
        crl_sign=issues_certificates,
        content_commitment=False,
        key_encipherment=False,
        data_encipherment=False,
        key_agreement=False,
        encipher_only=False,
        decipher_only=False,
    )


def key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
