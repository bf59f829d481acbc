"""Tensors on the wire and on disk: safetensors only, never pickle.

A body is a safetensors file; its ``__metadata__`` (string to string) carries what the receiver must know
about the tensors, such as the number of examples an update was trained on. Because that metadata is inside
the body, whatever hashes or signs the body covers it too.

Global models are named by the sha256 of their body, so the same tensors must always give the same bytes.
The safetensors library writes metadata in hash-map order, which changes from call to call; ``encode``
therefore writes the (simple, documented) format itself, canonically, and ``decode`` reads it with the
library.
"""

from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path

import numpy as np
from safetensors import SafetensorError
from safetensors.numpy import load

from fedge.jsonlimits import JSONError, loads

Tensors = dict[str, np.ndarray]

_MAX_HEADER = 16 * 1024 * 1024
_DTYPES = {
    "float64": "F64", "float32": "F32", "float16": "F16", "int64": "I64", "int32": "I32", "int16": "I16",
    "int8": "I8", "uint64": "U64", "uint32": "U32", "uint16": "U16", "uint8": "U8", "bool": "BOOL",
}  # fmt: skip
_CODES = frozenset(_DTYPES.values())
_LITTLE = {code: np.dtype(name).newbyteorder("<") for name, code in _DTYPES.items()}


class CodecError(ValueError):
    """The bytes are not a well-formed safetensors body."""


def encode(tensors: Tensors, metadata: dict[str, str] | None = None) -> bytes:
    """Canonical safetensors: sorted metadata, tensors by descending item size then name (so every tensor
    stays aligned, as the library does), little-endian data, header padded with spaces to 8 bytes."""
    return b"".join(_pieces(tensors, metadata))


def encode_hashed(tensors: Tensors, metadata: dict[str, str] | None = None) -> tuple[bytes, str]:
    """``encode`` and the body's sha256, hashed piece by piece from the tensors as the body is put
    together, so a body that is to be signed needs no second pass over it (``FedgeClient.post_update``)."""
    pieces = _pieces(tensors, metadata)
    digest = hashlib.sha256()
    for piece in pieces:
        digest.update(piece)
    return b"".join(pieces), digest.hexdigest()


def _pieces(tensors: Tensors, metadata: dict[str, str] | None) -> list[bytes | memoryview]:
    """The canonical body as its length prefix, header and the tensors' own memory (no copy yet)."""
    header: dict[str, object] = {"__metadata__": dict(sorted(metadata.items()))} if metadata else {}
    order = sorted(tensors, key=lambda name: (-tensors[name].dtype.itemsize, name))
    chunks: list[bytes | memoryview] = []
    offset = 0
    for name in order:
        t = tensors[name]
        if t.dtype.name not in _DTYPES:
            raise CodecError(f"tensor {name!r} has unsupported dtype {t.dtype}")
        data = np.ascontiguousarray(t, dtype=t.dtype.newbyteorder("<"))
        header[name] = {
            "dtype": _DTYPES[t.dtype.name],
            "shape": list(t.shape),
            "data_offsets": [offset, offset + data.nbytes],
        }
        chunks.append(memoryview(data.reshape(-1)).cast("B"))
        offset += data.nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    return [len(raw).to_bytes(8, "little"), raw, *chunks]


def decode(body: bytes) -> tuple[Tensors, dict[str, str]]:
    """Parse a body, checking the header ourselves so that garbage gives a clear error, not a crash."""
    header = _header(body)
    metadata = _metadata(header)
    for name, entry in header.items():
        dtype = entry.get("dtype") if isinstance(entry, dict) else None
        if name != "__metadata__" and isinstance(dtype, str) and dtype not in _CODES:
            # bfloat16 and the float8s have no numpy dtype: the library would fail with a KeyError
            raise CodecError(f"tensor {name[:64]!r} has dtype {dtype[:16]!r}, which fedge does not take")
    try:
        tensors = load(body)
    except (SafetensorError, ValueError, TypeError) as exc:
        raise CodecError(f"malformed safetensors body: {exc}") from None
    return tensors, metadata


def metadata_of(body: bytes) -> dict[str, str]:
    """The ``__metadata__`` of a body, reading only its header."""
    return _metadata(_header(body))


def decode_view(body: bytes) -> tuple[Tensors, dict[str, str]]:
    """``decode`` without copying: the tensors are read-only views of ``body``. For a server that only
    reads an update (checks it, folds it, writes the body as sent), so 4 MB arrive without a 4 MB copy and
    the page faults of a fresh allocation. Every entry is checked as strictly as the library checks it:
    known dtype, whole shape, offsets that tile the data region exactly, in order, without gap or overlap."""
    header = _header(body)
    metadata = _metadata(header)
    if not isinstance(header.get("__metadata__", {}), dict | None):
        raise CodecError("malformed safetensors body: __metadata__ is not an object")
    start = 8 + int.from_bytes(body[:8], "little")
    entries = sorted(
        ((name, _entry(name, entry)) for name, entry in header.items() if name != "__metadata__"),
        key=lambda item: item[1][2],
    )
    tensors: Tensors = {}
    end = 0
    for name, (dtype, shape, begin, stop) in entries:
        count = math.prod(shape)
        if begin != end or stop - begin != dtype.itemsize * count or start + stop > len(body):
            raise CodecError(f"malformed safetensors body: tensor {name[:64]!r} has wrong data offsets")
        tensors[name] = np.frombuffer(body, dtype, count, start + begin).reshape(shape)
        end = stop
    if start + end != len(body):
        raise CodecError("malformed safetensors body: the data does not fill the body exactly")
    return tensors, metadata


def _entry(name: str, entry: object) -> tuple[np.dtype, list[int], int, int]:
    """A header entry as (dtype, shape, begin, end), or ``CodecError`` saying what is wrong with it."""
    if not isinstance(entry, dict) or set(entry) != {"dtype", "shape", "data_offsets"}:
        raise CodecError(f"malformed safetensors body: entry {name[:64]!r} is not a tensor")
    dtype, shape, offsets = entry["dtype"], entry["shape"], entry["data_offsets"]
    if not isinstance(dtype, str) or dtype not in _CODES:
        raise CodecError(f"tensor {name[:64]!r} has dtype {str(dtype)[:16]!r}, which fedge does not take")
    lists = isinstance(shape, list) and isinstance(offsets, list) and len(offsets) == 2
    if not (lists and all(type(v) is int and v >= 0 for v in (*shape, *offsets))):
        raise CodecError(f"malformed safetensors body: tensor {name[:64]!r} has a bad shape or offsets")
    return _LITTLE[dtype], shape, offsets[0], offsets[1]


def _header(body: bytes) -> dict[str, object]:
    if len(body) < 8:
        raise CodecError("body is too short to be safetensors")
    size = int.from_bytes(body[:8], "little")
    if size > min(_MAX_HEADER, len(body) - 8):
        raise CodecError("safetensors header length is out of range")
    try:
        header = loads(body[8 : 8 + size], max_bytes=_MAX_HEADER)
    except JSONError as exc:
        raise CodecError(f"safetensors header is not JSON: {exc}") from None
    if not isinstance(header, dict):
        raise CodecError("safetensors header is not an object")
    return header


def _metadata(header: dict[str, object]) -> dict[str, str]:
    metadata = header.get("__metadata__") or {}
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise CodecError("safetensors metadata must map strings to strings")
    return metadata


def mapped(path: Path) -> Tensors:
    """The tensors of a safetensors file as read-only views of a memory map: nothing is read until used.

    For files this process wrote after ``decode`` accepted them (stored updates), so the header is trusted.
    """
    raw = np.memmap(path, dtype=np.uint8, mode="r")
    size = int.from_bytes(raw[:8].tobytes(), "little")
    header = loads(raw[8 : 8 + size].tobytes(), max_bytes=_MAX_HEADER)
    tensors: Tensors = {}
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        start, stop = (8 + size + offset for offset in entry["data_offsets"])
        tensors[name] = raw[start:stop].view(_LITTLE[entry["dtype"]]).reshape(entry["shape"])
    return tensors


def sha256(body: bytes) -> str:
    return hashlib.sha256(body).hexdigest()


def signature_of(tensors: Tensors) -> dict[str, tuple[str, list[int]]]:
    """Name -> (dtype, shape): what an update must match to be folded into the global model."""
    return {name: (str(t.dtype), list(t.shape)) for name, t in tensors.items()}
