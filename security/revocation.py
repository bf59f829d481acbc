"""Which certificates still count: one rule, applied to every certificate any fedge service is shown.

A certificate counts only while it is the current certificate of its id (``<role>/<id>.pem``), neither
revoked nor expired, and of this federation. ``standing`` is that rule; the aggregation service applies it
to every connection and to the signer of every executor grant, the executor to its callers and to the
grants they bring, and selection to every client it may pick. The broker gets the same answer from the CRL,
because issuing a new certificate for an id puts the one it replaces on the CRL as superseded (pki.py).

``fedge pki revoke`` rewrites the CRL; a service on the same PKI directory refuses the revoked certificate
from its next request on, without a restart: every check stats ``crl.pem`` (about a microsecond) and
re-reads it when it changed. An earlier version re-checked at most once a second, and an agent started
within that second of a revocation still had an update accepted.
"""

from __future__ import annotations

import datetime as dt
import logging
import threading
from collections.abc import Callable
from pathlib import Path

from cryptography import x509

from fedge.security.pki import Identity, PKIError, Role, federation_of, identity_in, load_crl

log = logging.getLogger(__name__)


class NotStanding(Exception):
    """A certificate that does not count: ``code`` is stable and machine-readable, ``detail`` says why."""

    def __init__(self, code: str, detail: str) -> None:
        super().__init__(detail)
        self.code, self.detail = code, detail


def standing(
    cert: x509.Certificate,
    federation: str,
    is_revoked: Callable[[int], bool],
    current_serial: Callable[[str, str], int | None],
    now: dt.datetime,
) -> Identity:
    """The identity ``cert`` proves, or ``NotStanding`` when it is revoked, expired, of another federation,
    or not the certificate its id holds now (a newer one was issued, or none is on record).

    Superseded is told before revoked: a replaced certificate goes on the CRL too, and its holder should
    hear that a newer one exists, whether or not the CRL has been re-read yet."""
    try:
        identity = identity_in(cert)
    except PKIError as exc:
        raise NotStanding("bad_client_certificate", str(exc)) from None
    if identity.federation != federation:
        raise NotStanding("wrong_federation", f"certificate is for federation {identity.federation!r}")
    current = current_serial(identity.role, identity.id)
    if current is None:
        raise NotStanding("unknown_certificate", f"no certificate is on record for {identity.uri}")
    if current != cert.serial_number:
        raise NotStanding("certificate_superseded", f"{identity.uri} holds a newer certificate than this")
    if is_revoked(cert.serial_number):
        raise NotStanding("certificate_revoked", "this certificate has been revoked")
    if not cert.not_valid_before_utc <= now <= cert.not_valid_after_utc:
        raise NotStanding("certificate_expired", "this certificate is not valid now")
    return identity


class RevocationList:
    def __init__(self, crl_path: Path, ca: x509.Certificate) -> None:
        self._path = crl_path
        self._ca = ca
        self._seen: tuple[int, int] | None = None
        self._lock = threading.Lock()  # selection threads check standing beside the event loop
        self._serials: dict[int, dt.datetime] = {}
        self._refresh()

    def version(self) -> tuple[int, int] | None:
        """Which list is in force (changed whenever the CRL is reloaded), re-read as ``is_revoked`` does."""
        return self._refresh()[0]

    def is_revoked(self, serial: int) -> bool:
        return serial in self._refresh()[1]

    def _refresh(self) -> tuple[tuple[int, int] | None, dict[int, dt.datetime]]:
        """The list in force, reloaded first when the file changed; a CRL whose signature fails is ignored
        and the last good one kept."""
        with self._lock:
            try:
                stat = self._path.stat()
            except FileNotFoundError:
                return self._seen, self._serials
            seen = (stat.st_mtime_ns, stat.st_size)
            if seen != self._seen:
                try:
                    self._serials = load_crl(self._path, self._ca)
                    self._seen = seen
                except (PKIError, ValueError) as exc:
                    log.error("keeping the previous revocation list: %s", exc)
            return self._seen, self._serials


class CurrentCertificates:
    """The certificate each id holds now (``<role>/<id>.pem``), re-read when the file changes.

    Issuing, enrolling or renewing an id replaces that file, so the certificate it held before is
    superseded at once, whether or not the CRL has caught up."""

    def __init__(self, pki_dir: Path) -> None:
        self._dir = pki_dir
        self._cache: dict[Path, tuple[tuple[int, int], x509.Certificate]] = {}

    def certificate_of(self, role: str, id_: str) -> x509.Certificate | None:
        path = self._dir / role / f"{id_}.pem"
        try:
            stat = path.stat()
        except FileNotFoundError:
            return None
        seen = (stat.st_mtime_ns, stat.st_size)
        cached = self._cache.get(path)
        if cached is None or cached[0] != seen:
            cached = (seen, x509.load_pem_x509_certificate(path.read_bytes()))
            self._cache[path] = cached
        return cached[1]

    def serial_of(self, role: str, id_: str) -> int | None:
        cert = self.certificate_of(role, id_)
        return None if cert is None else cert.serial_number


class Standing:
    """``standing`` against a PKI directory's CRL and current certificates, both re-read as they change."""

    def __init__(self, pki_dir: Path) -> None:
        self.federation = federation_of(pki_dir)
        ca = x509.load_pem_x509_certificate((pki_dir / "ca.pem").read_bytes())
        self.revocations = RevocationList(pki_dir / "crl.pem", ca)
        self.current = CurrentCertificates(pki_dir)

    def check(self, cert: x509.Certificate, now: dt.datetime | None = None) -> Identity:
        moment = now or dt.datetime.now(dt.UTC)
        return standing(cert, self.federation, self.revocations.is_revoked, self.current.serial_of, moment)

    def counts(self, role: Role, id_: str, now: dt.datetime | None = None) -> bool:
        """Whether ``id_`` holds a certificate of ``role`` that counts now (who may be selected)."""
        cert = self.current.certificate_of(role, id_)
        if cert is None:
            return False
        try:
            return self.check(cert, now).role is role
        except NotStanding:
            return False
