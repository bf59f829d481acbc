"""A client for the v1 wire contract over mutual TLS, shared by edge functions, agents and simulations.

It signs every update it sends with the certificate's key and refuses a global model whose signature does
not verify against the CA it pins (``creds.ca``), so no caller can forget either check.
"""

from __future__ import annotations

import functools
import time
from dataclasses import dataclass
from types import TracebackType
from typing import Any

import httpx
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from fedge.codec import sha256
from fedge.security import signing
from fedge.security.pki import Credentials, Identity, identity_of
from fedge.security.tls import client_context
from fedge.wire import (
    ErrorBody,
    EvaluationReceipt,
    EvaluationReport,
    ModelMeta,
    RoundInfo,
    SkipNotice,
    SkipReceipt,
    UpdateReceipt,
)


class ServerError(Exception):
    """The server refused a request; ``code`` is the stable error code of the wire contract.
    ``retry_after``: the seconds its ``Retry-After`` header asked the client to wait, if it sent one."""

    def __init__(self, status: int, code: str, detail: str, retry_after: float | None = None) -> None:
        super().__init__(f"{status} {code}: {detail}")
        self.status = status
        self.code = code
        self.detail = detail
        self.retry_after = retry_after

    def __reduce__(self) -> tuple[type[ServerError], tuple[int, str, str, float | None]]:
        return ServerError, (self.status, self.code, self.detail, self.retry_after)


@dataclass(frozen=True)
class ModelDownload:
    body: bytes
    sha256: str
    round: int


# One pooled connection, kept between rounds: the server lets an identity's sole connection idle for 900 s
# (security.http_limits.idle_timeout_for), so it is never the server that closes the one reused here.
KEEP_ALIVE = httpx.Limits(max_keepalive_connections=1, keepalive_expiry=600.0)


class FedgeClient:
    def __init__(self, url: str, creds: Credentials, timeout: float = 60.0) -> None:
        self._creds = creds
        self._http = httpx.Client(
            base_url=url, verify=client_context(creds), timeout=timeout, limits=KEEP_ALIVE
        )

    @functools.cached_property
    def identity(self) -> Identity:
        cert = x509.load_pem_x509_certificate(self._creds.cert.read_bytes())
        return identity_of(cert.public_bytes(serialization.Encoding.DER))

    @functools.cached_property
    def _key(self) -> ec.EllipticCurvePrivateKey:
        """The certificate's private key, read once: the TLS context above holds this same key for the
        client's life, so a renewal on disk needs a new client either way."""
        return signing.load_private_key(self._creds.key.read_bytes())

    def __enter__(self) -> FedgeClient:
        return self

    def __exit__(self, *exc: type[BaseException] | BaseException | TracebackType | None) -> None:
        self.close()

    def close(self) -> None:
        self._http.close()

    def model(self, cached_sha256: str | None = None) -> ModelDownload | None:
        """The current global model, or None when ``cached_sha256`` is still current (HTTP 304)."""
        headers = {"If-None-Match": f'"{cached_sha256}"'} if cached_sha256 else {}
        response = self._http.get("/v1/model", headers=headers)
        if response.status_code == 304:
            return None
        raise_for_error(response)
        download = ModelDownload(
            body=response.content,
            sha256=sha256(response.content),
            round=int(response.headers["X-Fedge-Round"]),
        )
        signing.verify_model(
            self._creds.ca.read_bytes(),
            self.identity.federation,
            signing.ModelClaim(self.identity.federation, download.round, download.sha256),
            response.headers.get(signing.SIGNATURE_HEADER, ""),
            response.headers.get(signing.SIGNER_HEADER, ""),
        )
        return download

    def model_meta(self) -> ModelMeta:
        response = self._http.get("/v1/model/meta")
        raise_for_error(response)
        return ModelMeta.model_validate_json(response.content)

    def overview(self) -> dict[str, Any]:
        """Admin: the federation's rounds and clients with their figures (``GET /v1/admin/overview``), as
        the server's JSON (its types live in the server, above this module)."""
        response = self._http.get("/v1/admin/overview")
        raise_for_error(response)
        body = response.json()
        if not isinstance(body, dict):
            raise ServerError(response.status_code, "bad_overview", "the overview is not a JSON object")
        return body

    def start(self) -> RoundInfo:
        """Admin: let a federation served with ``--manual-start`` open round 1."""
        response = self._http.post("/v1/admin/start")
        raise_for_error(response)
        return RoundInfo.model_validate_json(response.content)

    def current_round(self, wait: float | None = None, etag: str | None = None) -> RoundInfo:
        """The current round; with ``wait`` and the ``etag`` last seen, block until it changes (long poll)."""
        params = {"wait": wait} if wait else {}
        headers = {"If-None-Match": etag} if etag else {}
        timeout = httpx.Timeout(self._http.timeout.read + (wait or 0))
        response = self._http.get("/v1/rounds/current", params=params, headers=headers, timeout=timeout)
        raise_for_error(response)
        return RoundInfo.model_validate_json(response.content)

    def post_update(
        self, round_: int, body: bytes, grant: str | None = None, body_sha256: str | None = None
    ) -> UpdateReceipt:
        """Send an update for ``round_``, signed over (federation, round, client id, sha256, nonce).

        An executor passes a client's ``grant`` (``FedgeClient.grant``) and submits in that client's slot.
        ``body_sha256``: the digest ``codec.encode_hashed`` gave with the body, so it is not hashed again."""
        owner = self.identity.id if grant is None else signing.grant_client(grant)
        signature = self.sign_update(round_, body, owner, body_sha256)
        headers = {"Content-Type": "application/octet-stream", **signature}
        if grant is not None:
            headers[signing.GRANT_HEADER] = grant
        response = self._http.post(f"/v1/rounds/{round_}/updates", content=body, headers=headers)
        raise_for_error(response)
        return UpdateReceipt.model_validate_json(response.content)

    def skip(self, round_: int, reason: str) -> SkipReceipt:
        """Tell the server early that this client sends no update for ``round_``, so the round need not wait
        for it until the deadline. ``reason`` (at most 200 characters) is kept for the operators."""
        notice = SkipNotice(reason=reason)
        response = self._http.post(f"/v1/rounds/{round_}/skip", json=notice.model_dump())
        raise_for_error(response)
        return SkipReceipt.model_validate_json(response.content)

    def post_evaluation(self, round_: int, report: EvaluationReport) -> EvaluationReceipt:
        """Send this client's evaluation of the model ``round_`` produced (it was asked to, in the round
        announcement), signed as an evaluation over the JSON body it sends."""
        body = report.model_dump_json().encode()
        headers = {"Content-Type": "application/json", **self.sign_update(round_, body, kind="evaluation")}
        response = self._http.post(f"/v1/rounds/{round_}/evaluation", content=body, headers=headers)
        raise_for_error(response)
        return EvaluationReceipt.model_validate_json(response.content)

    def sign_update(
        self,
        round_: int,
        body: bytes,
        client: str | None = None,
        body_sha256: str | None = None,
        kind: str = "update",
    ) -> dict[str, str]:
        """The signature headers of an update in ``client``'s slot (default: our own), or of another
        ``kind`` of report (an evaluation); ``body_sha256`` when the body was hashed as it was encoded
        (``codec.encode_hashed``)."""
        nonce = signing.new_nonce()
        owner = client or self.identity.id
        digest = body_sha256 or sha256(body)
        claim = signing.UpdateClaim(self.identity.federation, round_, owner, digest, nonce, kind)
        return {
            signing.SIGNATURE_HEADER: signing.sign(self._key, claim.message()),
            signing.NONCE_HEADER: nonce,
        }

    def grant(self, round_: int, executor: str, ttl: float = 3600.0) -> str:
        """Let ``executor`` submit this client's update for ``round_`` during the next ``ttl`` seconds."""
        grant = signing.Grant(self.identity.federation, round_, self.identity.id, executor, time.time() + ttl)
        return signing.make_grant(self._key, self._creds.cert.read_bytes(), grant)


def raise_for_error(response: httpx.Response) -> None:
    if response.is_success:
        return
    try:
        error = ErrorBody.model_validate_json(response.content)
    except ValueError:
        error = ErrorBody(error="http_error", detail=response.text[:200])
    retry_after = _seconds(response.headers.get("Retry-After"))
    raise ServerError(response.status_code, error.error, error.detail, retry_after)


def _seconds(header: str | None) -> float | None:
    """A ``Retry-After`` in seconds; an HTTP date or garbage counts as none (the caller's backoff rules)."""
    try:
        seconds = float(header) if header is not None else None
    except ValueError:
        return None
    return seconds if seconds is not None and 0 <= seconds < float("inf") else None
