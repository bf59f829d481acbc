"""Update compression, chosen by the client and undone by the server before anything else sees the update.

- ``float16``: every floating tensor halved in size; the server widens it back.
- ``int8``: the change from the model the client trained from, quantized per tensor to 8 bits with a
  symmetric scale (max |change| / 127), a quarter of the size; the server adds the dequantized change back
  to that model. Quantizing the change, not the weights, keeps the error proportional to what training
  moved (at most half a step of each tensor's scale).

The body says what was done (``fedge.wire.Compression`` in its metadata, and for int8 the scales), so the
metadata a signature covers also covers how to decode it.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from fedge.codec import Tensors
from fedge.wire import COMPRESSIONS, Compression, CompressionError

KINDS = COMPRESSIONS


def compress(trained: Tensors, base: Tensors, kind: str) -> tuple[Tensors, Compression]:
    """The tensors to send and how to restore them (``UpdateMeta.compression``)."""
    if kind == "none":
        return trained, Compression()
    if kind == "float16":
        return {n: t.astype(np.float16) if _floating(t) else t for n, t in trained.items()}, Compression(kind)
    if kind == "int8":
        quantized, scales = {}, {}
        for name, t in trained.items():
            if not _floating(t):
                quantized[name] = t
                continue
            change = t.astype(np.float32) - base[name]
            scale = float(np.abs(change).max()) / 127 or 1.0
            quantized[name] = np.clip(np.rint(change / scale), -127, 127).astype(np.int8)
            scales[name] = scale
        return quantized, Compression(kind, scales)
    raise CompressionError(f"unknown compression {kind!r}: choose from {', '.join(KINDS)}")


def decompress(tensors: Tensors, metadata: Mapping[str, str], base: Tensors) -> Tensors:
    """``restore`` from a body's raw metadata."""
    return restore(tensors, Compression.from_metadata(metadata), base)


def restore(tensors: Tensors, how: Compression, base: Tensors) -> Tensors:
    """Undo ``compress``: tensors in the dtypes of ``base`` (the model the update was trained from)."""
    if how.kind == "none":
        return tensors
    if how.kind == "float16":
        return {n: t.astype(base[n].dtype) if n in base else t for n, t in tensors.items()}
    scales = how.int8_scales
    restored = {}
    for name, t in tensors.items():
        if name not in scales or name not in base:
            restored[name] = t
            continue
        if t.dtype != np.int8 or t.shape != base[name].shape or not np.isfinite(scales[name]):
            raise CompressionError(f"tensor {name!r} is not an int8 change of the model's shape")
        restored[name] = (base[name] + t.astype(np.float32) * np.float32(scales[name])).astype(
            base[name].dtype
        )
    return restored


def _floating(t: np.ndarray) -> bool:
    return np.issubdtype(t.dtype, np.floating)
