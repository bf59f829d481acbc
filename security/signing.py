"""Signatures on updates, on global models, and on the grants that let an executor submit for a client.

TLS proves who is on the other end of a connection, but not what a stored body is or which round it was
meant for. So each update is signed by its client over (federation, round, client id, sha256 of the body,
nonce) and each global model by the server over (federation, round, sha256 of the body): a body replayed
into another round or slot, or altered at rest, no longer verifies.

Signatures are ECDSA P-256 over SHA-256, DER-encoded, sent as URL-safe base64 in ``X-Fedge-Signature``.
The messages are a fixed list of fields, one a line, behind a purpose tag, so an update signature can never
pass for a model signature or the other way round.
"""

from __future__ import annotations

import base64
import binascii
import datetime as dt
import json
import re
import secrets
from dataclasses import dataclass

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec

from fedge.jsonlimits import loads
from fedge.security.pki import Identity, PKIError, Role, identity_of

SIGNATURE_HEADER = "X-Fedge-Signature"
NONCE_HEADER = "X-Fedge-Nonce"
SIGNER_HEADER = "X-Fedge-Signer"
GRANT_HEADER = "X-Fedge-Grant"
_NONCE = re.compile(r"[0-9a-f]{32,64}")
_MAX_GRANT = 16 * 1024  # a grant is about 1.5 KiB, most of it the signer's certificate


class SignatureError(Exception):
    """A signature is missing, malformed, or does not verify."""


@dataclass(frozen=True)
class UpdateClaim:
    """What a client's signature on a report vouches for: its update (``kind`` update) or its evaluation
    of a round's model (``kind`` evaluation). The kind is signed, so neither passes for the other."""

    federation: str
    round: int
    client: str
    body_sha256: str
    nonce: str
    kind: str = "update"

    def message(self) -> bytes:
        fields = (
            f"fedge-{self.kind}-v1",
            self.federation,
            str(self.round),
            self.client,
            self.body_sha256,
            self.nonce,
        )
        return "\n".join(fields).encode()


@dataclass(frozen=True)
class ModelClaim:
    """What the server's signature on a global model vouches for."""

    federation: str
    round: int
    body_sha256: str

    def message(self) -> bytes:
        return "\n".join(("fedge-model-v1", self.federation, str(self.round), self.body_sha256)).encode()


def new_nonce() -> str:
    return secrets.token_hex(16)


def check_nonce(nonce: str) -> str:
    if not _NONCE.fullmatch(nonce):
        raise SignatureError("nonce must be 32-64 lowercase hex digits")
    return nonce


def load_private_key(pem: bytes) -> ec.EllipticCurvePrivateKey:
    key = serialization.load_pem_private_key(pem, password=None)
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise PKIError("fedge keys are EC P-256 keys")
    return key


def sign(key: ec.EllipticCurvePrivateKey, message: bytes) -> str:
    return base64.urlsafe_b64encode(key.sign(message, ec.ECDSA(hashes.SHA256()))).decode()


def verify(public_key: object, message: bytes, signature: str) -> None:
    """Raise ``SignatureError`` unless ``signature`` is the signer's over exactly ``message``."""
    if not isinstance(public_key, ec.EllipticCurvePublicKey):
        raise SignatureError("the signer's key is not an EC key")
    try:
        raw = base64.urlsafe_b64decode(signature.encode("ascii"))
    except (binascii.Error, ValueError, UnicodeEncodeError):
        raise SignatureError("signature is not base64") from None
    try:
        public_key.verify(raw, message, ec.ECDSA(hashes.SHA256()))
    except InvalidSignature:
        raise SignatureError("signature does not verify") from None


def encode_certificate(cert_pem: bytes) -> str:
    """A certificate as one header value (base64 of its DER)."""
    cert = x509.load_pem_x509_certificate(cert_pem)
    return base64.urlsafe_b64encode(cert.public_bytes(serialization.Encoding.DER)).decode()


def signer_identity(
    ca_pem: bytes, signer: str, role: Role, now: dt.datetime | None = None
) -> tuple[Identity, x509.Certificate]:
    """Check that ``signer`` (a header-encoded certificate) was issued by the pinned CA, is within its
    validity period and holds ``role``; return its identity and the certificate."""
    try:
        der = base64.urlsafe_b64decode(signer.encode("ascii"))
        cert = x509.load_der_x509_certificate(der)
    except (binascii.Error, ValueError, UnicodeEncodeError):
        raise SignatureError("the signer's certificate cannot be read") from None
    ca = x509.load_pem_x509_certificate(ca_pem)
    try:
        cert.verify_directly_issued_by(ca)
    except (ValueError, TypeError, InvalidSignature):
        raise SignatureError("the signer's certificate was not issued by the federation CA") from None
    moment = now or dt.datetime.now(dt.UTC)
    if not cert.not_valid_before_utc <= moment <= cert.not_valid_after_utc:
        raise SignatureError("the signer's certificate is not valid now")
    try:
        identity = identity_of(der)
    except PKIError as exc:
        raise SignatureError(str(exc)) from None
    if identity.role is not role:
        raise SignatureError(f"the signer is a {identity.role}, not a {role}")
    return identity, cert


def verify_model(ca_pem: bytes, federation: str, claim: ModelClaim, signature: str, signer: str) -> None:
    """Refuse a global model unless the federation's server signed exactly this body for this round."""
    identity, cert = signer_identity(ca_pem, signer, Role.SERVER)
    if identity.federation != federation or claim.federation != federation:
        raise SignatureError(f"the model was signed for federation {identity.federation!r}")
    verify(cert.public_key(), claim.message(), signature)


@dataclass(frozen=True)
class Grant:
    """A client's permission for one executor to submit its update for one round, until ``expires_at``.

    Sent by the executor as ``X-Fedge-Grant``: the fields, the client's signature over them and the
    client's certificate, so the server checks it against the CA and the revocation list like any caller.
    """

    federation: str
    round: int
    client: str
    executor: str
    expires_at: float

    def message(self) -> bytes:
        fields = ("fedge-grant-v1", self.federation, str(self.round), self.client, self.executor)
        return "\n".join((*fields, repr(float(self.expires_at)))).encode()


def make_grant(key: ec.EllipticCurvePrivateKey, cert_pem: bytes, grant: Grant) -> str:
    payload = {
        **vars(grant),
        "signature": sign(key, grant.message()),
        "certificate": encode_certificate(cert_pem),
    }
    return base64.urlsafe_b64encode(json.dumps(payload).encode()).decode()


def grant_client(header: str) -> str:
    """The client a grant is for, unverified: the executor needs it to sign; the server checks it all."""
    return _decode_grant(header)[0].client


def read_grant(ca_pem: bytes, header: str, now: float) -> tuple[Grant, x509.Certificate]:
    """Check a grant's signature, signer and expiry; return it with its signer's certificate, for the
    caller to check that it still counts (``security.revocation.standing``)."""
    grant, signature, certificate = _decode_grant(header)
    identity, cert = signer_identity(ca_pem, certificate, Role.CLIENT)
    if (identity.federation, identity.id) != (grant.federation, grant.client):
        raise SignatureError(f"the grant for {grant.client!r} is signed by {identity.id!r}")
    verify(cert.public_key(), grant.message(), signature)
    if now >= grant.expires_at:
        raise SignatureError("the grant has expired")
    return grant, cert


def _decode_grant(header: str) -> tuple[Grant, str, str]:
    if len(header) > _MAX_GRANT:
        raise SignatureError(f"the grant is over {_MAX_GRANT} characters")
    try:
        payload = loads(base64.urlsafe_b64decode(header.encode("ascii")), max_bytes=_MAX_GRANT)
        grant = Grant(
            federation=str(payload["federation"]),
            round=int(payload["round"]),
            client=str(payload["client"]),
            executor=str(payload["executor"]),
            expires_at=float(payload["expires_at"]),
        )
        return grant, str(payload["signature"]), str(payload["certificate"])
    except (binascii.Error, ValueError, OverflowError, UnicodeEncodeError, KeyError, TypeError):
        raise SignatureError("the grant cannot be read") from None
