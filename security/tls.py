"""TLS contexts: TLS 1.2 or newer, both sides always verified against the federation CA."""

from __future__ import annotations

import ssl

from fedge.security.pki import Credentials


def server_context(creds: Credentials) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.load_cert_chain(creds.cert, creds.key)
    ctx.load_verify_locations(cafile=creds.ca)
    ctx.verify_mode = ssl.CERT_REQUIRED
    return ctx


def client_context(creds: Credentials) -> ssl.SSLContext:
    """A context for httpx's ``verify=``: passing ``cert=`` separately is silently dropped by httpx 0.28."""
    ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=creds.ca)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.load_cert_chain(creds.cert, creds.key)
    return ctx
