"""Tensors on the wire and on disk: safetensors only, never pickle.

A body is a safetensors file; its ``__metadata__`` (string to string) carries what the receiver must know
about the tensors, such as the number of examples an update was trained on. Because that metadata is inside
the body, whatever hashes or signs the body covers it too.
"""

from __future__ import annotations

import hashlib
import json

import numpy as np
from safetensors import SafetensorError
from safetensors.numpy import load, save

Tensors = dict[str, np.ndarray]

_MAX_HEADER = 16 * 1024 * 1024


class CodecError(ValueError):
    """The bytes are not a well-formed safetensors body."""


def encode(tensors: Tensors, metadata: dict[str, str] | None = None) -> bytes:
    return save({name: np.ascontiguousarray(t) for name, t in tensors.items()}, metadata=metadata)


def decode(body: bytes) -> tuple[Tensors, dict[str, str]]:
    """Parse a body, checking the header ourselves so that garbage gives a clear error, not a crash."""
    if len(body) < 8:
        raise CodecError("body is too short to be safetensors")
    size = int.from_bytes(body[:8], "little")
    if size > min(_MAX_HEADER, len(body) - 8):
        raise CodecError("safetensors header length is out of range")
    try:
        header = json.loads(body[8 : 8 + size])
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise CodecError("safetensors header is not JSON") from None
    if not isinstance(header, dict):
        raise CodecError("safetensors header is not an object")
    metadata = header.get("__metadata__") or {}
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise CodecError("safetensors metadata must map strings to strings")
    try:
        tensors = load(body)
    except (SafetensorError, ValueError, TypeError) as exc:
        raise CodecError(f"malformed safetensors body: {exc}") from None
    return tensors, metadata


def sha256(body: bytes) -> str:
    return hashlib.sha256(body).hexdigest()


def signature_of(tensors: Tensors) -> dict[str, tuple[str, list[int]]]:
    """Name -> (dtype, shape): what an update must match to be folded into the global model."""
    return {name: (str(t.dtype), list(t.shape)) for name, t in tensors.items()}
