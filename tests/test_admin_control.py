"""An admin runs the federation from the API: starts it, and changes its strategy between rounds."""

from __future__ import annotations

import httpx
import numpy as np
import pytest
from conftest import update_body
from test_service import open_round

from fedge.codec import decode
from fedge.security import pki
from fedge.security.tls import client_context
from fedge.wire import RoundState


def admin_http(server, pki_dir) -> httpx.Client:
    creds = pki.credentials(pki_dir, pki.Role.ADMIN, "ops")
    return httpx.Client(base_url=server.url, verify=client_context(creds), timeout=10)


def finish_round(connect, server, values: dict[str, float]) -> np.ndarray:
    apis = {name: connect(server, name) for name in values}
    info = open_round(apis["alice"])
    for name, value in values.items():
        apis[name].post_update(info.round, update_body(value, 10))
    model = apis["alice"].model()
    assert model is not None
    assert model.round == info.round
    return decode(model.body)[0]["layer.bias"]


def test_a_manually_started_federation_waits_for_an_admin(start_server, connect, pki_dir) -> None:
    server = start_server("--manual-start")
    alice = connect(server, "alice")
    assert alice.current_round(wait=1.5, etag=alice.current_round().etag).state is RoundState.WAITING
    with admin_http(server, pki_dir) as admin:
        client_http = alice._http
        refused = client_http.post("/v1/admin/start")
        assert (refused.status_code, refused.json()["error"]) == (403, "wrong_role")
        started = admin.post("/v1/admin/start")
        assert started.status_code == 200, started.text
        assert open_round(alice).round == 1
        again = admin.post("/v1/admin/start")
        assert (again.status_code, again.json()["error"]) == (409, "already_started")


def test_a_new_strategy_applies_from_the_next_round_and_survives_a_restart(
    start_server, connect, pki_dir, tmp_path
) -> None:
    server = start_server("--rounds", "3", data=tmp_path / "state")
    open_round(connect(server, "alice"))
    with admin_http(server, pki_dir) as admin:
        unknown = admin.put("/v1/admin/strategy", json={"name": "fedmagic"})
        assert (unknown.status_code, unknown.json()["error"]) == (422, "invalid_strategy")
        bad_param = admin.put("/v1/admin/strategy", json={"name": "fedmedian", "params": {"nonsense": 1}})
        assert (bad_param.status_code, bad_param.json()["error"]) == (422, "invalid_strategy")
        chosen = admin.put("/v1/admin/strategy", json={"name": "fedmedian"})
        assert chosen.json() == {"name": "fedmedian", "applies_from_round": 2}

    # Round 1 began under FedAvg and ends under it: the mean of 1, 2 and 9.
    np.testing.assert_allclose(finish_round(connect, server, {"alice": 1, "bob": 2, "carol": 9}), 4.0)
    # Round 2 is aggregated by the median.
    np.testing.assert_allclose(finish_round(connect, server, {"alice": 1, "bob": 2, "carol": 9}), 2.0)

    server.stop()
    restarted = start_server("--rounds", "3", data=tmp_path / "state")
    np.testing.assert_allclose(finish_round(connect, restarted, {"alice": 1, "bob": 3, "carol": 30}), 3.0)


def test_a_client_cannot_change_the_strategy(start_server, connect) -> None:
    server = start_server()
    refused = connect(server, "alice")._http.put("/v1/admin/strategy", json={"name": "fedmedian"})
    assert (refused.status_code, refused.json()["error"]) == (403, "wrong_role")


@pytest.mark.parametrize("params", [{"trim_fraction": 0.6}, {"malicious": -1}])
def test_strategy_parameters_out_of_range_are_refused(start_server, pki_dir, params) -> None:
    server = start_server()
    with admin_http(server, pki_dir) as admin:
        refused = admin.put(
            "/v1/admin/strategy",
            json={"name": "trimmed-mean" if "trim_fraction" in params else "krum", "params": params},
        )
    assert (refused.status_code, refused.json()["error"]) == (422, "invalid_strategy")


@pytest.mark.parametrize(
    ("params", "fragment"),
    [
        ({"malicious": 1}, "trimmed-mean takes no parameter malicious"),
        ({"trim_fraction": "a"}, "--trim-fraction"),
    ],
    ids=["another-strategys-parameter", "wrong-type"],
)
def test_parameters_the_chosen_strategy_does_not_declare_are_refused_with_the_reason(
    start_server, pki_dir, params, fragment
) -> None:
    server = start_server()
    with admin_http(server, pki_dir) as admin:
        refused = admin.put("/v1/admin/strategy", json={"name": "trimmed-mean", "params": params})
    assert (refused.status_code, refused.json()["error"]) == (422, "invalid_strategy")
    assert fragment in refused.json()["detail"]
