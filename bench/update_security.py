"""What certificate checks and signatures cost per update, against the upload they protect.

A real ``fedge server`` process on loopback; each update is sent as an edge function sends it: a fresh
mutual-TLS connection, a signed 1 M-parameter (4 MB float32) safetensors body. The security work on the
update path is timed piece by piece with the same functions the service and the client run:

- client: the ECDSA signature (``FedgeClient.sign_update``) over the sha256 that the client computed while
  encoding the body (``codec.encode_hashed``, as edge functions do): that hash is no separate pass over
  the body, but it is still work that only the signature needs, so it is timed too (encoding with the
  hash minus encoding without it, interleaved) and given both ways;
- server: the certificate gate (parse, revocation list, validity, current serial) and the ECDSA
  verification (the body's sha256 is not counted there: the store computes it anyway to name the update,
  and the signature check hands it over);
- TLS: a handshake with a client certificate the server verifies, minus one without any (the service
  lets a certificate-less handshake through for enrollment, so both are measured on the same server).

The ratio is that cost over the rest of the upload: the same upload without these checks.
"""

from __future__ import annotations

import datetime as dt
import ssl
import statistics
import tempfile
import time
from pathlib import Path

import httpx
import numpy as np
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from bench import loopback_pki
from fedge.codec import encode, encode_hashed, sha256
from fedge.security import signing
from fedge.security.revocation import CurrentCertificates, RevocationList
from fedge.security.tls import client_context
from fedge.server.identity import gate
from fedge.server.launcher import launch
from fedge.transport import FedgeClient
from fedge.wire import RoundState, UpdateMeta


def _model(parameters: int) -> dict[str, np.ndarray]:
    side = int(parameters**0.5)
    return {
        "dense.weight": np.zeros((side, side), dtype=np.float32),
        "dense.bias": np.zeros(side, np.float32),
    }


def _median_ms(samples: list[float]) -> float:
    return round(statistics.median(samples) * 1000, 3)


def _time(call, repeats: int) -> list[float]:
    samples = []
    for _ in range(repeats):
        started = time.perf_counter()
        call()
        samples.append(time.perf_counter() - started)
    return samples


def run(quick: bool) -> dict:
    parameters = 10_000 if quick else 1_000_000
    uploads = 3 if quick else 20
    repeats = 5 if quick else 50
    with tempfile.TemporaryDirectory(prefix="fedge-bench-") as tmp:
        work = Path(tmp)
        root = work / "pki"
        clients = loopback_pki.make(root, [f"c{i:03d}" for i in range(uploads + 1)])
        model = _model(parameters)
        initial = work / "initial.safetensors"
        initial.write_bytes(encode(model))
        server = launch(
            ["--pki", str(root), "--port", "0", "--task", "bench", "--init-model", str(initial),
             "--presence-window", "0", "--min-clients", str(uploads + 1), "--round-timeout", "3600"],
            work / "server",
            work / "server.log",
        )  # fmt: skip
        try:
            metadata = UpdateMeta(10).to_metadata()
            body, digest = encode_hashed(model, metadata)
            with FedgeClient(server.url, clients[0]) as api:
                info = api.current_round()
                while info.state is not RoundState.OPEN:
                    info = api.current_round(wait=5, etag=info.etag)
            upload = []
            for creds in clients[1:]:
                started = time.perf_counter()
                with FedgeClient(server.url, creds) as api:
                    api.post_update(info.round, body, body_sha256=digest)
                upload.append(time.perf_counter() - started)

            creds = clients[0]
            api = FedgeClient(server.url, creds)
            sign = _time(lambda: api.sign_update(info.round, body, body_sha256=digest), repeats)
            headers = api.sign_update(info.round, body, body_sha256=digest)
            plain_encode, hashed_encode = [], []
            for _ in range(repeats):  # interleaved
                plain_encode += _time(lambda: encode(model, metadata), 1)
                hashed_encode += _time(lambda: encode_hashed(model, metadata), 1)
            hash_in_encode = max(0.0, statistics.median(hashed_encode) - statistics.median(plain_encode))
            api.close()
            peer = x509.load_pem_x509_certificate(creds.cert.read_bytes()).public_bytes(
                serialization.Encoding.DER
            )
            revocations = RevocationList(
                root / "crl.pem", x509.load_pem_x509_certificate(creds.ca.read_bytes())
            )

            current = CurrentCertificates(root)
            nonce = headers["X-Fedge-Nonce"]
            claim = signing.UpdateClaim("bench", info.round, "c000", digest, nonce)

            def server_checks() -> None:
                now = dt.datetime.now(dt.UTC)
                refusal = gate(
                    peer, "/v1/rounds/1/updates", "bench", revocations.is_revoked, current.serial_of, now
                )
                assert refusal is None
                key = x509.load_der_x509_certificate(peer).public_key()
                signing.verify(key, claim.message(), headers["X-Fedge-Signature"])

            verify = _time(server_checks, repeats)
            hashing = _time(lambda: sha256(body), repeats)
            with_cert = client_context(creds)
            without_cert = ssl.create_default_context(cafile=creds.ca)

            def handshake(context: ssl.SSLContext) -> None:
                with httpx.Client(base_url=server.url, verify=context) as http:
                    assert http.get("/healthz").status_code == 200

            mtls, plain = [], []
            for _ in range(repeats):  # interleaved, so drift in the machine's load hits both alike
                mtls += _time(lambda: handshake(with_cert), 1)
                plain += _time(lambda: handshake(without_cert), 1)
        finally:
            server.stop()

    cost = (
        statistics.median(sign)
        + statistics.median(verify)
        + max(0.0, statistics.median(mtls) - statistics.median(plain))
    )
    total = statistics.median(upload)
    return {
        "parameters": parameters,
        "body_bytes": len(body),
        "uploads": uploads,
        "upload_ms": _median_ms(upload),
        "client_sign_ms": _median_ms(sign),
        "sha256_ms": _median_ms(hashing),
        "server_checks_ms": _median_ms(verify),
        "handshake_with_client_cert_ms": _median_ms(mtls),
        "handshake_without_client_cert_ms": _median_ms(plain),
        "security_ms": round(cost * 1000, 3),
        "upload_without_security_ms": round((total - cost) * 1000, 3),
        "overhead_percent": round(100 * cost / (total - cost), 2),
        "hash_in_encode_ms": round(hash_in_encode * 1000, 3),
        "overhead_with_hash_percent": round(
            100 * (cost + hash_in_encode) / (total - cost - hash_in_encode), 2
        ),
    }


def render(result: dict) -> str:
    return (
        f"Cost of certificate checks and signatures per update: a {result['parameters']:,}-parameter model "
        f"({result['body_bytes'] / 1e6:.1f} MB), {result['uploads']} uploads to a real server process, each "
        "on a fresh mutual-TLS connection as an edge function sends it (medians).\n\n"
        "| part | ms |\n|---|---:|\n"
        f"| whole signed upload | {result['upload_ms']} |\n"
        f"| client: ECDSA sign (body hashed while encoded) | {result['client_sign_ms']} |\n"
        f"| client: hashing while encoding (encode_hashed minus encode) | {result['hash_in_encode_ms']} |\n"
        f"| a separate sha256 pass, for comparison | {result['sha256_ms']} |\n"
        f"| server: certificate gate + ECDSA verify | {result['server_checks_ms']} |\n"
        f"| TLS handshake with client certificate | {result['handshake_with_client_cert_ms']} |\n"
        f"| TLS handshake without | {result['handshake_without_client_cert_ms']} |\n"
        f"| **security per update** | **{result['security_ms']}** |\n"
        f"| the same upload without it | {result['upload_without_security_ms']} |\n\n"
        f"Overhead: **{result['overhead_percent']} %** of the upload (goal: under 5 %); "
        f"{result['overhead_with_hash_percent']} % counting the hash computed while encoding.\n"
    )
