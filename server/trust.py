"""What the service trusts and signs with: the federation's CA, the one rule of which certificates still
count (``security.revocation.Standing``), the server's key, and when each client last showed a certificate
that counts (``server.presence``).

Loaded once at start from the PKI directory; the standing inside re-reads ``crl.pem`` and the certificates
as they change.
"""

from __future__ import annotations

import datetime as dt
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric import ec

from fedge.security import pki, signing
from fedge.security.revocation import Standing
from fedge.server.presence import Presence
from fedge.server.roster import IssuedIds, Roster


@dataclass
class Trust:
    pki_dir: Path
    federation: str
    ca_pem: bytes
    standing: Standing
    signing_key: ec.EllipticCurvePrivateKey
    signer: str
    enrolled_lifetime: dt.timedelta = pki.ENROLLED_LIFETIME  # of what enrollment and renewal issue
    presence: Presence = field(default_factory=Presence)
    _model_signatures: dict[tuple[int, str], str] = field(default_factory=dict)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def __post_init__(self) -> None:
        self.live_roster = Roster(self.standing)
        self.enrolled_roster = Roster(self.standing)
        self._issued = IssuedIds(self.pki_dir)

    @classmethod
    def load(cls, pki_dir: Path, enrolled_lifetime: dt.timedelta = pki.ENROLLED_LIFETIME) -> Trust:
        creds = pki.credentials(pki_dir, pki.Role.SERVER, "server")
        ca_pem = creds.ca.read_bytes()
        return cls(
            pki_dir=pki_dir,
            federation=pki.federation_of(pki_dir),
            ca_pem=ca_pem,
            standing=Standing(pki_dir),
            signing_key=signing.load_private_key(creds.key.read_bytes()),
            signer=signing.encode_certificate(creds.cert.read_bytes()),
            enrolled_lifetime=enrolled_lifetime,
        )

    def eligible(self, window: float, now: float | None = None) -> list[str]:
        """The clients selection may pick, sorted: seen within ``window`` seconds (``server.presence``) and
        holding a certificate that counts now; with a window of 0, every client whose certificate counts,
        seen or not (a fleet known to be always on, or one whose clients speak only when asked). Kept by
        change (``server.roster``): a round costs what changed since the last, not what is registered."""
        moment = time.time() if now is None else now
        with self._lock:
            if window == 0:
                return self.enrolled_roster.update(*self._issued.changes(), moment)
            return self.live_roster.update(*self.presence.changes(moment, window), moment)

    def model_signature(self, round_: int, sha256: str) -> str:
        """The server's signature on a global model, made once per model version."""
        key = (round_, sha256)
        if key not in self._model_signatures:
            claim = signing.ModelClaim(self.federation, round_, sha256)
            self._model_signatures = {key: signing.sign(self.signing_key, claim.message())}
        return self._model_signatures[key]
