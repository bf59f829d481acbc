"""TLS contexts: TLS 1.2 or newer; every certificate presented is verified against the federation CA."""

from __future__ import annotations

import ssl

from fedge.security.pki import Credentials


def server_context(creds: Credentials) -> ssl.SSLContext:
    """Asks every client for a certificate and fails the handshake on one the CA did not issue.

    A connection without a certificate is let through (``CERT_OPTIONAL``) only so that a device can
    enroll: the service's ``CertificateGate`` refuses it on every route except health and enrollment.
    """
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.load_cert_chain(creds.cert, creds.key)
    ctx.load_verify_locations(cafile=creds.ca)
    ctx.verify_mode = ssl.CERT_OPTIONAL
    return ctx


def pinned_context(ca_pem: bytes, creds: Credentials | None = None) -> ssl.SSLContext:
    """Verify the server against a CA held in memory (an enrolling device's pinned CA)."""
    ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cadata=ca_pem.decode())
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    if creds is not None:
        ctx.load_cert_chain(creds.cert, creds.key)
    return ctx


def client_context(creds: Credentials) -> ssl.SSLContext:
    """A context for httpx's ``verify=``: passing ``cert=`` separately is silently dropped by httpx 0.28."""
    ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=creds.ca)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.load_cert_chain(creds.cert, creds.key)
    return ctx
