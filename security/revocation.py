"""The revocation list as a running service sees it: re-read whenever ``crl.pem`` changes on disk.

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
