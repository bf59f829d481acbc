"""Federated evaluation: after a round, the clients the server asks score its model on their own held-out
data and send their figures back signed (``POST /v1/rounds/{round}/evaluation``); the server combines
them and stores them per round. Refusals store nothing."""

from __future__ import annotations

import json
import os
import sqlite3
import subprocess
import sys
from pathlib import Path

import httpx
import numpy as np
import pytest
from conftest import client_data, submit, toy_model, update_body, wait_for

from fedge.codec import decode, encode, sha256
from fedge.security import pki, signing
from fedge.security.tls import client_context
from fedge.server import federated_evaluation
from fedge.server.errors import Rejected
from fedge.server.roundlog import Event, RoundEvent, RoundLog
from fedge.server.rounds import Federation, FederationSettings
from fedge.server.store import Evaluation, Store
from fedge.transport import FedgeClient, ServerError
from fedge.wire import EvaluationReport, RoundState


def test_reports_combine_weighted_by_examples_and_metrics_over_those_that_report_them() -> None:
    combined = federated_evaluation.combine(
        {"a": (1.0, 30, {"accuracy": 0.5, "f1": 0.2}), "b": (2.0, 10, {"accuracy": 0.9})}
    )
    assert combined.examples == 40
    assert combined.loss == pytest.approx((30 * 1.0 + 10 * 2.0) / 40)
    assert combined.accuracy == pytest.approx((30 * 0.5 + 10 * 0.9) / 40)
    assert combined.metrics["f1"] == pytest.approx(0.2)
    assert federated_evaluation.combine({"a": (1.0, 3, {})}).accuracy is None


def test_evaluators_are_a_share_of_the_clients_at_least_one_and_none_at_zero() -> None:
    clients = [f"c{i:02d}" for i in range(20)]
    assert federated_evaluation.evaluators(clients, 3, 0.0, 0) == []
    assert len(federated_evaluation.evaluators(clients, 3, 0.01, 0)) == 1
    chosen = federated_evaluation.evaluators(clients, 3, 0.25, 0)
    assert len(chosen) == 5
    assert set(chosen) <= set(clients)
    assert chosen == federated_evaluation.evaluators(clients, 3, 0.25, 0)
    assert [r for r in range(1, 8) if federated_evaluation.due(r, 3, 7)] == [3, 6, 7]


def _held_out(directory: Path, parts: int) -> tuple[Path, list[Path]]:
    """The digits test set as one file (the server's --eval-data) and split into ``parts`` device files."""
    from fedge.edge_functions import datasets

    digits = datasets.load("digits")
    whole = directory / "test.npz"
    np.savez(whole, x=digits.x_test, y=digits.y_test)
    files = []
    for index, chunk in enumerate(np.array_split(np.arange(len(digits.y_test)), parts)):
        path = directory / f"test-{index}.npz"
        np.savez(path, x=digits.x_test[chunk], y=digits.y_test[chunk])
        files.append(path)
    return whole, files


def _rows(data: Path, sql: str) -> list[tuple]:
    with sqlite3.connect(data / "state.db") as db:
        return db.execute(sql).fetchall()


def test_agents_asked_score_each_round_and_together_match_the_server_on_the_union_of_their_data(
    make_pki, start_task_server, start_agent, tmp_path: Path
) -> None:
    """Two agents each hold half of the held-out set; the server scores each model on all of it. Loss is a
    mean over examples, so the clients' figures weighted by their examples must equal the server's."""
    pki_dir = make_pki("dev-1", "dev-2")
    whole, halves = _held_out(tmp_path, 2)
    server = start_task_server(
        pki_dir, "--rounds", "2", "--min-clients", "2", "--fraction-evaluate", "1", "--eval-data", str(whole)
    )
    for index, data in enumerate(client_data(tmp_path, 2)):
        client = f"dev-{index + 1}"
        start_agent(pki_dir, client, data, server.url, "--eval-data", str(halves[index]))
    wait_for(lambda: b"federation finished" in server.log.read_bytes(), 180, "the federation to finish")
    log = server.log.read_text()
    assert "round 2 evaluated (federated by 2 of 2 clients" in log
    assert log.index("round 2 evaluated (federated by 2 of 2") < log.index("federation finished")
    scores = {
        (r, source): (loss, accuracy, examples)
        for r, source, loss, accuracy, examples in _rows(
            server.data, "SELECT round, source, loss, accuracy, examples FROM evaluations"
        )
    }
    for round_ in (1, 2):
        fed, central = scores[(round_, "federated")], scores[(round_, "server")]
        assert fed[2] == central[2] == sum(len(np.load(h)["y"]) for h in halves)
        assert fed[0] == pytest.approx(central[0], rel=1e-5)
        assert fed[1] == pytest.approx(central[1], rel=1e-6)  # float32 sums
    reports = _rows(
        server.data, "SELECT round, client, signature FROM client_evaluations ORDER BY round, client"
    )
    assert [(r, c) for r, c, _ in reports] == [(1, "dev-1"), (1, "dev-2"), (2, "dev-1"), (2, "dev-2")]
    assert all(signature for _, _, signature in reports)
    agent_log = (tmp_path / "agent-dev-1.log").read_text()
    assert "round 1 evaluated on" in agent_log
    assert ", sent" in agent_log


def _raw_post(
    pki_dir: Path, client: str, url: str, round_: int, body: bytes, signed: bytes
) -> httpx.Response:
    """An evaluation whose signature covers ``signed`` (a forged one when it is not ``body``)."""
    creds = pki.credentials(pki_dir, pki.Role.CLIENT, client)
    key = signing.load_private_key(creds.key.read_bytes())
    nonce = signing.new_nonce()
    claim = signing.UpdateClaim("edge", round_, client, sha256(signed), nonce, kind="evaluation")
    headers = {signing.SIGNATURE_HEADER: signing.sign(key, claim.message()), signing.NONCE_HEADER: nonce}
    with httpx.Client(base_url=url, verify=client_context(creds)) as http:
        return http.post(f"/v1/rounds/{round_}/evaluation", content=body, headers=headers)


def test_only_the_asked_client_reports_once_on_the_asked_model_and_refusals_store_nothing(
    make_pki, start_task_server, tmp_path: Path
) -> None:
    pki_dir = make_pki("dev-1", "dev-2")
    server = start_task_server(
        pki_dir, "--rounds", "1", "--min-clients", "2", "--fraction-evaluate", "0.5", "--round-timeout", "120"
    )
    apis = {
        c: FedgeClient(server.url, pki.credentials(pki_dir, pki.Role.CLIENT, c)) for c in ("dev-1", "dev-2")
    }
    try:
        wait_for(lambda: apis["dev-1"].current_round().state is RoundState.OPEN, 60, "round 1 to open")
        model = apis["dev-1"].model()
        assert model is not None
        for api in apis.values():
            api.post_update(1, encode(decode(model.body)[0], {"num_examples": "10"}))
        wait_for(lambda: apis["dev-1"].current_round().evaluate, 30, "the evaluation ask")
        ask = apis["dev-1"].current_round().evaluate
        assert ask is not None
        assert ask.round == 1
        assert len(ask.clients) == 1
        assert b"federation finished" not in server.log.read_bytes()
        asked, other = ask.clients[0], next(c for c in apis if c not in ask.clients)
        good = EvaluationReport(
            model_sha256=ask.model_sha256, loss=0.5, num_examples=30, metrics={"accuracy": 0.8}
        )

        def refused(client: str, round_: int, report: EvaluationReport) -> str:
            with pytest.raises(ServerError) as caught:
                apis[client].post_evaluation(round_, report)
            return caught.value.code

        assert refused(other, 1, good) == "not_asked"
        assert refused(asked, 0, good) == "not_asked"
        assert refused(asked, 1, good.model_copy(update={"model_sha256": "0" * 64})) == "wrong_model"
        body = good.model_dump_json().encode()
        assert _raw_post(pki_dir, asked, server.url, 1, body, body.replace(b"0.5", b"0.1")).status_code == 403
        for bad in (
            body.replace(b'"loss":0.5', b'"loss":NaN'),
            body.replace(b'"num_examples":30', b'"num_examples":"30"'),
            body.replace(b'"num_examples":30', b'"num_examples":0'),
            body.replace(b'"accuracy":0.8', b'"accuracy":Infinity'),
            b"[1, 2",
        ):
            answer = _raw_post(pki_dir, asked, server.url, 1, bad, bad)
            assert (answer.status_code, answer.json()["error"]) == (422, "invalid_evaluation"), bad
        assert _rows(server.data, "SELECT * FROM client_evaluations") == []
        assert _rows(server.data, "SELECT * FROM evaluations") == []

        receipt = apis[asked].post_evaluation(1, good)
        assert (receipt.client, receipt.num_examples) == (asked, 30)
        assert refused(asked, 1, good) == "duplicate_evaluation"
        assert _rows(server.data, "SELECT round, source, loss, accuracy, examples FROM evaluations") == [
            (1, "federated", 0.5, 0.8, 30)
        ]
        wait_for(lambda: b"federation finished" in server.log.read_bytes(), 30, "the federation to finish")
        overview = FedgeClient(server.url, pki.credentials(pki_dir, pki.Role.ADMIN, "ops")).overview()
        assert overview["evaluations"] == [{"round": 1, "accuracy": 0.8, "loss": 0.5, "source": "federated"}]
        assert overview["rounds"][0]["federated_examples"] == 30
    finally:
        for api in apis.values():
            api.close()


def test_a_simulation_shows_the_clients_figures_beside_the_central_ones(tmp_path: Path) -> None:
    """Each simulated client holds an even share of the held-out set, so together they hold all of it:
    their combined loss is the central evaluation's."""
    out = tmp_path / "run"
    done = subprocess.run(
        [sys.executable, "-m", "fedge", "simulate", "--dataset", "digits", "--clients", "3", "--rounds", "2",
         "--workers", "2", "--fraction-evaluate", "1", "--out", str(out), "--partition", "iid"],
        capture_output=True, text=True, timeout=600,
        env={**os.environ, "FEDGE_CONFIG": os.devnull, "COLUMNS": "200"},
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert "fed. accuracy" in done.stdout
    rounds = json.loads((out / "metrics.json").read_text())["rounds"]
    assert [r["round"] for r in rounds] == [1, 2]
    for r in rounds:
        assert r["federated_examples"] > 0
        assert r["federated_loss"] == pytest.approx(r["loss"], rel=1e-5)
        assert r["federated_accuracy"] == pytest.approx(r["accuracy"], rel=1e-6)  # float32 sums


@pytest.fixture(params=["sqlite", "postgresql"])
def store_url(request: pytest.FixtureRequest) -> str | None:
    return request.getfixturevalue("postgres_url") if request.param == "postgresql" else None


def test_a_restarted_server_keeps_the_ask_and_the_reports_and_says_finished_once_all_are_in(
    store_url: str | None, tmp_path: Path
) -> None:
    """The ask and every acknowledged report are in the store: a crash between two reports loses neither,
    and the restarted federation still refuses a second report from the same client."""
    events: list[RoundEvent] = []
    settings = FederationSettings(
        federation="edge", task="toy", rounds=1, min_updates=2, fraction_evaluate=1.0
    )

    def federation() -> Federation:
        return Federation(
            Store(tmp_path / "data", store_url), settings, lambda: ["alice", "bob"], encode(toy_model()),
            log=RoundLog(events.append),
        )  # fmt: skip

    first = federation()
    first.tick()
    submit(first, 1, "alice", update_body(1.0))
    submit(first, 1, "bob", update_body(3.0))
    ask = first.round_info().evaluate
    assert ask is not None
    assert (ask.round, ask.clients, ask.model_sha256) == (1, ["alice", "bob"], first.model.sha256)
    report = EvaluationReport(model_sha256=ask.model_sha256, loss=2.0, num_examples=10)
    first.evaluate(1, "alice", report, "sig", "nonce")
    assert Event.FINISHED not in [e.event for e in events]  # bob has not reported yet

    second = federation()
    assert second.round_info().evaluate == ask
    with pytest.raises(Rejected) as caught:
        second.evaluate(1, "alice", report, "sig", "nonce")
    assert caught.value.code == "duplicate_evaluation"
    second.evaluate(1, "bob", report.model_copy(update={"loss": 4.0, "num_examples": 30}), "sig", "nonce")
    assert [e.event for e in events].count(Event.FINISHED) == 1
    federated = [e for e in Store(tmp_path / "data", store_url).evaluations() if e.source == "federated"]
    assert [(e.round, e.loss, e.examples) for e in federated] == [(1, (2.0 * 10 + 4.0 * 30) / 40, 40)]


def test_a_store_made_when_every_evaluation_had_an_accuracy_takes_one_without_and_keeps_its_rows(
    store_url: str | None, tmp_path: Path
) -> None:
    made = Store(tmp_path / "data", store_url)
    made._execute("DROP TABLE evaluations")
    made._execute(
        "CREATE TABLE evaluations (round INTEGER NOT NULL, source TEXT NOT NULL,"
        " loss DOUBLE PRECISION NOT NULL, accuracy DOUBLE PRECISION NOT NULL, examples INTEGER NOT NULL,"
        " evaluated_at DOUBLE PRECISION NOT NULL, PRIMARY KEY (round, source))"
    )
    made.add_evaluation(Evaluation(1, "server", 0.5, 0.9, 100))
    made.close()
    reopened = Store(tmp_path / "data", store_url)
    reopened.add_evaluation(Evaluation(1, "federated", 0.7, None, 40))
    assert reopened.evaluations() == [
        Evaluation(1, "federated", 0.7, None, 40),
        Evaluation(1, "server", 0.5, 0.9, 100),
    ]
