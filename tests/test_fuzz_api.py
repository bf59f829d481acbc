"""Schemathesis against the running service's own OpenAPI document, as a client with a valid certificate:
whatever it generates, the service answers with a 2xx/3xx or a 4xx in the error shape, never a 5xx."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import schemathesis
from conftest import toy_server_args
from hypothesis import HealthCheck, given, settings

from fedge.security import pki
from fedge.security.tls import client_context
from fedge.server.launcher import ServerProcess, launch


@pytest.fixture(scope="module")
def fuzz_target(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[ServerProcess, pki.Credentials]]:
    """A federation of its own, so nothing the fuzzer manages to do can touch other tests' PKI."""
    work = tmp_path_factory.mktemp("fuzz")
    pki.init_ca(work / "pki", "fuzz")
    pki.issue(work / "pki", pki.Role.SERVER, "server", hosts=("127.0.0.1",))
    creds = pki.issue(work / "pki", pki.Role.CLIENT, "alice")
    server = launch(
        toy_server_args(work / "pki", work / "initial.safetensors"), work / "server", work / "server.log"
    )
    yield server, creds
    server.stop()


@pytest.fixture(scope="module")
def api_schema(fuzz_target: tuple[ServerProcess, pki.Credentials]) -> schemathesis.BaseSchema:
    server, creds = fuzz_target
    with httpx.Client(base_url=server.url, verify=client_context(creds)) as http:
        document = http.get("/openapi.json").json()
    return schemathesis.openapi.from_dict(document)


def test_no_request_a_client_can_make_gets_a_server_error(
    api_schema: schemathesis.BaseSchema, fuzz_target: tuple[ServerProcess, pki.Credentials]
) -> None:
    server, creds = fuzz_target
    operations = [result.ok() for result in api_schema.get_all_operations()]
    assert len(operations) >= 10
    for operation in operations:
        fuzz(operation, server.url, creds)


def fuzz(operation: schemathesis.APIOperation, url: str, creds: pki.Credentials) -> None:
    @given(case=operation.as_strategy())
    @settings(max_examples=25, deadline=None, suppress_health_check=list(HealthCheck), database=None)
    def no_server_error(case: schemathesis.Case) -> None:
        response = case.call(
            base_url=url, cert=(str(creds.cert), str(creds.key)), verify=str(creds.ca), timeout=30
        )
        assert response.status_code < 500, f"{operation.label}: {response.text}"
        if response.status_code >= 400:
            assert set(response.json()) == {"error", "detail"}, operation.label

    no_server_error()


def test_the_fuzzed_federation_is_still_healthy(fuzz_target: tuple[ServerProcess, pki.Credentials]) -> None:
    server, _ = fuzz_target
    assert server.process.poll() is None
    assert not Path(server.log).read_text().count("Traceback")
