"""Update intake: every check on an update that does not need the round's lock, done once per update.

A body arrives as bytes. ``check`` hashes it once, verifies its signature, parses it once into a typed
``UpdateMeta`` and tensors (read-only views of the body, no copy), restores a compressed update to full
precision, validates the tensors against the model and bounds how far they move it. What comes out is a
``CheckedUpdate``: ``Federation.submit`` then authorizes it for the round, writes it durably outside its
lock, and records and folds it under it, so the serialized part of ingestion stays small (design.md,
Scale). All of this runs on a worker thread, concurrently with other updates.

Refusals come in the order clients have always seen: who may send (signature, then the round's own rules,
which the federation answers in ``base_for``) before what was sent.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Protocol

from cryptography import x509

from fedge.codec import CodecError, Tensors, decode_view, encode, sha256, signature_of
from fedge.compression import restore
from fedge.security import signing
from fedge.server.errors import Rejected
from fedge.server.store import Provenance
from fedge.server.validation import check_norm, check_tensors
from fedge.wire import BASE_SHA256, Compression, CompressionError, MetadataError, UpdateMeta


@dataclass(frozen=True)
class Signed:
    """What vouches for an update sent over the API: the connection's certificate and the signature headers.

    ``computed_by`` names the executor that trained it for the client ("" for the client's own)."""

    peer_der: bytes
    federation: str
    signature: str
    nonce: str
    computed_by: str = ""


@dataclass(frozen=True)
class CheckedUpdate:
    """An update that passed every check but the round's: what the federation authorizes, stores and folds."""

    client: str
    round: int
    meta: UpdateMeta
    tensors: Tensors  # full precision, validated against the model
    body: bytes  # as sent: what its signature covers, stored as is
    restored: bytes | None  # for a compressed update, the full update it stands for, stored beside it
    sha256: str
    provenance: Provenance


class Bases(Protocol):
    """The one thing intake asks the federation: the model an update was trained from."""

    def base_for(self, round_: int, client: str, base_sha256: str | None) -> Tensors: ...


def check(
    round_: int,
    client: str,
    body: bytes,
    federation: Bases,
    max_update_norm: float | None,
    signed: Signed | None = None,
) -> CheckedUpdate:
    """The checked update, or ``Rejected`` with the first reason it cannot be taken."""
    digest = sha256(body)  # the one pass hashing makes over the body: it releases the GIL
    provenance = verify(signed, round_, client, digest) if signed else Provenance(body_sha256=digest)
    try:
        tensors, metadata = decode_view(body)
    except CodecError as exc:
        federation.base_for(round_, client, None)  # who may send comes first
        raise Rejected("malformed_update", str(exc)) from None
    base = federation.base_for(round_, client, metadata.get(BASE_SHA256))
    meta = _meta(metadata)
    full = _restore(tensors, meta.compression, base)
    check_tensors(full, signature_of(base))
    if max_update_norm is not None:
        check_norm(full, base, max_update_norm)
    restored = None
    if meta.compression.kind != "none":
        restored = encode(full, replace(meta, compression=Compression()).to_metadata())
    return CheckedUpdate(client, round_, meta, full, body, restored, digest, provenance)


def verify(signed: Signed, round_: int, client: str, digest: str, kind: str = "update") -> Provenance:
    """The key that signed must be the one behind this connection's certificate: the client's own (or the
    executor's, which api.py has already matched to the client's grant). ``kind``: what the client signed,
    an update or an evaluation (``signing.UpdateClaim``)."""
    claim = signing.UpdateClaim(signed.federation, round_, client, digest, signed.nonce, kind)
    try:
        signing.check_nonce(claim.nonce)
    except signing.SignatureError as exc:
        raise Rejected("bad_nonce", str(exc)) from None
    try:
        key = x509.load_der_x509_certificate(signed.peer_der).public_key()
        signing.verify(key, claim.message(), signed.signature)
    except signing.SignatureError as exc:
        raise Rejected("bad_signature", f"{kind} signature: {exc}") from None
    return Provenance(signed.signature, signed.nonce, digest, signed.computed_by)


def _meta(metadata: dict[str, str]) -> UpdateMeta:
    try:
        return UpdateMeta.from_metadata(metadata)
    except CompressionError as exc:
        raise Rejected("bad_compression", str(exc)) from None
    except MetadataError as exc:
        raise Rejected("bad_metadata", str(exc)) from None


def _restore(tensors: Tensors, how: Compression, base: Tensors) -> Tensors:
    """A compressed update as the full-precision one it stands for, so that validation and every strategy
    see only full updates."""
    try:
        return restore(tensors, how, base)
    except CompressionError as exc:
        raise Rejected("bad_compression", str(exc)) from None
