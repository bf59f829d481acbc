"""Which certificates a running service still accepts: re-read whenever the PKI directory changes.

``fedge pki revoke`` rewrites the CRL; a server on the same PKI directory notices within
``RECHECK_SECONDS`` and refuses the revoked certificate from its next request on, without a restart.
"""

from __future__ import annotations

import datetime as dt
import logging
import time
from pathlib import Path

from cryptography import x509

from fedge.security.pki import PKIError, load_crl

RECHECK_SECONDS = 1.0
log = logging.getLogger(__name__)


class RevocationList:
    def __init__(self, crl_path: Path, ca: x509.Certificate) -> None:
        self._path = crl_path
        self._ca = ca
        self._seen: tuple[int, int] | None = None
        self._checked = 0.0
        self._serials: dict[int, dt.datetime] = {}
        self._refresh()

    def is_revoked(self, serial: int) -> bool:
        if time.monotonic() - self._checked >= RECHECK_SECONDS:
            self._refresh()
        return serial in self._serials

    def _refresh(self) -> None:
        """Reload a changed file; a CRL whose signature fails is ignored and the last good one kept."""
        self._checked = time.monotonic()
        try:
            stat = self._path.stat()
        except FileNotFoundError:
            return
        seen = (stat.st_mtime_ns, stat.st_size)
        if seen == self._seen:
            return
        try:
            self._serials = load_crl(self._path, self._ca)
        except (PKIError, ValueError) as exc:
            log.error("keeping the previous revocation list: %s", exc)
            return
        self._seen = seen


class CurrentCertificates:
    """The serial of the certificate each id holds now (``<role>/<id>.pem``), re-read when the file changes.

    Issuing, enrolling or renewing an id replaces that file, so the certificate it held before is
    superseded at once: revoking an id by name then covers every key it ever had, not only the last.
    """

    def __init__(self, pki_dir: Path) -> None:
        self._dir = pki_dir
        self._cache: dict[Path, tuple[tuple[int, int], int]] = {}

    def serial_of(self, role: str, id_: str) -> int | None:
        path = self._dir / role / f"{id_}.pem"
        try:
            stat = path.stat()
        except FileNotFoundError:
            return None
        seen = (stat.st_mtime_ns, stat.st_size)
        cached = self._cache.get(path)
        if cached is None or cached[0] != seen:
            cached = (seen, x509.load_pem_x509_certificate(path.read_bytes()).serial_number)
            self._cache[path] = cached
        return cached[1]
