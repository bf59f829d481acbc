"""JSON request bodies (enrollment, skip notices, admin) parsed by ``fedge.jsonlimits``, not ``json.loads``.

FastAPI reads a JSON body with Starlette's ``Request.json``: a body nested a few thousand levels deep
ends in a ``RecursionError`` (answered by a generic 400), and one a few hundred deep reaches the route.
``BoundedJSONRoute`` hands FastAPI a request whose ``json`` is the bounded parser, as FastAPI's own
"custom Request and APIRoute class" recipe does; a body it refuses raises ``JSONError``, which FastAPI
already turns into a validation error, answered 422 ``invalid_request`` with the reason (server.errors).
"""

from __future__ import annotations

from collections.abc import Callable, Coroutine
from typing import Any

from fastapi import Request, Response
from fastapi.routing import APIRoute

from fedge.jsonlimits import loads

MAX_JSON_BODY = 1024 * 1024  # the largest JSON body a route takes (an enrollment) is under 20 KiB


class BoundedJSONRequest(Request):
    async def json(self) -> Any:
        if not hasattr(self, "_bounded_json"):
            self._bounded_json = loads(await self.body(), max_bytes=MAX_JSON_BODY)
        return self._bounded_json


class BoundedJSONRoute(APIRoute):
    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handler = super().get_route_handler()

        async def bounded(request: Request) -> Response:
            return await handler(BoundedJSONRequest(request.scope, request.receive))

        return bounded
