"""Refusals with a stable code, and the one place that turns them into HTTP answers.

The round state machine, intake and the routes raise ``Rejected(code, detail)``: what went wrong, never how
HTTP says it. ``STATUS`` is the one table from code to HTTP status, and ``describe`` plus ``response`` the one
way an error body (``{"error", "detail"}``, design.md) is built, for refusals, unknown routes and malformed
requests alike, in the routes and in the certificate gate before them.
"""

from __future__ import annotations

from typing import Any

from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException

from fedge.wire import ErrorBody

STATUS: dict[str, int] = {
    # the request itself
    "missing_signature": 400, "bad_nonce": 400, "malformed_update": 400, "bad_metadata": 400,
    "bad_compression": 400, "bad_csr": 400, "invalid_id": 400,
    "update_too_large": 413, "invalid_request": 422,
    # who is calling
    "no_client_certificate": 401, "bad_client_certificate": 401, "certificate_revoked": 401,
    "certificate_expired": 401, "unknown_certificate": 401, "certificate_superseded": 401,
    "invalid_token": 401, "token_used": 401, "token_expired": 401,
    "wrong_federation": 403, "wrong_role": 403, "missing_grant": 403, "bad_grant": 403, "bad_signature": 403,
    "not_selected": 403, "not_asked": 403,
    # what is sent, against the model
    "tensor_mismatch": 422, "non_finite": 422, "norm_too_large": 422, "invalid_strategy": 422,
    "invalid_evaluation": 422,
    # the federation's state
    "round_not_open": 409, "round_closed": 409, "too_stale": 409, "duplicate_update": 409,
    "already_skipped": 409, "asynchronous_mode": 409, "already_started": 409, "already_revoked": 409,
    "client_active": 409, "duplicate_evaluation": 409, "evaluation_closed": 409, "wrong_model": 409,
    "unknown_client": 404,
    # how much, how often
    "rate_limited": 429,
}  # fmt: skip
# What OpenAPI documents for every route: any refusal may come in the shared error body.
RESPONSES: dict[int | str, dict[str, object]] = {
    s: {"model": ErrorBody} for s in sorted(set(STATUS.values()))
}
_HTTP_CODES = {404: "not_found", 405: "method_not_allowed"}


class Rejected(Exception):
    """A refusal the caller can act on: ``code`` is stable and machine-readable, ``detail`` says why."""

    def __init__(self, code: str, detail: str) -> None:
        if code not in STATUS:
            raise ValueError(f"refusal code {code!r} has no HTTP status in server.errors.STATUS")
        super().__init__(f"{code}: {detail}")
        self.code = code
        self.detail = detail

    @property
    def status(self) -> int:
        """The HTTP status ``STATUS`` gives this refusal's code."""
        return STATUS[self.code]


def describe(exc: Exception) -> tuple[int, str, str, dict[str, str] | None]:
    """Status, code, detail and headers for whatever stopped a request: a refusal, a route FastAPI does not
    know (or a method it does not take), or a request that does not match its route's schema."""
    if isinstance(exc, Rejected):
        return exc.status, exc.code, exc.detail, None
    if isinstance(exc, RequestValidationError):
        first = exc.errors()[0] if exc.errors() else {}
        return STATUS["invalid_request"], "invalid_request", invalid(first), None
    if isinstance(exc, HTTPException):
        return exc.status_code, _HTTP_CODES.get(exc.status_code, "http_error"), str(exc.detail), exc.headers
    raise TypeError(f"no error body for {type(exc).__name__}")


def invalid(error: dict[str, Any]) -> str:
    """Where a request breaks its schema and how; for a body that is not JSON (or is, past the bounds of
    ``fedge.jsonlimits``), the parser's reason rather than its byte offset."""
    if error.get("type") == "json_invalid":
        return f"body: {error.get('ctx', {}).get('error', 'not JSON')}"
    where = ".".join(str(p) for p in error.get("loc", ()))
    return f"{where}: {error.get('msg', 'invalid request')}"


def response(exc: Exception) -> JSONResponse:
    """The error body of ``describe(exc)``."""
    status, code, detail, headers = describe(exc)
    return JSONResponse(
        ErrorBody(error=code, detail=detail).model_dump(), status_code=status, headers=headers
    )
