"""Update compression, chosen by the client and undone by the server before anything else sees the update.

- ``float16``: every floating tensor halved in size; the server widens it back.
- ``int8``: the change from the model the client trained from, quantized per tensor to 8 bits with a
  symmetric scale (max |change| / 127), a quarter of the size; the server adds the dequantized change back
  to that model. Quantizing the change, not the weights, keeps the error proportional to what training
  moved (at most half a step of each tensor's scale).

The body says what was done (``compression`` in its metadata, and for int8 the scales as JSON), so the
metadata a signature covers also covers how to decode it.
"""

from __future__ import annotations

import json

import numpy as np

from fedge.codec import Tensors

KINDS = ("none", "float16", "int8")
COMPRESSION = "compression"
INT8_SCALES = "int8_scales"


class CompressionError(ValueError):
    """The body names an unknown compression, or its scales do not fit its tensors."""


def compress(trained: Tensors, base: Tensors, kind: str) -> tuple[Tensors, dict[str, str]]:
    """The tensors to send and the metadata that says how to restore them."""
    if kind == "none":
        return trained, {}
    if kind == "float16":
        return {n: t.astype(np.float16) if _floating(t) else t for n, t in trained.items()}, {
            COMPRESSION: kind
        }
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
        return quantized, {COMPRESSION: kind, INT8_SCALES: json.dumps(scales, sort_keys=True)}
    raise CompressionError(f"unknown compression {kind!r}: choose from {', '.join(KINDS)}")


def decompress(tensors: Tensors, metadata: dict[str, str], base: Tensors) -> Tensors:
    """Undo ``compress``: tensors in the dtypes of ``base`` (the model the update was trained from)."""
    kind = metadata.get(COMPRESSION, "none")
    if kind == "none":
        return tensors
    if kind == "float16":
        return {n: t.astype(base[n].dtype) if n in base else t for n, t in tensors.items()}
    if kind != "int8":
        raise CompressionError(f"unknown compression {kind!r}: choose from {', '.join(KINDS)}")
    try:
        scales = {str(k): float(v) for k, v in json.loads(metadata[INT8_SCALES]).items()}
    except (KeyError, ValueError, TypeError, AttributeError):
        raise CompressionError(f"int8 updates need {INT8_SCALES!r}: a JSON object of tensor scales") from None
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
