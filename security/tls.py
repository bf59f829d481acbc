"""TLS contexts: TLS 1.3, or TLS 1.2 with forward-secret AEAD suites only; every certificate presented is
verified against the federation CA.

OpenSSL's default TLS 1.2 list still offers CBC suites (Lucky-13-style padding oracles) and static-RSA key
exchange (no forward secrecy). Every fedge key is EC P-256, so ECDHE with AES-GCM or ChaCha20-Poly1305 is
all a peer of ours ever needs; TLS 1.3's suites are all AEAD already and are left as OpenSSL has them.
"""

from __future__ import annotations

import ssl

from fedge.security.pki import Credentials

TLS12_CIPHERS = "ECDHE+AESGCM:ECDHE+CHACHA20:!aNULL"


def server_context(creds: Credentials) -> ssl.SSLContext:
    """Asks every client for a certificate and fails the handshake on one the CA did not issue.

    A connection without a certificate is let through (``CERT_OPTIONAL``) only so that a device can
    enroll: the service's ``CertificateGate`` refuses it on every route except health and enrollment.
    """
    ctx = _restricted(ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER))
    ctx.load_cert_chain(creds.cert, creds.key)
    ctx.load_verify_locations(cafile=creds.ca)
    ctx.verify_mode = ssl.CERT_OPTIONAL
    return ctx


def pinned_context(ca_pem: bytes, creds: Credentials | None = None) -> ssl.SSLContext:
    """Verify the server against a CA held in memory (an enrolling device's pinned CA)."""
    ctx = _restricted(ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cadata=ca_pem.decode()))
    if creds is not None:
        ctx.load_cert_chain(creds.cert, creds.key)
    return ctx


def client_context(creds: Credentials) -> ssl.SSLContext:
    """A context for httpx's ``verify=``: passing ``cert=`` separately is silently dropped by httpx 0.28."""
    ctx = _restricted(ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=creds.ca))
    ctx.load_cert_chain(creds.cert, creds.key)
    return ctx


def _restricted(ctx: ssl.SSLContext) -> ssl.SSLContext:
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.set_ciphers(TLS12_CIPHERS)
    return ctx
