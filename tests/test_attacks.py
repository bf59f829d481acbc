"""The security suite: attacks on a real ``fedge server`` process over real TLS.

Each attack asserts the exact refusal (status and stable code) and that nothing it could have touched
changed: the stored updates (rows and files), the rounds, and the global model.
"""

from __future__ import annotations

import base64
import json
import pickle
import shutil
import sqlite3
import ssl
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from datetime import timedelta
from pathlib import Path

import httpx
import numpy as np
import pytest
from conftest import toy_model, toy_server_args, update_body
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec
from test_service import open_round

from fedge.client.enrollment import make_csr
from fedge.codec import encode, sha256
from fedge.security import pki, signing, tokens
from fedge.security.tls import client_context
from fedge.server.launcher import ServerProcess, launch
from fedge.transport import FedgeClient, ServerError


def state_of(server: ServerProcess) -> tuple:
    """Everything a refused request must leave as it was."""
    with sqlite3.connect(server.data / "state.db") as db:
        updates = db.execute(
            "SELECT round, client, sha256, signature, nonce FROM updates ORDER BY 1, 2"
        ).fetchall()
        rounds = db.execute("SELECT round, state, result_sha256 FROM rounds ORDER BY round").fetchall()
        model = db.execute("SELECT value FROM meta WHERE key IN ('global_sha256', 'global_round')").fetchall()
    files = sorted(
        str(p.relative_to(server.data)) for p in (server.data / "updates").rglob("*") if p.is_file()
    )
    models = sorted(p.name for p in (server.data / "models").iterdir())
    return updates, rounds, model, files, models


def running(server: ServerProcess, pki_root: Path) -> ServerProcess:
    """Wait until the server's round clock has opened round 1, so that a state snapshot taken now is not
    changed by the clock itself while a refused request is being checked."""
    with FedgeClient(server.url, pki.credentials(pki_root, pki.Role.CLIENT, "alice"), timeout=15) as alice:
        open_round(alice)
    return server


def raw_client(
    server: ServerProcess, pki_root: Path, id_: str, role: pki.Role = pki.Role.CLIENT
) -> httpx.Client:
    creds = pki.credentials(pki_root, role, id_)
    return httpx.Client(base_url=server.url, verify=client_context(creds), timeout=15)


def refusal(response: httpx.Response) -> tuple[int, str]:
    return response.status_code, response.json()["error"]


def refused_soon(call: Callable[[], object], within: float = 30.0) -> ServerError:
    """Poll ``call`` until the server refuses it; fail if it still answers after ``within`` seconds."""
    give_up = time.monotonic() + within
    while time.monotonic() < give_up:
        try:
            call()
        except ServerError as exc:
            return exc
        time.sleep(0.2)
    raise AssertionError(f"still accepted after {within} s")


@pytest.fixture(scope="module")
def target(tmp_path_factory: pytest.TempPathFactory, pki_dir: Path) -> Iterator[ServerProcess]:
    """One server for the attacks that must all be refused: none of them may change its state."""
    work = tmp_path_factory.mktemp("target")
    args = toy_server_args(pki_dir, work / "initial.safetensors")
    server = running(launch(args, work / "server", work / "server.log"), pki_dir)
    yield server
    server.stop()


def _signed(api: FedgeClient, round_: int, body: bytes) -> dict[str, str]:
    return api.sign_update(round_, body)


def _attacks() -> dict[
    str, tuple[Callable[[FedgeClient, FedgeClient, int], tuple[str, bytes, dict]], int, str]
]:
    """name -> (build (path, body, headers) from alice's and bob's clients and the round, status, code)."""
    good = update_body(1.0)
    nan = toy_model(1.0)
    nan["layer.bias"][1] = np.nan
    inf = toy_model(1.0)
    inf["layer.weight"][0, 0] = np.inf
    wide = {**toy_model(1.0), "layer.weight": np.ones((4, 4), dtype=np.float32)}
    doubles = {name: t.astype(np.float64) for name, t in toy_model(1.0).items()}
    extra = {**toy_model(1.0), "backdoor": np.ones(2, dtype=np.float32)}
    pickled = pickle.dumps({"layer.weight": np.ones((4, 3)), "num_examples": 10})

    def body_attack(body: bytes) -> Callable[[FedgeClient, FedgeClient, int], tuple[str, bytes, dict]]:
        return lambda alice, _bob, r: (f"/v1/rounds/{r}/updates", body, _signed(alice, r, body))

    return {
        "no signature": (lambda _a, _b, r: (f"/v1/rounds/{r}/updates", good, {}), 400, "missing_signature"),
        "malformed nonce": (
            lambda a, _b, r: (
                f"/v1/rounds/{r}/updates",
                good,
                {**_signed(a, r, good), "X-Fedge-Nonce": "zz"},
            ),
            400,
            "bad_nonce",
        ),
        "body changed after signing": (
            lambda a, _b, r: (f"/v1/rounds/{r}/updates", update_body(9.0), _signed(a, r, good)),
            403,
            "bad_signature",
        ),
        "signature made for another round": (
            lambda a, _b, r: (f"/v1/rounds/{r}/updates", good, _signed(a, r + 1, good)),
            403,
            "bad_signature",
        ),
        "claiming another client's slot": (
            lambda a, _b, r: (f"/v1/rounds/{r}/updates", good, a.sign_update(r, good, client="bob")),
            403,
            "bad_signature",
        ),
        "another client's signature": (
            lambda _a, b, r: (f"/v1/rounds/{r}/updates", good, _signed(b, r, good)),
            403,
            "bad_signature",
        ),
        "signature that is not base64": (
            lambda a, _b, r: (
                f"/v1/rounds/{r}/updates",
                good,
                {**_signed(a, r, good), "X-Fedge-Signature": "!!"},
            ),
            403,
            "bad_signature",
        ),
        "malformed body": (body_attack(b"\x08\0\0\0\0\0\0\0not json" + bytes(100)), 400, "malformed_update"),
        "pickled body": (body_attack(pickled), 400, "malformed_update"),
        "NaN values": (body_attack(encode(nan, {"num_examples": "10"})), 422, "non_finite"),
        "Inf values": (body_attack(encode(inf, {"num_examples": "10"})), 422, "non_finite"),
        "wrong shape": (body_attack(encode(wide, {"num_examples": "10"})), 422, "tensor_mismatch"),
        "wrong dtype": (body_attack(encode(doubles, {"num_examples": "10"})), 422, "tensor_mismatch"),
        "an extra tensor": (body_attack(encode(extra, {"num_examples": "10"})), 422, "tensor_mismatch"),
        "no example count": (body_attack(encode(toy_model(1.0))), 400, "bad_metadata"),
        "negative example count": (body_attack(update_body(1.0, num_examples=-5)), 400, "bad_metadata"),
        "oversized body": (body_attack(b"\0" * 3_000_000), 413, "update_too_large"),
        "a round that is not open": (
            lambda a, _b, r: (f"/v1/rounds/{r + 5}/updates", good, _signed(a, r + 5, good)),
            409,
            "round_not_open",
        ),
        "path tricks in the round": (
            lambda a, _b, r: ("/v1/rounds/%2E%2E/updates", good, _signed(a, r, good)),
            422,
            "invalid_request",
        ),
    }


ATTACKS = _attacks()


@pytest.mark.parametrize("name", list(ATTACKS))
def test_a_refused_update_changes_nothing(target: ServerProcess, pki_dir: Path, name: str) -> None:
    build, status, code = ATTACKS[name]
    with (
        FedgeClient(target.url, pki.credentials(pki_dir, pki.Role.CLIENT, "alice"), timeout=15) as alice,
        FedgeClient(target.url, pki.credentials(pki_dir, pki.Role.CLIENT, "bob"), timeout=15) as bob,
        raw_client(target, pki_dir, "alice") as http,
    ):
        info = open_round(alice)
        before, model = state_of(target), alice.model()
        path, body, headers = build(alice, bob, info.round)
        response = http.post(
            path, content=body, headers={"Content-Type": "application/octet-stream", **headers}
        )
        assert refusal(response) == (status, code), response.text
        assert state_of(target) == before
        after = alice.model()
        assert model is not None
        assert after is not None
        assert after.body == model.body


def test_no_route_returns_or_lists_an_update(target: ServerProcess, pki_dir: Path) -> None:
    with raw_client(target, pki_dir, "alice") as http:
        paths = http.get("/openapi.json").json()["paths"]
    readable = [path for path, methods in paths.items() if "get" in methods]
    assert readable
    assert not [path for path in readable if "update" in path]
    assert set(paths["/v1/model"]) == {"get"}


def test_admin_routes_refuse_clients_and_executors(target: ServerProcess, pki_dir: Path) -> None:
    before = state_of(target)
    with raw_client(target, pki_dir, "alice") as http:
        assert refusal(http.get("/v1/admin/status")) == (403, "wrong_role")
        assert refusal(http.get("/v1/admin/rounds")) == (403, "wrong_role")
        assert refusal(http.post("/v1/admin/clients/bob/revoke")) == (403, "wrong_role")
        assert refusal(http.post("/v1/admin/tokens", json={"client": "eve"})) == (403, "wrong_role")
    assert pki.revoked(pki_dir) == {}
    assert not (pki_dir / "tokens.json").exists()
    assert state_of(target) == before


def test_path_tricks_in_an_admin_route_revoke_nothing(target: ServerProcess, pki_dir: Path) -> None:
    with raw_client(target, pki_dir, "ops", pki.Role.ADMIN) as http:
        assert refusal(http.post("/v1/admin/clients/..%2F..%2Fserver%2Fserver/revoke"))[0] == 404
        assert refusal(http.post("/v1/admin/clients/..%2Fserver/revoke"))[0] == 404
        assert refusal(http.post("/v1/admin/clients/Alice/revoke")) == (400, "invalid_id")
        assert refusal(http.post("/v1/admin/clients/mallory/revoke")) == (404, "unknown_client")
        assert http.get("/v1/admin/status").status_code == 200
    assert pki.revoked(pki_dir) == {}


def test_a_certificate_from_another_ca_cannot_even_connect(
    target: ServerProcess, pki_dir: Path, other_pki: Path
):
    foreign = pki.credentials(other_pki, pki.Role.CLIENT, "alice")
    context = client_context(pki.Credentials(ca=pki_dir / "ca.pem", cert=foreign.cert, key=foreign.key))
    with httpx.Client(verify=context) as http, pytest.raises(httpx.TransportError):
        http.get(f"{target.url}/healthz")


def test_a_certificate_of_another_federation_under_the_same_ca_is_refused(
    start_server, fresh_pki: Path, tmp_path: Path
) -> None:
    server = running(start_server(pki_root=fresh_pki), fresh_pki)
    elsewhere = tmp_path / "same-ca-other-federation"
    shutil.copytree(fresh_pki, elsewhere)
    (elsewhere / "pki.json").write_text(json.dumps({"federation": "other"}))
    pki.issue(elsewhere, pki.Role.CLIENT, "alice")
    before = state_of(server)
    with raw_client(server, elsewhere, "alice") as http:
        assert refusal(http.get("/v1/model")) == (403, "wrong_federation")
        body = update_body(1.0)
        headers = {"X-Fedge-Nonce": "0" * 32, "X-Fedge-Signature": "AA=="}
        assert refusal(http.post("/v1/rounds/1/updates", content=body, headers=headers)) == (
            403,
            "wrong_federation",
        )
    assert state_of(server) == before


def test_an_expired_certificate_cannot_connect(start_server, fresh_pki: Path) -> None:
    pki.issue(fresh_pki, pki.Role.CLIENT, "late", lifetime=-timedelta(minutes=1))
    server = start_server(pki_root=fresh_pki)
    with raw_client(server, fresh_pki, "late") as http, pytest.raises(httpx.TransportError):
        http.get("/healthz")
    assert "late" not in pki.active(fresh_pki, pki.Role.CLIENT)


def altered(grant: str, **changes: object) -> str:
    payload = json.loads(base64.urlsafe_b64decode(grant))
    return base64.urlsafe_b64encode(json.dumps({**payload, **changes}).encode()).decode()


def test_an_executor_submits_once_in_a_client_slot_with_its_grant_and_nothing_else(
    start_server, connect, fresh_pki: Path
) -> None:
    for executor in ("gpu-1", "gpu-2"):
        pki.issue(fresh_pki, pki.Role.EXECUTOR, executor)
    server = start_server(pki_root=fresh_pki)
    alice, bob = connect(server, "alice", pki_root=fresh_pki), connect(server, "bob", pki_root=fresh_pki)
    gpu = connect(server, "gpu-1", pki.Role.EXECUTOR, pki_root=fresh_pki)
    info = open_round(alice)
    r = info.round
    before = state_of(server)
    forged_by_bob = signing.make_grant(
        signing.load_private_key(pki.credentials(fresh_pki, pki.Role.CLIENT, "bob").key.read_bytes()),
        pki.credentials(fresh_pki, pki.Role.CLIENT, "bob").cert.read_bytes(),
        signing.Grant("test", r, "alice", "gpu-1", time.time() + 600),
    )
    refused = {
        "no grant": (None, "missing_grant"),
        "a grant for another executor": (alice.grant(r, "gpu-2"), "bad_grant"),
        "a grant for another round": (alice.grant(r + 1, "gpu-1"), "bad_grant"),
        "an expired grant": (alice.grant(r, "gpu-1", ttl=-1), "bad_grant"),
        "a grant for alice signed by bob": (forged_by_bob, "bad_grant"),
        "a grant altered after signing": (altered(alice.grant(r, "gpu-2"), executor="gpu-1"), "bad_grant"),
    }
    for name, (grant, code) in refused.items():
        with pytest.raises(ServerError) as attempt:
            gpu.post_update(r, update_body(1.0), grant=grant)
        assert (attempt.value.status, attempt.value.code) == (403, code), name
        assert state_of(server) == before, name

    grant = alice.grant(r, "gpu-1")
    assert gpu.post_update(r, update_body(5.0), grant=grant).client == "alice"
    with sqlite3.connect(server.data / "state.db") as db:
        assert db.execute("SELECT client, computed_by FROM updates").fetchall() == [("alice", "gpu-1")]
    stored = state_of(server)
    with pytest.raises(ServerError, match="duplicate_update"):
        gpu.post_update(r, update_body(5.0), grant=grant)
    with pytest.raises(ServerError, match="duplicate_update"):
        alice.post_update(r, update_body(5.0))
    assert state_of(server) == stored

    bob_grant = bob.grant(r, "gpu-1")
    pki.revoke(fresh_pki, pki.Role.CLIENT, "bob")
    assert refused_soon(bob.current_round).code == "certificate_revoked"
    with pytest.raises(ServerError, match="revoked") as revoked:
        gpu.post_update(r, update_body(1.0), grant=bob_grant)
    assert (revoked.value.status, revoked.value.code) == (403, "bad_grant")
    assert state_of(server) == stored


def test_with_a_norm_bound_an_update_that_moves_the_model_too_far_is_refused(start_server, connect) -> None:
    server = start_server("--max-update-norm", "5")
    alice, bob = connect(server, "alice"), connect(server, "bob")
    info = open_round(alice)
    before = state_of(server)
    with pytest.raises(ServerError) as refused:
        alice.post_update(info.round, update_body(2.0))  # 15 parameters moved by 2: distance 7.7
    assert (refused.value.status, refused.value.code) == (422, "norm_too_large")
    assert state_of(server) == before
    assert bob.post_update(info.round, update_body(1.0)).client == "bob"  # distance 3.9


def test_a_client_not_selected_for_the_round_is_refused(start_server, connect, fresh_pki: Path) -> None:
    server = start_server(pki_root=fresh_pki)
    alice = connect(server, "alice", pki_root=fresh_pki)
    info = open_round(alice)
    assert info.selected == ["alice", "bob"]
    pki.issue(fresh_pki, pki.Role.CLIENT, "dave")
    dave = connect(server, "dave", pki_root=fresh_pki)
    before = state_of(server)
    with pytest.raises(ServerError) as refused:
        dave.post_update(info.round, update_body(1.0))
    assert (refused.value.status, refused.value.code) == (403, "not_selected")
    assert state_of(server) == before


def test_a_second_update_and_replays_are_refused_and_the_signature_is_kept(
    start_server, connect, pki_dir: Path
) -> None:
    server = start_server()
    apis = {name: connect(server, name) for name in ("alice", "bob", "carol")}
    info = open_round(apis["alice"])
    body = update_body(2.0)
    headers = {"Content-Type": "application/octet-stream", **apis["alice"].sign_update(info.round, body)}
    with raw_client(server, pki_dir, "alice") as http:
        assert http.post(f"/v1/rounds/{info.round}/updates", content=body, headers=headers).status_code == 202
        stored = state_of(server)
        assert stored[0] == [
            (
                info.round,
                "alice",
                sha256(body),
                headers["X-Fedge-Signature"],
                headers["X-Fedge-Nonce"],
            )
        ]
        replay = http.post(f"/v1/rounds/{info.round}/updates", content=body, headers=headers)
        assert refusal(replay) == (409, "duplicate_update")
        with pytest.raises(ServerError) as second:
            apis["alice"].post_update(info.round, update_body(3.0))
        assert (second.value.status, second.value.code) == (409, "duplicate_update")
        assert state_of(server) == stored

        apis["bob"].post_update(info.round, update_body(4.0))
        apis["carol"].post_update(info.round, update_body(6.0))
        assert open_round(apis["alice"]).round == info.round + 1
        closed = state_of(server)
        late = http.post(f"/v1/rounds/{info.round}/updates", content=body, headers=headers)
        assert refusal(late) == (409, "duplicate_update")  # counted before it closed
        moved = http.post(f"/v1/rounds/{info.round + 1}/updates", content=body, headers=headers)
        assert refusal(moved) == (403, "bad_signature")
        assert state_of(server) == closed


def test_a_revoked_client_is_refused_by_a_running_server_within_seconds(
    start_server, connect, fresh_pki: Path
) -> None:
    server = start_server(pki_root=fresh_pki)
    alice, bob = connect(server, "alice", pki_root=fresh_pki), connect(server, "bob", pki_root=fresh_pki)
    info = open_round(alice)
    before = state_of(server)

    done = subprocess.run(
        [sys.executable, "-m", "fedge", "pki", "revoke", "--dir", str(fresh_pki), "--client", "alice"],
        capture_output=True,
        text=True,
        check=False,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    refused = refused_soon(alice.current_round)
    assert (refused.status, refused.code) == (401, "certificate_revoked")
    with pytest.raises(ServerError, match="certificate_revoked"):
        alice.post_update(info.round, update_body(1.0))
    assert state_of(server) == before
    assert bob.current_round().round == info.round
    assert pki.active(fresh_pki, pki.Role.CLIENT) == ["bob"]

    crl = x509.load_pem_x509_crl((fresh_pki / "crl.pem").read_bytes())
    serial = x509.load_pem_x509_certificate((fresh_pki / "client" / "alice.pem").read_bytes()).serial_number
    assert crl.get_revoked_certificate_by_serial_number(serial) is not None
    listed = subprocess.run(
        [sys.executable, "-m", "fedge", "pki", "list", "--dir", str(fresh_pki)],
        capture_output=True,
        text=True,
        check=False,
        timeout=120,
    )
    assert listed.returncode == 0
    rows = {line.split("│")[2].strip(): line for line in listed.stdout.splitlines() if line.count("│") >= 5}
    assert "revoked" in rows["alice"]
    assert "valid" in rows["bob"]


def test_a_certificate_replaced_by_a_newer_one_for_its_id_is_refused(
    start_server, connect, fresh_pki: Path, tmp_path: Path
) -> None:
    server = start_server(pki_root=fresh_pki)
    (tmp_path / "old").mkdir()
    for name in ("alice.pem", "alice.key"):
        (tmp_path / "old" / name).write_bytes((fresh_pki / "client" / name).read_bytes())
    old_creds = pki.Credentials(
        fresh_pki / "ca.pem", tmp_path / "old" / "alice.pem", tmp_path / "old" / "alice.key"
    )
    with FedgeClient(server.url, old_creds) as old:
        info = open_round(old)
        pki.issue(fresh_pki, pki.Role.CLIENT, "alice")
        before = state_of(server)
        with pytest.raises(ServerError) as refused:
            old.post_update(info.round, update_body(1.0))
    assert (refused.value.status, refused.value.code) == (401, "certificate_superseded")
    assert state_of(server) == before
    assert (
        connect(server, "alice", pki_root=fresh_pki).post_update(info.round, update_body(1.0)).client
        == "alice"
    )


def test_an_admin_revokes_a_client_over_the_api(start_server, connect, fresh_pki: Path) -> None:
    server = start_server(pki_root=fresh_pki)
    bob, alice = connect(server, "bob", pki_root=fresh_pki), connect(server, "alice", pki_root=fresh_pki)
    info = open_round(bob)
    alice.post_update(info.round, update_body(1.0))
    with raw_client(server, fresh_pki, "ops", pki.Role.ADMIN) as http:
        [current] = http.get("/v1/admin/rounds").json()
        assert (current["round"], current["state"]) == (info.round, "open")
        assert (current["selected"], current["reported"]) == (["alice", "bob"], ["alice"])
        revoked = http.post("/v1/admin/clients/bob/revoke")
        assert revoked.status_code == 200
        assert revoked.json()["status"] == "revoked"
        assert refusal(http.post("/v1/admin/clients/bob/revoke")) == (409, "already_revoked")
        status = http.get("/v1/admin/status").json()
    assert {c["id"]: c["status"] for c in status["clients"]} == {"alice": "valid", "bob": "revoked"}
    assert refused_soon(bob.model_meta).code == "certificate_revoked"


@pytest.mark.parametrize(
    ("prepare", "code"),
    [
        (lambda d: tokens.mint(d, "dave", now=time.time() - 2 * 24 * 3600), "token_expired"),
        (lambda d: "not-a-token-anyone-minted", "invalid_token"),
    ],
)
def test_enrollment_with_an_expired_or_unknown_token_is_refused(
    start_server, fresh_pki: Path, prepare, code: str
) -> None:
    server = running(start_server(pki_root=fresh_pki), fresh_pki)
    token = prepare(fresh_pki)
    key = ec.generate_private_key(ec.SECP256R1())
    before = state_of(server)
    pinned = ssl.create_default_context(cafile=fresh_pki / "ca.pem")
    with httpx.Client(base_url=server.url, verify=pinned) as http:
        response = http.post("/v1/enroll", json={"token": token, "csr": make_csr(key)})
    assert refusal(response) == (401, code)
    assert not (fresh_pki / "client" / "dave.pem").exists()
    assert state_of(server) == before
