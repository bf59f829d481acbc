"""``train`` and ``evaluate`` as an HTTP function: a small ASGI app for Knative or OpenFaaS of-watchdog.

``POST /train`` (or ``/evaluate``) with the event as JSON answers the function's result as JSON, with
``X-Fedge-Cold`` and ``X-Fedge-Seconds`` headers. Errors are ``{"error": code, "detail": text}``. Run it
with ``uvicorn fedge.edge_functions.adapters.http:app --port 8080`` (Knative's ``$PORT``; of-watchdog's
``upstream_url`` points at it). Plain ASGI, so a function image needs uvicorn but not FastAPI.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable, Callable
from typing import Any

from pydantic import ValidationError

from fedge.edge_functions.adapters.instance import Instance, UnknownFunction
from fedge.edge_functions.app import AppError, AppFailed
from fedge.jsonlimits import JSONError, loads
from fedge.transport import ServerError

Receive = Callable[[], Awaitable[dict[str, Any]]]
Send = Callable[[dict[str, Any]], Awaitable[None]]
_MAX_EVENT = 1024 * 1024
instance = Instance()


async def app(scope: dict[str, Any], receive: Receive, send: Send) -> None:
    if scope["type"] == "lifespan":
        while (await receive())["type"] == "lifespan.startup":
            await send({"type": "lifespan.startup.complete"})
        await send({"type": "lifespan.shutdown.complete"})
        return
    path, method = scope["path"], scope["method"]
    if path == "/healthz" and method == "GET":
        await _respond(send, 200, {"status": "ok"})
        return
    if method != "POST":
        await _respond(send, 405, _error("method_not_allowed", "POST /<function> with a JSON event"))
        return
    body = await _read(receive)
    if body is None:
        await _respond(send, 413, _error("event_too_large", f"events are at most {_MAX_EVENT} bytes"))
        return
    status, payload, headers = await asyncio.to_thread(_invoke, path.strip("/"), body)
    await _respond(send, status, payload, headers)


def _invoke(function: str, body: bytes) -> tuple[int, Any, dict[str, str]]:
    try:
        event = loads(body, max_bytes=_MAX_EVENT)
        invocation = instance.invoke(function, event)
    except UnknownFunction as exc:
        return 404, _error("unknown_function", str(exc)), {}
    except JSONError as exc:
        return 400, _error("bad_event", f"the event is not JSON: {exc}"), {}
    except ValidationError as exc:
        first = exc.errors()[0]
        return 400, _error("bad_event", f"{'.'.join(map(str, first['loc']))}: {first['msg']}"), {}
    except ServerError as exc:
        return 502, _error(exc.code, exc.detail), {}
    except _unknown_task() as exc:
        return 400, _error("unknown_task", str(exc)), {}
    except AppError as exc:
        return 400, _error("bad_app", str(exc)), {}
    except AppFailed as exc:  # the round failed in the app: its one line, and nothing was sent
        return 422, _error("app_failed", str(exc)), {}
    headers = {"x-fedge-cold": str(invocation.cold).lower(), "x-fedge-seconds": f"{invocation.seconds:.6f}"}
    return 200, invocation.result, headers


def _unknown_task() -> type[Exception]:
    """The functions' refusal of a task they do not know. Python evaluates an ``except`` clause only when an
    exception reaches it, so this imports the task registry (and torch) only once a function has run, and
    an instance's cold start still measures the whole import."""
    from fedge.edge_functions.tasks import UnknownTask

    return UnknownTask


def _error(code: str, detail: str) -> dict[str, str]:
    return {"error": code, "detail": detail}


async def _read(receive: Receive, limit: int = _MAX_EVENT) -> bytes | None:
    chunks, size = [], 0
    while True:
        message = await receive()
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > limit:
            return None
        chunks.append(chunk)
        if not message.get("more_body"):
            return b"".join(chunks)


async def _respond(send: Send, status: int, payload: Any, headers: dict[str, str] | None = None) -> None:
    body = json.dumps(payload).encode()
    raw = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    raw += [(k.encode(), v.encode()) for k, v in (headers or {}).items()]
    await send({"type": "http.response.start", "status": status, "headers": raw})
    await send({"type": "http.response.body", "body": body})
