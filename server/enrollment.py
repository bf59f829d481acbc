"""Enrollment: a device with a one-time token and a CSR gets its client certificate.

``/v1/ca`` and ``/v1/enroll`` are the only routes besides ``/healthz`` that need no client certificate.
The device checks the CA it downloads against the fingerprint the operator gave it before it sends its
token, so an impostor server learns nothing. The CSR is checked before the token is spent: a malformed
request does not burn a token. ``/v1/enroll/renew`` is for a client whose certificate is still valid.
An enrolled device is added to the broker's ACL at once (``fedge.security.broker.refresh``).
"""

from __future__ import annotations

import logging

from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec
from fastapi import APIRouter
from fastapi.responses import PlainTextResponse
from pydantic import BaseModel, Field

from fedge.security import broker, pki, tokens
from fedge.server.deps import TrustDep
from fedge.server.errors import RESPONSES, Rejected
from fedge.server.identity import Client
from fedge.server.jsonbody import BoundedJSONRoute
from fedge.server.trust import Trust

router = APIRouter(route_class=BoundedJSONRoute)
log = logging.getLogger(__name__)


class EnrollRequest(BaseModel):
    token: str = Field(min_length=1, max_length=256, description="one-time token from `fedge pki token`")
    csr: str = Field(max_length=16_384, description="PEM certificate signing request for an EC P-256 key")


class RenewRequest(BaseModel):
    csr: str = Field(max_length=16_384, description="PEM certificate signing request for an EC P-256 key")


class Enrolled(BaseModel):
    client: str
    certificate: str = Field(description="PEM")
    ca: str = Field(description="PEM")


@router.get("/v1/ca", response_class=PlainTextResponse)
def get_ca(trust: TrustDep) -> str:
    """The federation CA (PEM): an enrolling device compares its sha256 with the pinned fingerprint."""
    return trust.ca_pem.decode()


@router.post("/v1/enroll", status_code=201, responses=RESPONSES)
def enroll(body: EnrollRequest, trust: TrustDep) -> Enrolled:
    key = csr_public_key(body.csr)
    try:
        client = tokens.redeem(trust.pki_dir, body.token)
    except tokens.TokenError as exc:
        raise Rejected(exc.code, exc.detail) from None
    enrolled = _issue(trust, client, key)
    refresh_broker(trust, f"enrolled {client}")
    return enrolled


@router.post("/v1/enroll/renew", status_code=201, responses=RESPONSES)
def renew(body: RenewRequest, trust: TrustDep, identity: Client) -> Enrolled:
    """A fresh short-lived certificate for the caller's own id (the new key may differ from the old)."""
    return _issue(trust, identity.id, csr_public_key(body.csr))


def csr_public_key(pem: str) -> ec.EllipticCurvePublicKey:
    """The key of a well-formed, self-signed CSR for EC P-256; anything else is a 400 ``bad_csr``."""
    try:
        csr = x509.load_pem_x509_csr(pem.encode())
    except ValueError:
        raise Rejected("bad_csr", "csr is not a PEM certificate signing request") from None
    if not csr.is_signature_valid:
        raise Rejected("bad_csr", "the csr is not signed by its own key")
    key = csr.public_key()
    if not isinstance(key, ec.EllipticCurvePublicKey) or not isinstance(key.curve, ec.SECP256R1):
        raise Rejected("bad_csr", "fedge certificates are for EC P-256 keys")
    return key


def refresh_broker(trust: Trust, what: str) -> None:
    """After ``what`` (an enrollment, a revocation) the broker's ACL and CRL follow without a manual step.
    The change itself stands either way: a broker that cannot be reloaded from here is logged, and its
    operator reloads it."""
    try:
        done = broker.refresh(trust.pki_dir)
    except (OSError, pki.PKIError) as exc:
        log.warning("%s, but the broker's ACL could not be rewritten: %s", what, exc)
        return
    if done is not None:
        (log.info if done.reloaded else log.warning)("%s: %s", what, done.detail)


def _issue(trust: Trust, client: str, key: ec.EllipticCurvePublicKey) -> Enrolled:
    cert = pki.sign_certificate(trust.pki_dir, pki.Role.CLIENT, client, key, lifetime=trust.enrolled_lifetime)
    return Enrolled(client=client, certificate=cert.decode(), ca=trust.ca_pem.decode())
