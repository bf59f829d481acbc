"""What the service trusts and signs with: the federation's CA, its revocation list, the server's key.

Loaded once at start from the PKI directory; the revocation list inside re-reads ``crl.pem`` as it changes.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec

from fedge.security import pki, signing
from fedge.security.revocation import CurrentCertificates, RevocationList


@dataclass
class Trust:
    pki_dir: Path
    federation: str
    ca_pem: bytes
    revocations: RevocationList
    current: CurrentCertificates
    signing_key: ec.EllipticCurvePrivateKey
    signer: str
    _model_signatures: dict[tuple[int, str], str] = field(default_factory=dict)

    @classmethod
    def load(cls, pki_dir: Path) -> Trust:
        creds = pki.credentials(pki_dir, pki.Role.SERVER, "server")
        ca_pem = creds.ca.read_bytes()
        return cls(
            pki_dir=pki_dir,
            federation=pki.federation_of(pki_dir),
            ca_pem=ca_pem,
            revocations=RevocationList(pki_dir / "crl.pem", x509.load_pem_x509_certificate(ca_pem)),
            current=CurrentCertificates(pki_dir),
            signing_key=signing.load_private_key(creds.key.read_bytes()),
            signer=signing.encode_certificate(creds.cert.read_bytes()),
        )

    def model_signature(self, round_: int, sha256: str) -> str:
        """The server's signature on a global model, made once per model version."""
        key = (round_, sha256)
        if key not in self._model_signatures:
            claim = signing.ModelClaim(self.federation, round_, sha256)
            self._model_signatures = {key: signing.sign(self.signing_key, claim.message())}
        return self._model_signatures[key]
