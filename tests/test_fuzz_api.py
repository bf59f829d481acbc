"""Schemathesis against the running service's own OpenAPI document, with valid certificates (a client's,
and an admin's for the admin routes): whatever it generates, operation by operation and then as stateful
sequences that feed one answer into the next request (the open round's number into an update or a skip,
a client id into a revocation), the service answers with a 2xx/3xx or a 4xx in the error shape, never a
5xx, and the global model is the same bytes afterwards."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import schemathesis
from conftest import toy_server_args
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fedge.codec import sha256
from fedge.security import pki
from fedge.security.tls import client_context
from fedge.server.launcher import ServerProcess, launch

QUICK = settings(deadline=None, suppress_health_check=list(HealthCheck), database=None)


class Target:
    """The federation under fuzzing, and who calls which route."""

    def __init__(self, server: ServerProcess, client: pki.Credentials, admin: pki.Credentials) -> None:
        self.server, self.client, self.admin = server, client, admin
        self.model_at_start = self.model_sha256()

    def call_kwargs(self, path: str) -> dict[str, Any]:
        creds = self.admin if path.startswith("/v1/admin") else self.client
        return {
            "base_url": self.server.url,
            "cert": (str(creds.cert), str(creds.key)),
            "verify": str(creds.ca),
            "timeout": 30,
        }

    def model_sha256(self) -> str:
        with httpx.Client(base_url=self.server.url, verify=client_context(self.admin), timeout=30) as http:
            response = http.get("/v1/model")
        response.raise_for_status()
        return sha256(response.content)


@pytest.fixture(scope="module")
def fuzz_target(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Target]:
    """A federation of its own, so nothing the fuzzer manages to do can touch other tests' PKI."""
    work = tmp_path_factory.mktemp("fuzz")
    pki.init_ca(work / "pki", "fuzz")
    pki.issue(work / "pki", pki.Role.SERVER, "server", hosts=("127.0.0.1",))
    client = pki.issue(work / "pki", pki.Role.CLIENT, "alice")
    admin = pki.issue(work / "pki", pki.Role.ADMIN, "ops")
    server = launch(
        toy_server_args(work / "pki", work / "initial.safetensors"), work / "server", work / "server.log"
    )
    yield Target(server, client, admin)
    server.stop()


@pytest.fixture(scope="module")
def api_schema(fuzz_target: Target) -> schemathesis.BaseSchema:
    with httpx.Client(base_url=fuzz_target.server.url, verify=client_context(fuzz_target.client)) as http:
        document = http.get("/openapi.json").json()
    return schemathesis.openapi.from_dict(document)


def check_answer(label: str, response: Any) -> None:
    assert response.status_code < 500, f"{label}: {response.text}"
    if response.status_code >= 400:
        assert set(response.json()) == {"error", "detail"}, label


def test_no_request_a_client_or_admin_can_make_gets_a_server_error(
    api_schema: schemathesis.BaseSchema, fuzz_target: Target
) -> None:
    operations = [result.ok() for result in api_schema.get_all_operations()]
    assert len(operations) >= 10
    for operation in operations:
        fuzz(operation, fuzz_target)


def fuzz(operation: schemathesis.APIOperation, target: Target) -> None:
    """Requests that follow the schema, and requests that break it (wrong types, missing fields)."""
    modes = (schemathesis.GenerationMode.POSITIVE, schemathesis.GenerationMode.NEGATIVE)

    @given(case=st.one_of(*(operation.as_strategy(mode) for mode in modes)))
    @settings(QUICK, max_examples=30)
    def no_server_error(case: schemathesis.Case) -> None:
        check_answer(operation.label, case.call(**target.call_kwargs(operation.path)))

    no_server_error()


def test_no_sequence_of_requests_gets_a_server_error(
    api_schema: schemathesis.BaseSchema, fuzz_target: Target
) -> None:
    machine = api_schema.as_state_machine()
    labels: set[str] = set()

    class Sequences(machine):  # type: ignore[misc, valid-type]
        def get_call_kwargs(self, case: schemathesis.Case) -> dict[str, Any]:
            return fuzz_target.call_kwargs(case.operation.path)

        def validate_response(self, response: Any, case: schemathesis.Case, *_: Any, **__: Any) -> None:
            labels.add(case.operation.label)
            check_answer(case.operation.label, response)

    Sequences.run(settings=settings(QUICK, max_examples=30, stateful_step_count=8))
    # the links schemathesis infers carry the open round into the routes that take one
    assert {"GET /v1/rounds/current", "POST /v1/rounds/{round_}/updates"} <= labels


def test_the_fuzzed_federation_is_healthy_and_its_model_unchanged(fuzz_target: Target) -> None:
    assert fuzz_target.server.process.poll() is None
    assert fuzz_target.model_sha256() == fuzz_target.model_at_start
    assert not Path(fuzz_target.server.log).read_text().count("Traceback")
