"""Sealing a client's shard for one executor: X25519 key agreement, HKDF-SHA256, AES-256-GCM.

The executor makes a fresh X25519 key pair when it starts and keeps it in memory only; it publishes the
public half signed with its certificate's key, so a client checks against the federation CA that the key
belongs to the executor its grant names. Each shard is sealed with an ephemeral key of the client's, and
the AES-GCM associated data binds (federation, round, client, executor): a sealed shard replayed into
another round's job, or sent to another executor, does not open.

The shard itself is a safetensors body of ``x`` and ``y``, never a pickle.
"""

from __future__ import annotations

import base64
import binascii
import os

import numpy as np
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from fedge.codec import CodecError, decode, encode
from fedge.security import signing
from fedge.security.pki import Role

_INFO = b"fedge-offload-shard-v1"


class OffloadError(Exception):
    """A sealed shard or an executor's key does not check out."""


def shard_context(federation: str, round_: int, client: str, executor: str) -> bytes:
    return "\n".join((_INFO.decode(), federation, str(round_), client, executor)).encode()


def key_message(federation: str, executor: str, public_key: str) -> bytes:
    return "\n".join(("fedge-offload-key-v1", federation, executor, public_key)).encode()


def raw_public(key: X25519PrivateKey) -> str:
    raw = key.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return _b64(raw)


def verify_executor_key(ca_pem: bytes, federation: str, executor: str, published: dict) -> str:
    """The executor's X25519 public key, once its signature and certificate check out for ``executor``."""
    try:
        public_key, signature, signer = (
            published["public_key"],
            published["signature"],
            published["certificate"],
        )
    except (KeyError, TypeError):
        raise OffloadError("the executor's key statement is incomplete") from None
    try:
        identity, cert = signing.signer_identity(ca_pem, signer, Role.EXECUTOR)
        if (identity.federation, identity.id) != (federation, executor):
            raise OffloadError(f"the key is signed by {identity.id!r}, not executor {executor!r}")
        signing.verify(cert.public_key(), key_message(federation, executor, public_key), signature)
    except signing.SignatureError as exc:
        raise OffloadError(str(exc)) from None
    return public_key


def seal(recipient: str, plaintext: bytes, context: bytes) -> dict[str, str]:
    ephemeral = X25519PrivateKey.generate()
    shared = ephemeral.exchange(X25519PublicKey.from_public_bytes(_unb64(recipient)))
    nonce = os.urandom(12)
    ciphertext = AESGCM(_derive(shared, context)).encrypt(nonce, plaintext, context)
    return {"ephemeral": raw_public(ephemeral), "nonce": _b64(nonce), "ciphertext": _b64(ciphertext)}


def sealed_size(plaintext_bytes: int) -> int:
    """Bytes of a sealed shard's ciphertext on the wire (base64 of the ciphertext and its 16-byte tag): known
    before sealing, so an agent can predict the upload before it decides to make it."""
    return 4 * -(-(plaintext_bytes + 16) // 3)


def open_sealed(key: X25519PrivateKey, sealed: dict[str, str], context: bytes) -> bytes:
    try:
        shared = key.exchange(X25519PublicKey.from_public_bytes(_unb64(sealed["ephemeral"])))
        return AESGCM(_derive(shared, context)).decrypt(
            _unb64(sealed["nonce"]), _unb64(sealed["ciphertext"]), context
        )
    except (KeyError, TypeError, ValueError, InvalidTag):
        raise OffloadError("the shard does not open for this executor, round and client") from None


def encode_shard(x: np.ndarray, y: np.ndarray) -> bytes:
    return encode(
        {"x": np.ascontiguousarray(x, dtype=np.float32), "y": np.ascontiguousarray(y, dtype=np.int64)}
    )


def decode_shard(body: bytes) -> tuple[np.ndarray, np.ndarray]:
    try:
        tensors, _ = decode(body)
        x, y = tensors["x"], tensors["y"]
    except (CodecError, KeyError):
        raise OffloadError("the shard is not a safetensors body of x and y") from None
    if len(x) != len(y) or len(y) == 0:
        raise OffloadError("the shard's x and y differ in length or are empty")
    return x.astype(np.float32), y.astype(np.int64)


def _derive(shared: bytes, context: bytes) -> bytes:
    return HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=_INFO + b"\n" + context).derive(shared)


def _b64(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).decode()


def _unb64(text: str) -> bytes:
    try:
        return base64.urlsafe_b64decode(text.encode("ascii"))
    except (binascii.Error, UnicodeEncodeError, AttributeError):
        raise ValueError("not base64") from None
