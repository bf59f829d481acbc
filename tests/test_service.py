"""The aggregation service as operators run it: a separate process, mutual TLS, the v1 wire contract."""

from __future__ import annotations

import signal
import socket
import sqlite3
import ssl
import threading
import time
from pathlib import Path

import httpx
import numpy as np
import pytest
from conftest import toy_model, update_body

from fedge.codec import decode
from fedge.security import pki
from fedge.security.tls import client_context
from fedge.transport import FedgeClient, ServerError
from fedge.wire import RoundInfo, RoundState


def open_round(api: FedgeClient) -> RoundInfo:
    info = api.current_round()
    deadline = time.monotonic() + 10
    while info.state is not RoundState.OPEN and time.monotonic() < deadline:
        info = api.current_round(wait=2, etag=info.etag)
    assert info.state is RoundState.OPEN
    return info


def stored_updates(data: Path) -> list[tuple[int, str]]:
    with sqlite3.connect(data / "state.db") as db:
        return db.execute("SELECT round, client FROM updates ORDER BY round, client").fetchall()


def test_a_client_reads_the_model_and_an_unchanged_model_is_not_downloaded_twice(
    start_server, connect
) -> None:
    api = connect(start_server(), "alice")
    model = api.model()
    assert model is not None
    assert model.round == 0
    tensors, _ = decode(model.body)
    np.testing.assert_array_equal(tensors["layer.weight"], toy_model()["layer.weight"])
    assert api.model(cached_sha256=model.sha256) is None
    assert api.model_meta().tensors == {"layer.bias": ("float32", [3]), "layer.weight": ("float32", [4, 3])}


def test_without_a_client_certificate_only_health_and_enrollment_answer(start_server, pki_dir: Path) -> None:
    server = start_server()
    no_cert = ssl.create_default_context(cafile=pki_dir / "ca.pem")
    with httpx.Client(base_url=server.url, verify=no_cert) as http:
        assert http.get("/healthz").status_code == 200
        assert http.get("/v1/ca").text == (pki_dir / "ca.pem").read_text()
        for method, path in [
            ("GET", "/v1/model"), ("GET", "/v1/model/meta"), ("GET", "/v1/rounds/current"),
            ("POST", "/v1/rounds/1/updates"), ("GET", "/metrics"), ("GET", "/v1/admin/status"),
            ("POST", "/v1/enroll/renew"), ("GET", "/openapi.json"), ("GET", "/docs"),
            ("GET", "/no/such/route"),
        ]:  # fmt: skip
            refused = http.request(method, path, content=update_body(1.0))
            assert (refused.status_code, refused.json()["error"]) == (401, "no_client_certificate"), path
    assert stored_updates(server.data) == []


def test_a_certificate_from_another_ca_is_refused(start_server, pki_dir: Path, other_pki: Path) -> None:
    server = start_server()
    foreign = pki.credentials(other_pki, pki.Role.CLIENT, "alice")
    context = client_context(pki.Credentials(ca=pki_dir / "ca.pem", cert=foreign.cert, key=foreign.key))
    with httpx.Client(verify=context) as http, pytest.raises(httpx.TransportError):
        http.get(f"{server.url}/v1/model")


def test_tls_below_1_2_is_refused(start_server, pki_dir: Path) -> None:
    server = start_server()
    old = client_context(pki.credentials(pki_dir, pki.Role.CLIENT, "alice"))
    old.minimum_version = old.maximum_version = ssl.TLSVersion.TLSv1_1
    with httpx.Client(verify=old) as http, pytest.raises(httpx.TransportError):
        http.get(f"{server.url}/v1/model")


@pytest.mark.parametrize("method", ["POST", "PUT", "PATCH", "DELETE"])
def test_the_model_route_refuses_writes(start_server, pki_dir: Path, method: str) -> None:
    server = start_server()
    creds = pki.credentials(pki_dir, pki.Role.ADMIN, "ops")
    with httpx.Client(base_url=server.url, verify=client_context(creds)) as http:
        before = http.get("/v1/model")
        refused = http.request(method, "/v1/model", content=update_body(9.0))
        after = http.get("/v1/model")
    assert refused.status_code == 405
    assert refused.json()["error"] == "method_not_allowed"
    assert after.headers["ETag"] == before.headers["ETag"]
    assert after.content == before.content


def test_an_update_for_a_wrong_round_is_refused_and_the_model_is_unchanged(start_server, connect) -> None:
    server = start_server()
    api = connect(server, "alice")
    info = open_round(api)
    before = api.model_meta().sha256
    for wrong in (info.round + 1, info.round - 1, 999):
        with pytest.raises(ServerError) as refused:
            api.post_update(wrong, update_body(5.0))
        assert (refused.value.status, refused.value.code) == (409, "round_not_open")
    assert api.model_meta().sha256 == before
    assert stored_updates(server.data) == []


def test_each_update_is_stored_under_the_certificate_identity_and_a_round_averages_them(
    start_server, connect
) -> None:
    server = start_server()
    apis = {name: connect(server, name) for name in ("alice", "bob", "carol")}
    info = open_round(apis["alice"])
    assert info.selected == ["alice", "bob", "carol"]
    apis["alice"].post_update(info.round, update_body(1.0, 10))
    apis["bob"].post_update(info.round, update_body(3.0, 30))

    woke: list[RoundInfo] = []
    poller = threading.Thread(
        target=lambda: woke.append(apis["alice"].current_round(wait=20, etag=info.etag))
    )
    poller.start()
    time.sleep(0.3)
    receipt = apis["carol"].post_update(info.round, update_body(6.0, 60))
    poller.join(timeout=5)

    assert receipt.client == "carol"
    assert woke
    assert woke[0].round == info.round + 1
    assert stored_updates(server.data) == [(1, "alice"), (1, "bob"), (1, "carol")]
    model = apis["alice"].model()
    assert model is not None
    assert model.round == 1
    np.testing.assert_allclose(decode(model.body)[0]["layer.bias"], (10 + 90 + 360) / 100, rtol=1e-6)


def test_only_clients_post_updates(start_server, connect) -> None:
    server = start_server()
    admin = connect(server, "ops", pki.Role.ADMIN)
    info = open_round(admin)
    with pytest.raises(ServerError) as refused:
        admin.post_update(info.round, update_body(1.0))
    assert (refused.value.status, refused.value.code) == (403, "wrong_role")


def test_an_oversized_body_is_refused_before_it_is_read(start_server, connect) -> None:
    server = start_server()
    api = connect(server, "alice")
    info = open_round(api)
    with pytest.raises(ServerError) as refused:
        api.post_update(info.round, b"\0" * 2_000_000)
    assert (refused.value.status, refused.value.code) == (413, "update_too_large")
    assert stored_updates(server.data) == []


def test_an_acknowledged_update_survives_a_killed_server(start_server, connect, tmp_path: Path) -> None:
    server = start_server(data=tmp_path / "durable")
    alice = connect(server, "alice")
    info = open_round(alice)
    alice.post_update(info.round, update_body(2.0, 10))
    server.stop(signal.SIGKILL)

    restarted = start_server(data=tmp_path / "durable")
    alice, bob, carol = (connect(restarted, name) for name in ("alice", "bob", "carol"))
    assert open_round(alice).round == info.round
    with pytest.raises(ServerError, match="duplicate_update"):
        alice.post_update(info.round, update_body(2.0, 10))
    bob.post_update(info.round, update_body(4.0, 10))
    carol.post_update(info.round, update_body(6.0, 20))
    model = alice.model()
    assert model is not None
    np.testing.assert_allclose(decode(model.body)[0]["layer.weight"], (20 + 40 + 120) / 40, rtol=1e-6)


def test_metrics_count_accepted_and_refused_updates(start_server, connect, pki_dir: Path) -> None:
    server = start_server()
    api = connect(server, "alice")
    info = open_round(api)
    api.post_update(info.round, update_body(1.0))
    with pytest.raises(ServerError):
        api.post_update(info.round, update_body(1.0))
    creds = pki.credentials(pki_dir, pki.Role.ADMIN, "ops")
    with httpx.Client(base_url=server.url, verify=client_context(creds)) as http:
        text = http.get("/metrics").text
    assert "fedge_updates_accepted_total 1.0" in text
    assert 'fedge_updates_rejected_total{code="duplicate_update"} 1.0' in text


def test_the_listening_socket_disables_nagle_so_small_responses_are_not_held_back() -> None:
    from fedge.server.service import bind

    with bind("127.0.0.1", 0) as sock:
        assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) != 0
