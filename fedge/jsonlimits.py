"""JSON from the network, parsed within a size and a nesting limit: the one parser every untrusted JSON
text goes through (safetensors headers, update metadata, grants, request bodies, executor jobs).

``json.loads`` recurses once per level, so a few thousand ``[`` end in a ``RecursionError`` that nothing
upstream expects (a 500), a few hundred reach code that recurses over the value itself, and a long enough
text holds any amount of memory. ``loads`` refuses a text over its caller's size before reading it, turns
the parser's own ``RecursionError`` into a refusal, and walks what it parsed (without recursing) to refuse
anything nested deeper than ``MAX_DEPTH``. The walk costs no more than the parse: scanning the text for
brackets outside strings first would need either a regular expression (quadratic on a text of escaped
quotes) or a tokenizer of our own. Whatever is wrong, the caller gets ``JSONError``, a
``json.JSONDecodeError``, so code (and FastAPI) that already handles malformed JSON handles an over-deep or
over-long text the same way.
"""

from __future__ import annotations

import json
from typing import Any

MAX_DEPTH = 32  # nesting of arrays and objects together; no fedge message nests deeper than 4
_TOO_DEEP = f"JSON nests deeper than {MAX_DEPTH} levels"


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
    try:
        value = json.loads(decoded, parse_constant=_refuse_constant)
    except json.JSONDecodeError as exc:
        raise JSONError(exc.msg, exc.doc, exc.pos) from None
    except RecursionError:
        raise JSONError(_TOO_DEEP) from None
    except ValueError:  # an integer of more digits than sys.get_int_max_str_digits()
        raise JSONError("JSON text holds a number of too many digits") from None
    if _deeper_than(value, MAX_DEPTH):
        raise JSONError(_TOO_DEEP)
    return value


def _refuse_constant(name: str) -> float:
    """``NaN`` and ``Infinity`` are Python's extension, not JSON (RFC 8259): no fedge message holds them."""
    raise JSONError(f"{name} is not a JSON value")


def _deeper_than(value: Any, limit: int) -> bool:
    """Whether ``value`` nests arrays and objects more than ``limit`` levels, walked with a stack of its
    own so that the check cannot itself run out of recursion."""
    stack = [(value, 1)] if isinstance(value, list | dict) else []
    while stack:
        item, level = stack.pop()
        children = item.values() if isinstance(item, dict) else item
        if level > limit:
            return True
        stack.extend((child, level + 1) for child in children if isinstance(child, list | dict))
    return False
