"""Hostile input against a running server: JSON nested thousands of levels deep (or hundreds, which
``json.loads`` would still take) in a safetensors header, in int8 scales, in a grant or in a request body,
and round numbers spelt another way, are all refused with a 4xx and its code; nothing changes; and TLS 1.2
is offered with forward-secret AEAD suites only."""

from __future__ import annotations

import base64
import json
import ssl
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest
from conftest import CLIENTS, agreed_suite, federation_pki, toy_model, toy_server_args, update_body
from cryptography.hazmat.primitives.asymmetric import ec
from test_attacks import raw_client, refusal, running, state_of
from test_service import open_round

from fedge.client.enrollment import make_csr
from fedge.codec import encode
from fedge.security import pki, signing
from fedge.security.tls import client_context
from fedge.server.launcher import ServerProcess, launch
from fedge.transport import FedgeClient

DEEP = 20_000  # far past Python's recursion limit (a RecursionError before), and under the body cap
SHALLOW_ENOUGH_FOR_JSON_LOADS = 500  # under it: json.loads takes it, the bounded parser does not


@pytest.fixture(scope="module")
def limits_pki(tmp_path_factory: pytest.TempPathFactory) -> Path:
    directory = federation_pki(tmp_path_factory.mktemp("limits-pki"), "test", CLIENTS)
    pki.issue(directory, pki.Role.EXECUTOR, "gpu")
    return directory


@pytest.fixture(scope="module")
def target(tmp_path_factory: pytest.TempPathFactory, limits_pki: Path) -> Iterator[ServerProcess]:
    work = tmp_path_factory.mktemp("limits")
    args = toy_server_args(limits_pki, work / "initial.safetensors")
    server = running(launch(args, work / "server", work / "server.log"), limits_pki)
    yield server
    server.stop()


def nested(levels: int) -> str:
    return "[" * levels + "]" * levels


def framed_header(header: str) -> bytes:
    raw = header.encode() + b" " * (-len(header) % 8)
    return len(raw).to_bytes(8, "little") + raw + bytes(64)


def int8_body(scales: str) -> bytes:
    return encode(toy_model(1.0), {"num_examples": "10", "compression": "int8", "int8_scales": scales})


Build = Callable[[FedgeClient, FedgeClient, int], tuple[str, bytes, dict[str, str]]]


def by_alice(body: bytes) -> Build:
    return lambda alice, _gpu, r: (f"/v1/rounds/{r}/updates", body, alice.sign_update(r, body))


def grant_of(payload: str) -> Build:
    good = update_body(1.0)

    def build(_alice: FedgeClient, gpu: FedgeClient, r: int) -> tuple[str, bytes, dict[str, str]]:
        grant = base64.urlsafe_b64encode(payload.encode()).decode()
        headers = {**gpu.sign_update(r, good, client="alice"), signing.GRANT_HEADER: grant}
        return f"/v1/rounds/{r}/updates", good, headers

    return build


def round_spelt(spelling: str, route: str = "updates") -> Build:
    good = update_body(1.0)
    body = good if route == "updates" else json.dumps({"reason": "busy"}).encode()
    return lambda alice, _gpu, r: (f"/v1/rounds/{spelling}/{route}", body, alice.sign_update(r, good))


BF16 = {"dtype": "BF16", "shape": [32], "data_offsets": [0, 64]}  # the 64 bytes framed_header appends
HOSTILE: dict[str, tuple[Build, int, str]] = {
    "safetensors header nested 20000 deep": (by_alice(framed_header(nested(DEEP))), 400, "malformed_update"),
    "safetensors header nested 500 deep": (
        by_alice(framed_header(nested(SHALLOW_ENOUGH_FOR_JSON_LOADS))), 400, "malformed_update"
    ),
    "metadata nested 20000 deep": (
        by_alice(framed_header('{"__metadata__":' + nested(DEEP) + "}")), 400, "malformed_update"
    ),
    "a bfloat16 tensor, which numpy cannot hold": (
        by_alice(framed_header(json.dumps({"__metadata__": {"num_examples": "10"}, "layer.bias": BF16}))),
        400, "malformed_update",
    ),
    "int8 scales nested 20000 deep": (
        by_alice(int8_body('{"a":' + nested(DEEP) + "}")), 400, "bad_compression"
    ),
    "int8 scales nested 500 deep": (
        by_alice(int8_body(nested(SHALLOW_ENOUGH_FOR_JSON_LOADS))), 400, "bad_compression"
    ),
    "int8 scale past the float range": (
        by_alice(int8_body('{"layer.weight": 1' + "0" * 400 + "}")), 400, "bad_compression"
    ),
    "grant nested 5000 deep": (grant_of(nested(5000)), 403, "bad_grant"),
    "grant nested 500 deep": (grant_of(nested(SHALLOW_ENOUGH_FOR_JSON_LOADS)), 403, "bad_grant"),
    "grant with an expiry past the float range": (
        grant_of(json.dumps({"federation": "test", "round": 1, "client": "alice", "executor": "gpu"})[:-1]
                 + ', "expires_at": 1' + "0" * 400 + ', "signature": "", "certificate": ""}'),
        403, "bad_grant",
    ),
    **{
        f"round spelt {spelling!r} ({route})": (round_spelt(spelling, route), 422, "invalid_request")
        for spelling in ("1.0", "%2B1", "%201", "01", "1e0", "0x1", "\N{FULLWIDTH DIGIT ONE}", "99999999999")
        for route in ("updates", "skip")
    },
}  # fmt: skip


@pytest.mark.parametrize("name", list(HOSTILE))
def test_hostile_input_is_refused_with_its_code_and_changes_nothing(
    target: ServerProcess, limits_pki: Path, name: str
) -> None:
    build, status, code = HOSTILE[name]
    with (
        FedgeClient(target.url, pki.credentials(limits_pki, pki.Role.CLIENT, "alice"), timeout=15) as alice,
        FedgeClient(target.url, pki.credentials(limits_pki, pki.Role.EXECUTOR, "gpu"), timeout=15) as gpu,
        raw_client(target, limits_pki, "alice") as as_alice,
        raw_client(target, limits_pki, "gpu", pki.Role.EXECUTOR) as as_gpu,
    ):
        info = open_round(alice)
        assert info.round == 1  # so that "01", "1.0" and "+1" would each have meant this open round
        before, model = state_of(target), alice.model()
        path, body, headers = build(alice, gpu, info.round)
        http = as_gpu if signing.GRANT_HEADER in headers else as_alice
        content_type = "application/json" if path.endswith("/skip") else "application/octet-stream"
        response = http.post(path, content=body, headers={"Content-Type": content_type, **headers})
        assert refusal(response) == (status, code), response.text
        assert state_of(target) == before
        after = alice.model()
        assert model is not None
        assert after is not None
        assert after.body == model.body


def no_certificate(server: ServerProcess, ca: Path) -> httpx.Client:
    return httpx.Client(base_url=server.url, verify=ssl.create_default_context(cafile=ca), timeout=15)


BODIES = {
    "/v1/enroll": lambda deep: f'{{"token": "t", "csr": "x", "extra": {deep}}}',
    "/v1/enroll/renew": lambda deep: f'{{"csr": {deep}}}',
    "/v1/rounds/1/skip": lambda deep: f'{{"reason": "busy", "why": {deep}}}',
    "/v1/admin/strategy": lambda deep: f'{{"name": "fedavg", "params": {{"x": {deep}}}}}',
    "/v1/admin/tokens": lambda deep: f'{{"client": "dave", "extra": {deep}}}',
}
CALLERS = {
    "/v1/enroll": None,
    "/v1/admin/strategy": ("ops", pki.Role.ADMIN),
    "/v1/admin/tokens": ("ops", pki.Role.ADMIN),
}


@pytest.mark.parametrize("levels", [DEEP, SHALLOW_ENOUGH_FOR_JSON_LOADS])
@pytest.mark.parametrize("path", list(BODIES))
def test_a_deeply_nested_json_body_is_refused_before_any_route_sees_it(
    target: ServerProcess, limits_pki: Path, path: str, levels: int
) -> None:
    caller = CALLERS.get(path, ("alice", pki.Role.CLIENT))
    before = state_of(target)
    with (
        no_certificate(target, limits_pki / "ca.pem")
        if caller is None
        else raw_client(target, limits_pki, *caller)
    ) as http:
        method = "PUT" if path == "/v1/admin/strategy" else "POST"
        body = BODIES[path](nested(levels))
        response = http.request(method, path, content=body, headers={"Content-Type": "application/json"})
    assert refusal(response) == (422, "invalid_request"), response.text
    assert "nests deeper than 32 levels" in response.json()["detail"]
    assert state_of(target) == before
    assert not (limits_pki / "tokens.json").exists() or "dave" not in (limits_pki / "tokens.json").read_text()


def test_a_well_formed_body_still_reaches_its_route(target: ServerProcess, limits_pki: Path) -> None:
    """The bounded parser refuses only what it must: an enrollment with a bad token gets the route's own
    answer, after the CSR and the JSON around it were read."""
    csr = make_csr(ec.generate_private_key(ec.SECP256R1()))
    with no_certificate(target, limits_pki / "ca.pem") as http:
        response = http.post("/v1/enroll", json={"token": "not-a-token", "csr": csr})
    assert refusal(response)[0] == 401, response.text


def handshake(server: ServerProcess, limits_pki: Path, ciphers: str | None, tls13: bool = False) -> str:
    """The suite the server agrees to with a client that offers only ``ciphers`` over TLS 1.2."""
    ctx = client_context(pki.credentials(limits_pki, pki.Role.CLIENT, "alice"))
    host, port = server.url.removeprefix("https://").rsplit(":", 1)
    return agreed_suite(host, int(port), ctx, ciphers, tls13)


@pytest.mark.parametrize(
    "suite",
    ["ECDHE-ECDSA-AES128-SHA", "ECDHE-ECDSA-AES256-SHA384", "ECDHE-ECDSA-AES128-SHA256", "AES128-GCM-SHA256",
     "AES256-SHA", "ECDHE-ECDSA-AES128-CCM8"],
)  # fmt: skip
def test_tls12_refuses_cbc_and_static_rsa_suites(target: ServerProcess, limits_pki: Path, suite: str) -> None:
    with pytest.raises(ssl.SSLError):
        handshake(target, limits_pki, f"{suite}:@SECLEVEL=0")


@pytest.mark.parametrize(
    "suite",
    ["ECDHE-ECDSA-AES128-GCM-SHA256", "ECDHE-ECDSA-AES256-GCM-SHA384", "ECDHE-ECDSA-CHACHA20-POLY1305"],
)
def test_tls12_agrees_to_ecdhe_with_aead(target: ServerProcess, limits_pki: Path, suite: str) -> None:
    assert handshake(target, limits_pki, suite) == suite


def test_tls13_is_still_offered(target: ServerProcess, limits_pki: Path) -> None:
    assert handshake(target, limits_pki, None, tls13=True).startswith("TLS_")
