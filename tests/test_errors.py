"""Refusals carry a code; one table gives each its HTTP status, one function builds every error body."""

from __future__ import annotations

import json

import pytest
from fastapi.exceptions import RequestValidationError
from starlette.exceptions import HTTPException

from fedge.server.errors import STATUS, Rejected, describe, response


def test_a_refusal_without_a_status_in_the_table_cannot_be_raised() -> None:
    with pytest.raises(ValueError, match="no HTTP status"):
        Rejected("made_up", "nobody maps this")


def test_every_refusal_is_a_client_error() -> None:
    assert all(400 <= status < 500 for status in STATUS.values())


@pytest.mark.parametrize(
    ("exc", "expected"),
    [
        (Rejected("round_closed", "round 1 is closed"), (409, "round_closed", "round 1 is closed", None)),
        (HTTPException(405, "no", {"Allow": "GET"}), (405, "method_not_allowed", "no", {"Allow": "GET"})),
        (HTTPException(404, "gone"), (404, "not_found", "gone", None)),
        (HTTPException(418, "tea"), (418, "http_error", "tea", None)),
        (RequestValidationError([{"loc": ("body", "reason"), "msg": "too long"}]),
         (422, "invalid_request", "body.reason: too long", None)),
    ],
)  # fmt: skip
def test_every_kind_of_refusal_gets_the_same_body(exc: Exception, expected: tuple) -> None:
    assert describe(exc) == expected
    answer = response(exc)
    assert answer.status_code == expected[0]
    assert json.loads(bytes(answer.body)) == {"error": expected[1], "detail": expected[2]}
