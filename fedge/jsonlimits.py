"""JSON from the network, parsed within a size and a nesting limit: the one parser every untrusted JSON
text goes through (safetensors headers, update metadata, grants, request bodies, executor jobs).

``json.loads`` recurses once per level, so a few thousand ``[`` end in a ``RecursionError`` that nothing
upstream expects (a 500), and a long enough text holds any amount of memory. ``loads`` measures both
before it parses: the size from the length, the depth from one pass over the text with its strings
blanked out, in bounded chunks, so neither check can itself be made to recurse or to grow with the input.
Whatever is wrong, the caller gets ``JSONError``, a ``json.JSONDecodeError``, so code (and FastAPI) that
already handles malformed JSON handles an over-deep or over-long text the same way.
"""

from __future__ import annotations

import json
import re
from typing import Any

import numpy as np

MAX_DEPTH = 32  # nesting of arrays and objects together; no fedge message nests deeper than 4
_STRING = re.compile(rb'"[^"\\]*(?:\\.[^"\\]*)*"', re.DOTALL)
_STEPS = bytes.maketrans(b"[{]}", b"\x01\x01\xff\xff")  # opening +1, closing -1 as int8
_OTHERS = bytes(set(range(256)) - set(b"[{]}"))
_CHUNK = 1 << 20


class JSONError(json.JSONDecodeError):
    """The text is not JSON, or it is longer or nests deeper than its reader allows."""

    def __init__(self, msg: str, doc: str = "", pos: int = 0) -> None:
        super().__init__(msg, doc, pos)

    def __str__(self) -> str:
        return self.msg


def loads(text: bytes | str, *, max_bytes: int) -> Any:
    """The value of a UTF-8 JSON ``text`` of at most ``max_bytes`` bytes nesting at most ``MAX_DEPTH``
    levels; ``JSONError`` otherwise."""
    if isinstance(text, str):
        try:
            raw = text.encode()
        except UnicodeEncodeError:
            raise JSONError("JSON text is not valid Unicode") from None
    else:
        raw = text
    if len(raw) > max_bytes:
        raise JSONError(f"JSON text of {len(raw)} bytes is over the limit of {max_bytes}")
    try:
        decoded = raw.decode() if isinstance(text, bytes) else text
    except UnicodeDecodeError:
        raise JSONError("JSON text is not UTF-8") from None
    if _depth(raw) > MAX_DEPTH:
        raise JSONError(f"JSON nests deeper than {MAX_DEPTH} levels")
    try:
        return json.loads(decoded, parse_constant=_refuse_constant)
    except json.JSONDecodeError as exc:
        raise JSONError(exc.msg, exc.doc, exc.pos) from None
    except ValueError:  # an integer of more digits than sys.get_int_max_str_digits()
        raise JSONError("JSON text holds a number of too many digits") from None


def _refuse_constant(name: str) -> float:
    """``NaN`` and ``Infinity`` are Python's extension, not JSON (RFC 8259): no fedge message holds them."""
    raise JSONError(f"{name} is not a JSON value")


def _depth(raw: bytes) -> int:
    """How deep ``raw`` nests arrays and objects, not counting brackets inside strings. Only meaningful
    for well-formed JSON; for anything else it is some number that ``json.loads`` then refuses anyway."""
    steps = _STRING.sub(b"", raw).translate(_STEPS, _OTHERS)
    level, deepest = 0, 0
    for start in range(0, len(steps), _CHUNK):
        chunk = np.frombuffer(steps, np.int8, min(_CHUNK, len(steps) - start), start)
        levels = np.cumsum(chunk, dtype=np.int64)
        deepest = max(deepest, level + int(levels.max()))
        level += int(levels[-1])
    return deepest
