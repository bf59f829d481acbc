"""The client app contract: a user's own train/evaluate run by the functions every host runs, what an app
returns checked before anything leaves the device, and a device's data in the files an owner has."""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from conftest import wait_for
from PIL import Image
from test_service import stored_updates
from test_simulate import run_cli
from test_skip import skips_of

from fedge.codec import decode
from fedge.edge_functions import app, datafiles, functions
from fedge.edge_functions.app import AppContext, AppFailed, Result
from fedge.edge_functions.functions import Context
from fedge.security import pki
from fedge.wire import MetadataError, UpdateMeta

HERE = Path(__file__).resolve().parent
MODEL = {"layer.weight": np.zeros((4, 3), np.float32), "layer.bias": np.zeros(3, np.float32)}


class ToyApp:
    """A NumPy-only app for the toy model (4 features, 3 classes): gradient-free, a step on each tensor."""

    def __init__(self, returns: dict | None = None) -> None:
        self.returns = returns or {}

    def train(self, params, data, config, context) -> Result:
        x, _ = data
        stepped = {name: value + 0.5 for name, value in params.items()}
        return Result(
            params=self.returns.get("params", stepped),
            num_examples=self.returns.get("num_examples", len(x)),
            metrics=self.returns.get("metrics", {"train_loss": 0.25, "round": config["server-round"]}),
        )

    def evaluate(self, params, data, config, context) -> Result:
        x, y = data
        logits = x @ params["layer.weight"] + params["layer.bias"]  # the wrong input shape fails here
        return Result(loss=float(np.abs(logits).mean()), num_examples=len(y), metrics={"accuracy": 0.5})


class RaisingApp(ToyApp):
    def train(self, params, data, config, context) -> Result:
        raise MemoryError("CUDA out of memory.\nTried to allocate 2.00 GiB")


class SoftmaxDigits:
    """Multinomial logistic regression in plain NumPy: an app with no torch, trained by fedge's hosts."""

    def initial_params(self) -> dict:
        return {"w": np.zeros((64, 10), np.float32), "b": np.zeros(10, np.float32)}

    def train(self, params, data, config, context) -> Result:
        x, y = data[0].reshape(len(data[0]), -1), data[1]
        w, b = params["w"].copy(), params["b"].copy()
        for _ in range(20):
            p = _softmax(x @ w + b)
            p[np.arange(len(y)), y] -= 1
            w -= config["learning_rate"] * x.T @ p / len(y)
            b -= config["learning_rate"] * p.mean(axis=0)
        return Result({"w": w, "b": b}, len(y), {"train_loss": _loss(x, y, w, b)})

    def evaluate(self, params, data, config, context) -> Result:
        x, y = data[0].reshape(len(data[0]), -1), data[1]
        logits = x @ params["w"] + params["b"]
        accuracy = float((logits.argmax(axis=1) == y).mean())
        return Result(
            loss=_loss(x, y, params["w"], params["b"]), num_examples=len(y), metrics={"accuracy": accuracy}
        )

    def load_test_data(self):
        from fedge.edge_functions import datasets

        test = datasets.load("digits")
        return test.x_test, test.y_test


def _softmax(logits: np.ndarray) -> np.ndarray:
    shifted = np.exp(logits - logits.max(axis=1, keepdims=True))
    return shifted / shifted.sum(axis=1, keepdims=True)


def _loss(x: np.ndarray, y: np.ndarray, w: np.ndarray, b: np.ndarray) -> float:
    return float(-np.log(_softmax(x @ w + b)[np.arange(len(y)), y] + 1e-9).mean())


GOOD = ToyApp()
NUMPY_DIGITS = SoftmaxDigits()
WRONG_SHAPE = ToyApp({"params": {**MODEL, "layer.bias": np.zeros(4, np.float32)}})
RAISES = RaisingApp()


def test_a_result_that_fits_the_model_passes_and_a_float64_update_is_cast_to_the_models_dtype() -> None:
    doubled = {name: value.astype(np.float64) + 1 for name, value in MODEL.items()}
    checked = app.checked_train(Result(doubled, np.int64(5), {"loss": np.float32(0.5), "ok": True}), MODEL)
    assert {name: value.dtype for name, value in checked.params.items()} == {
        "layer.weight": np.float32,
        "layer.bias": np.float32,
    }
    assert checked.num_examples == 5
    assert type(checked.num_examples) is int
    assert checked.metrics == {"loss": 0.5, "ok": True}


@pytest.mark.parametrize(
    ("result", "message"),
    [
        (Result({**MODEL, "layer.bias": np.zeros(4)}, 5), "'layer.bias' of shape (4,), the model's is (3,)"),
        (Result({"layer.weight": MODEL["layer.weight"]}, 5), "missing ['layer.bias']"),
        (Result({**MODEL, "extra": np.zeros(1)}, 5), "unexpected ['extra']"),
        (Result({**MODEL, "layer.bias": np.array([0, np.inf, 0], np.float32)}, 5), "non-finite values"),
        (Result({**MODEL, "layer.bias": np.array(["a", "b", "c"])}, 5), "as <U1, the model's is float32"),
        (Result(MODEL, 5.0), "num_examples 5.0, not a whole number"),
        (Result(MODEL, True), "num_examples True, not a whole number"),
        (Result(MODEL, 0), "num_examples 0: it must be positive"),
        (Result(MODEL, 5, {"loss": [1.0, 2.0]}), "metric 'loss' = [1.0, 2.0]: metrics are scalars"),
        (Result(MODEL, 5, {"loss": float("nan")}), "metric 'loss' = nan, not finite"),
        (Result(None, 5), "returned no params"),
        ((MODEL, 5, {}), "returned tuple, not a fedge Result"),
    ],
)
def test_a_result_that_cannot_be_an_update_is_refused_in_one_line(result: object, message: str) -> None:
    with pytest.raises(AppFailed) as refused:
        app.checked_train(result, MODEL)
    assert message in str(refused.value)
    assert "\n" not in str(refused.value)


def test_an_evaluation_needs_a_finite_loss() -> None:
    assert app.checked_evaluate(Result(loss=np.float32(0.5), num_examples=3)).loss == 0.5
    with pytest.raises(AppFailed, match="loss nan, not a finite number"):
        app.checked_evaluate(Result(loss=float("nan"), num_examples=3))


def test_what_an_app_raises_becomes_its_type_and_first_line() -> None:
    with pytest.raises(AppFailed) as failed:
        app.run(lambda: RAISES.train(MODEL, None, {}, AppContext()), "train")
    assert str(failed.value) == "the app's train raised MemoryError: CUDA out of memory."


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("test_apps:MISSING", "module 'test_apps' has no 'MISSING'"),
        ("no_such_module_here:app", "cannot import the app module 'no_such_module_here'"),
        ("test_apps:MODEL", "has no train(params, data, config, context) function"),
        ("nonsense", "unknown app 'nonsense'"),
    ],
)
def test_an_app_that_cannot_be_found_is_named_in_one_line(spec: str, message: str) -> None:
    with pytest.raises(app.AppError, match=message.replace("(", r"\(").replace(")", r"\)")):
        functions.load_app(spec)


def test_the_built_in_tasks_are_apps_on_the_same_contract() -> None:
    digits = functions.load_app("digits")
    params = digits.initial_params()
    x, y = digits.load_data(AppContext(0, 4, {"partition": "iid", "seed": 0}))
    trained = app.checked_train(
        digits.train(params, (x, y), functions.app_config(_config(), 1), None), params
    )
    assert trained.num_examples == len(y)
    assert "train_loss" in trained.metrics
    scored = app.checked_evaluate(digits.evaluate(trained.params, digits.load_test_data(), {}, None))
    assert 0.0 <= scored.metrics["accuracy"] <= 1.0


def _config():
    from fedge.wire import TrainConfig

    return TrainConfig(local_epochs=1)


def test_run_config_pairs_are_toml_values_and_a_bare_word_is_a_string() -> None:
    assert app.parse_run_config("lr=0.1 rounds=3 fast=true mode=iid") == {
        "lr": 0.1, "rounds": 3, "fast": True, "mode": "iid",
    }  # fmt: skip
    with pytest.raises(app.AppError, match="key=value pairs, not 'lr'"):
        app.parse_run_config("lr")


def test_a_csv_takes_its_label_from_the_column_named_or_else_the_last(tmp_path: Path) -> None:
    path = tmp_path / "d.csv"
    path.write_text("a,label,b\n1,0,2\n3,1,4\n")
    x, y = datafiles.load(path, "label")
    assert x.tolist() == [[1, 2], [3, 4]]
    assert y.tolist() == [0, 1]
    x, y = datafiles.load(path)
    assert x.tolist() == [[1, 0], [3, 1]]
    assert y.tolist() == [2, 4]
    with pytest.raises(datafiles.DataError, match="has no column 'kind': its columns are a, label, b"):
        datafiles.load(path, "kind")
    path.write_text("a,label\n1,cat\n")
    with pytest.raises(datafiles.DataError, match="every value must be a number"):
        datafiles.load(path)


def test_a_folder_of_class_folders_is_images_and_labels_in_sorted_class_order(tmp_path: Path) -> None:
    for index, name in enumerate(("cat", "dog")):
        (tmp_path / name).mkdir()
        Image.fromarray(np.full((8, 8), 255 * index, np.uint8)).save(tmp_path / name / "a.png")
    x, y = datafiles.load(tmp_path)
    assert x.shape == (2, 1, 8, 8)
    assert x.dtype == np.float32
    assert y.tolist() == [0, 1]
    assert x[1].max() == 1.0
    Image.fromarray(np.zeros((4, 4), np.uint8)).save(tmp_path / "dog" / "b.png")
    with pytest.raises(datafiles.DataError, match="images differ in size"):
        datafiles.load(tmp_path)


def _event(server, pki_dir: Path, client: str, data: Path, spec: str) -> dict:
    creds = pki.credentials(pki_dir, pki.Role.CLIENT, client)
    return {
        "server": server.url,
        "credentials": {"ca": str(creds.ca), "cert": str(creds.cert), "key": str(creds.key)},
        "task": "toy",
        "round": 1,
        "config": {"local_epochs": 1},
        "data": {"path": str(data)},
        "app": spec,
    }


def _toy_csv(path: Path, features: int = 4) -> Path:
    rows = [",".join(map(str, [*range(features), i % 3])) for i in range(6)]
    path.write_text(",".join(f"f{i}" for i in range(features)) + ",label\n" + "\n".join(rows) + "\n")
    return path


def test_a_users_app_trains_through_the_functions_and_its_metrics_travel_in_the_update(
    start_server, connect, pki_dir: Path, tmp_path: Path
) -> None:
    server = start_server()
    data = _toy_csv(tmp_path / "toy.csv")
    wait_for(lambda: connect(server, "alice").current_round().state == "open", 30, "round 1")
    done = functions.train(_event(server, pki_dir, "alice", data, "test_apps:GOOD"), Context())
    assert done["num_examples"] == 6
    assert done["metrics"] == {"train_loss": 0.25, "round": 1.0}
    assert stored_updates(server.data) == [(1, "alice")]
    for spec, message in [
        ("test_apps:WRONG_SHAPE", "'layer.bias' of shape (4,), the model's is (3,)"),
        ("test_apps:RAISES", "raised MemoryError: CUDA out of memory."),
    ]:
        with pytest.raises(AppFailed, match=message.replace("(", r"\(").replace(")", r"\)")):
            functions.train(_event(server, pki_dir, "bob", data, spec), Context())
    assert stored_updates(server.data) == [(1, "alice")]  # nothing of the failed apps
    (stored,) = (server.data / "updates" / "1").glob("alice.*.safetensors")
    _, metadata = decode(stored.read_bytes())
    assert UpdateMeta.from_metadata(metadata).metrics == {"round": 1.0, "train_loss": 0.25}


def _agent_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """The agent's worker imports the test's apps from here, as an owner's app is on its path."""
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(HERE), *sys.path]))


def test_an_agent_whose_app_fails_sends_the_skip_notice_with_the_apps_line(
    start_server, start_agent, pki_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _agent_env(monkeypatch)
    server = start_server("--round-timeout", "3600")
    data = _toy_csv(tmp_path / "toy.csv")
    agents = [
        start_agent(pki_dir, name, data, server.url, "--app", spec)
        for name, spec in (
            ("alice", "test_apps:GOOD"),
            ("bob", "test_apps:RAISES"),
            ("carol", "test_apps:GOOD"),
        )
    ]
    started = time.time()
    wait_for(lambda: skips_of(server), 180, "bob's skip notice")
    ((round_, client, reason),) = skips_of(server)[:1]
    assert (round_, client) == (1, "bob")
    assert reason == "failed on the device: the app's train raised MemoryError: CUDA out of memory."
    wait_for(lambda: (1, "carol") in stored_updates(server.data), 120, "the others' updates")
    assert (1, "bob") not in stored_updates(server.data)
    assert time.time() - started < 600  # the round did not wait for its hour-long deadline
    for agent in agents:
        agent.stop()


def test_data_that_does_not_fit_the_app_stops_the_agent_at_start_in_one_line(
    start_server, start_agent, pki_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _agent_env(monkeypatch)
    server = start_server()
    agent = start_agent(
        pki_dir, "alice", _toy_csv(tmp_path / "wide.csv", 5), server.url, "--app", "test_apps:GOOD"
    )
    assert agent.process.wait(120) == 1
    last = agent.log.read_text().strip().splitlines()[-1]
    assert "the data does not fit the app 'test_apps:GOOD'" in last
    assert "matmul" in last
    assert "Traceback" not in agent.log.read_text()
    assert stored_updates(server.data) == []


def test_simulate_runs_a_numpy_app_on_its_clients_and_evaluates_it_centrally(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _agent_env(monkeypatch)
    out = tmp_path / "run"
    done = run_cli(
        "simulate", "--app", "test_apps:NUMPY_DIGITS", "--dataset", "digits", "--partition", "iid",
        "--clients", "2", "--rounds", "2", "--workers", "2", "--lr", "0.5", "--out", str(out),
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    rounds = json.loads((out / "metrics.json").read_text())["rounds"]
    assert rounds[-1]["accuracy"] > 0.8  # softmax regression on 8x8 digits, by the app's own evaluate
    assert all(r["train_metrics"]["train_loss"] > 0 for r in rounds)


@pytest.mark.parametrize(
    "text",
    ["not json", '{"loss": NaN}', '{"loss": [1]}', '{"loss": true}', '{"loss": 1e999}', "[1]", "1" * 99],
)
def test_an_updates_metrics_that_are_not_finite_numbers_are_refused(text: str) -> None:
    with pytest.raises(MetadataError, match="metrics must be a JSON object of name -> finite number"):
        UpdateMeta.from_metadata({"num_examples": "3", "metrics": text})
    assert UpdateMeta.from_metadata({"num_examples": "3", "metrics": '{"a": 2}'}).metrics == {"a": 2.0}
