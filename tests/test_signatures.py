"""Signatures on updates and models: what they bind, and that an edge function refuses a forged model."""

from __future__ import annotations

import dataclasses
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from conftest import toy_model

from fedge.codec import encode, sha256
from fedge.edge_functions.functions import Context
from fedge.security import pki, signing
from fedge.security.tls import server_context
from fedge.transport import FedgeClient


def key_of(pki_dir: Path, role: pki.Role, id_: str):
    return signing.load_private_key(pki.credentials(pki_dir, role, id_).key.read_bytes())


def signer_of(pki_dir: Path, role: pki.Role, id_: str) -> str:
    return signing.encode_certificate(pki.credentials(pki_dir, role, id_).cert.read_bytes())


def test_an_update_signature_binds_federation_round_client_body_and_nonce(pki_dir: Path) -> None:
    claim = signing.UpdateClaim("test", 3, "alice", sha256(b"body"), signing.new_nonce())
    signature = signing.sign(key_of(pki_dir, pki.Role.CLIENT, "alice"), claim.message())
    public = key_of(pki_dir, pki.Role.CLIENT, "alice").public_key()
    signing.verify(public, claim.message(), signature)
    changes = {
        "federation": "other",
        "round": 4,
        "client": "bob",
        "body_sha256": sha256(b"other"),
        "nonce": signing.new_nonce(),
    }
    for field, value in changes.items():
        with pytest.raises(signing.SignatureError, match="does not verify"):
            signing.verify(public, dataclasses.replace(claim, **{field: value}).message(), signature)
    with pytest.raises(signing.SignatureError):
        signing.verify(key_of(pki_dir, pki.Role.CLIENT, "bob").public_key(), claim.message(), signature)


def test_a_model_signature_must_come_from_the_federation_server(pki_dir: Path, other_pki: Path) -> None:
    claim = signing.ModelClaim("test", 2, sha256(b"model"))
    server_sig = signing.sign(key_of(pki_dir, pki.Role.SERVER, "server"), claim.message())
    ca = (pki_dir / "ca.pem").read_bytes()
    signing.verify_model(ca, "test", claim, server_sig, signer_of(pki_dir, pki.Role.SERVER, "server"))

    client_sig = signing.sign(key_of(pki_dir, pki.Role.CLIENT, "alice"), claim.message())
    refusals = [
        (
            dataclasses.replace(claim, body_sha256=sha256(b"x")),
            server_sig,
            pki.Role.SERVER,
            pki_dir,
            "does not verify",
        ),
        (dataclasses.replace(claim, round=3), server_sig, pki.Role.SERVER, pki_dir, "does not verify"),
        (claim, client_sig, pki.Role.CLIENT, pki_dir, "not a server"),
        (claim, server_sig, pki.Role.CLIENT, other_pki, "not issued by the federation CA"),
        (claim, "", pki.Role.SERVER, pki_dir, "does not verify"),
    ]
    for forged, signature, role, issuer, message in refusals:
        signer = signer_of(issuer, role, "alice" if role is pki.Role.CLIENT else "server")
        with pytest.raises(signing.SignatureError, match=message):
            signing.verify_model(ca, "test", forged, signature, signer)
    with pytest.raises(signing.SignatureError, match="cannot be read"):
        signing.verify_model(ca, "test", claim, server_sig, "not a certificate")
    with pytest.raises(signing.SignatureError, match="federation"):
        signing.verify_model(
            ca, "elsewhere", claim, server_sig, signer_of(pki_dir, pki.Role.SERVER, "server")
        )


class ForgingServer:
    """An impostor holding a valid server certificate's TLS but serving models it did not sign right."""

    def __init__(self, pki_dir: Path) -> None:
        self.body = b""
        self.headers: dict[str, str] = {}
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                self.send_response(200)
                for name, value in {"X-Fedge-Round": "1", **outer.headers}.items():
                    self.send_header(name, value)
                self.send_header("Content-Length", str(len(outer.body)))
                self.end_headers()
                self.wfile.write(outer.body)

            def log_message(self, *args: object) -> None:
                pass

        self.http = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        context = server_context(pki.credentials(pki_dir, pki.Role.SERVER, "server"))
        self.http.socket = context.wrap_socket(self.http.socket, server_side=True)
        self.url = f"https://127.0.0.1:{self.http.server_address[1]}"
        threading.Thread(target=self.http.serve_forever, daemon=True).start()


@pytest.fixture
def forger(pki_dir: Path) -> Iterator[ForgingServer]:
    server = ForgingServer(pki_dir)
    yield server
    server.http.shutdown()


def test_an_edge_function_refuses_a_model_whose_signature_does_not_verify(
    forger: ForgingServer, pki_dir: Path, other_pki: Path
) -> None:
    genuine = encode(toy_model(1.0), {"round": "1"})
    claim = signing.ModelClaim("test", 1, sha256(genuine))
    signature = signing.sign(key_of(pki_dir, pki.Role.SERVER, "server"), claim.message())
    server_cert = signer_of(pki_dir, pki.Role.SERVER, "server")
    forged = encode(toy_model(9.0), {"round": "1"})
    foreign_sig = signing.sign(key_of(other_pki, pki.Role.CLIENT, "alice"), claim.message())
    attempts = {
        "a different body under the genuine signature": (forged, signature, server_cert),
        "no signature": (genuine, "", server_cert),
        "signed by a client": (
            genuine,
            signing.sign(key_of(pki_dir, pki.Role.CLIENT, "alice"), claim.message()),
            signer_of(pki_dir, pki.Role.CLIENT, "alice"),
        ),
        "signed under another CA": (genuine, foreign_sig, signer_of(other_pki, pki.Role.CLIENT, "alice")),
    }
    creds = pki.credentials(pki_dir, pki.Role.CLIENT, "alice")
    for name, (body, sig, signer) in attempts.items():
        forger.body, forger.headers = body, {"X-Fedge-Signature": sig, "X-Fedge-Signer": signer}
        context = Context()
        with FedgeClient(forger.url, creds) as api, pytest.raises(signing.SignatureError):
            context.fetch_model(api)
        assert context.model == {}, name
        assert context.model_sha256 is None, name

    forger.body, forger.headers = genuine, {"X-Fedge-Signature": signature, "X-Fedge-Signer": server_cert}
    context = Context()
    with FedgeClient(forger.url, creds) as api:
        assert context.fetch_model(api) == len(genuine)
    assert context.model_sha256 == sha256(genuine)
