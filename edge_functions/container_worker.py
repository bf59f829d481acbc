"""The main process of a function container (``edge_functions.containers``), and the wire both ends speak.

A container is a trust boundary: what comes out of it is untrusted, so nothing crossing it is pickled.
Each message is one JSON document, framed by its length (4 bytes, big-endian) on a unix socket in a
directory the agent shares with the container; the agent reads it with ``fedge.jsonlimits`` (size and
depth limits), and a result that is bytes (``initial_model``'s safetensors body) travels as base64, for
the caller to decode with the codec. An error comes back as its type's name and text, and is raised
again on the agent's side only as one of the few types callers act on (``ERRORS``, ``ServerError``, an
``httpx`` transport error), else as a ``RuntimeError`` with the text.

Run inside the container as ``python -m fedge.edge_functions.container_worker SOCKET THREADS``: it
imports torch once, connects to the agent, then serves invocations until told to stop or until the
agent's end of the socket closes (an agent killed outright takes its containers down with it).
"""

from __future__ import annotations

import base64
import json
import os
import signal
import socket
import struct
import sys
import time
from typing import Any

import httpx

from fedge import jsonlimits
from fedge.edge_functions.app import AppError, AppFailed
from fedge.edge_functions.datafiles import DataError
from fedge.edge_functions.datasets import DatasetError
from fedge.transport import ServerError

MAX_FRAME = 256 * 2**20  # a model's body as base64 fits; a container cannot make the agent hold more
_LENGTH = struct.Struct(">I")
ERRORS: dict[str, type[Exception]] = {
    cls.__name__: cls for cls in (AppError, AppFailed, DataError, DatasetError, ValueError, KeyError)
}


class FrameError(ConnectionError):
    """The other end closed the socket, or sent what is not a frame of JSON within the limits."""


def send(sock: socket.socket, value: Any) -> None:
    """``value`` as one frame; a value that is not JSON (NaN included) raises ``ValueError`` before
    anything is sent."""
    body = json.dumps(value, allow_nan=False, separators=(",", ":")).encode()
    sock.sendall(_LENGTH.pack(len(body)) + body)


def receive(sock: socket.socket) -> Any:
    (length,) = _LENGTH.unpack(_read(sock, _LENGTH.size))
    if length > MAX_FRAME:
        raise FrameError(f"a frame of {length} bytes, over the limit of {MAX_FRAME}")
    try:
        return jsonlimits.loads(_read(sock, length), max_bytes=MAX_FRAME)
    except jsonlimits.JSONError as exc:
        raise FrameError(f"a frame that is not JSON: {exc}") from None


def _read(sock: socket.socket, size: int) -> bytes:
    chunks, left = [], size
    while left:
        chunk = sock.recv(min(left, 2**20))
        if not chunk:
            raise FrameError("the other end closed the socket")
        chunks.append(chunk)
        left -= len(chunk)
    return b"".join(chunks)


def encode_result(result: Any) -> dict:
    return {"bytes": base64.b64encode(result).decode()} if isinstance(result, bytes) else {"value": result}


def decode_result(encoded: dict) -> Any:
    if "bytes" in encoded:
        return base64.b64decode(encoded["bytes"], validate=True)
    return encoded["value"]


def encode_error(exc: Exception) -> dict:
    if isinstance(exc, ServerError):
        return {"type": "ServerError", "status": exc.status, "code": exc.code, "detail": exc.detail,
                "retry_after": exc.retry_after}  # fmt: skip
    return {"type": type(exc).__name__, "message": str(exc)}


def decode_error(encoded: dict) -> Exception:
    """The error a function raised, as a type the caller may act on: a server's refusal (and its code), a
    transport failure (retried), the app's or the data's fault; anything else as a ``RuntimeError``."""
    kind, message = str(encoded.get("type")), str(encoded.get("message", ""))
    if kind == "ServerError":
        retry_after = encoded.get("retry_after")
        return ServerError(
            int(encoded["status"]), str(encoded["code"]), str(encoded["detail"]),
            None if retry_after is None else float(retry_after),
        )  # fmt: skip
    transport = getattr(httpx, kind, None)
    if isinstance(transport, type) and issubclass(transport, httpx.TransportError):
        return transport(message)
    if kind in ERRORS:
        return ERRORS[kind](message)
    return RuntimeError(f"{kind}: {message}")


def main(path: str, threads: int) -> None:
    """Serve invocations on the agent's socket at ``path``. Signals go to the agent, which decides when
    its containers stop."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    import torch

    from fedge.edge_functions.functions import FUNCTIONS, Context
    from fedge.edge_functions.runtime import resolve

    torch.set_num_threads(threads)
    context = Context()
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.connect(path)
        send(sock, {"ready": True})
        while (request := _next(sock)) is not None:
            started = time.perf_counter()
            try:
                result = resolve(request["function"], FUNCTIONS)(request["event"], context)
                reply = {"ok": encode_result(result), "seconds": time.perf_counter() - started}
                send(sock, reply)
            except Exception as exc:
                send(sock, {"error": encode_error(exc)})
    # Everything owed went down the socket; torch's interpreter teardown would only delay the stop.
    os._exit(0)


def _next(sock: socket.socket) -> dict | None:
    """The next request; None when the agent says stop or is gone."""
    try:
        return receive(sock)
    except (FrameError, OSError):
        return None


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]))
