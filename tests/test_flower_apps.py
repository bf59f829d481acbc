"""Flower apps, unmodified: the quickstart layout in the Message API (tests/flower_quickstart) and in the
older client_fn/server_fn style (tests/flower_legacy), simulated and hosted by an agent; what fedge cannot
honour of a ServerApp, or a pyproject without components, refused in one line."""

from __future__ import annotations

import json
import textwrap
from pathlib import Path

import pytest
from conftest import wait_for
from test_service import stored_updates
from test_simulate import run_cli

from fedge.edge_functions import app, functions
from fedge.edge_functions.adapters import flower
from fedge.edge_functions.app import AppContext

HERE = Path(__file__).resolve().parent
QUICKSTART = HERE / "flower_quickstart"
LEGACY = HERE / "flower_legacy"


def test_the_legacy_client_fn_app_trains_and_its_servers_aggregation_functions_are_used() -> None:
    project = flower.load(LEGACY)
    plan = project.plan({})
    assert (plan.num_rounds, plan.fraction_train, plan.fraction_evaluate) == (2, 1.0, 1.0)
    assert sorted(plan.initial)[:2] == ["0000", "0001"]  # the NumPyClient's order, kept by the names
    context = AppContext(0, 4, dict(project.defaults), {})
    trained = app.checked_train(
        project.app.train(plan.initial, None, {"server-round": 1}, context), plan.initial
    )
    assert trained.num_examples == 800  # 80% of an IID quarter of the 4,000 training digits
    assert trained.metrics["train_loss"] > 0
    scored = app.checked_evaluate(project.app.evaluate(trained.params, None, {"server-round": 1}, context))
    assert 0.0 <= scored.metrics["accuracy"] <= 1.0
    assert plan.aggregate_train([(10, {"train_loss": 1.0}), (30, {"train_loss": 3.0})]) == {"train_loss": 3.0}
    assert plan.aggregate_evaluate([(10, {"accuracy": 1.0}), (30, {"accuracy": 0.0})]) == {"accuracy": 0.25}


def _app_dir(tmp_path: Path, components: str, server: str = "", module: str = "odd_server") -> Path:
    """An app directory; each test's ``module`` has its own name, as a module is imported once a process."""
    (tmp_path / "pyproject.toml").write_text(
        f"[tool.flwr.app.components]\n{components}\n[tool.flwr.app.config]\nnum-server-rounds = 1\n"
    )
    (tmp_path / f"{module}.py").write_text(textwrap.dedent(server))
    return tmp_path


@pytest.mark.parametrize(
    ("components", "message"),
    [
        ('clientapp = "a:app"', "names no serverapp in [tool.flwr.app.components]"),
        ("", "names no clientapp and no serverapp in [tool.flwr.app.components]"),
    ],
)
def test_a_pyproject_without_components_is_refused_naming_what_is_missing(
    tmp_path: Path, components: str, message: str
) -> None:
    with pytest.raises(flower.FlowerAppError) as refused:
        flower.read_project(_app_dir(tmp_path, components))
    assert message in str(refused.value)


@pytest.mark.parametrize(
    ("server", "message"),
    [
        (
            """
            from flwr.app import ArrayRecord
            from flwr.serverapp import ServerApp
            from flwr.serverapp.strategy import FedAdagrad
            import numpy as np
            app = ServerApp()
            @app.main()
            def main(grid, context):
                FedAdagrad().start(grid=grid, initial_arrays=ArrayRecord([np.zeros(2)]), num_rounds=1)
            """,
            "strategy FedAdagrad is not supported: fedge honours FedAvg and FedProx",
        ),
        (
            """
            from flwr.serverapp import ServerApp
            app = ServerApp()
            @app.main()
            def main(grid, context):
                grid.send_and_receive([])
            """,
            "the ServerApp calls grid.send_and_receive itself",
        ),
        (
            """
            from flwr.app import ArrayRecord
            from flwr.serverapp import ServerApp
            from flwr.serverapp.strategy import FedAvg
            import numpy as np
            app = ServerApp()
            @app.main()
            def main(grid, context):
                FedAvg().start(grid=grid, initial_arrays=ArrayRecord([np.zeros(2)]), evaluate_fn=print)
            """,
            "strategy.start(evaluate_fn=...) is not supported",
        ),
    ],
)
def test_what_fedge_cannot_honour_of_a_server_app_is_refused_by_name(
    tmp_path: Path, server: str, message: str
) -> None:
    module = f"odd_server_{abs(hash(message))}"
    directory = _app_dir(tmp_path, f'clientapp = "{module}:app"\nserverapp = "{module}:app"', server, module)
    with pytest.raises(flower.FlowerAppError, match=message.replace("(", r"\(").replace(")", r"\)")):
        flower.read_project(directory).plan({})


def test_simulate_refuses_a_flower_app_without_components_in_one_line(tmp_path: Path) -> None:
    (tmp_path / "app").mkdir()
    directory = _app_dir(tmp_path / "app", "")
    done = run_cli("simulate", "--flower-app", str(directory), "--clients", "2", "--out", str(tmp_path / "o"))
    assert done.returncode == 1
    assert "names no clientapp and no serverapp" in done.stderr
    assert "Traceback" not in done.stderr


def test_the_quickstart_app_runs_unmodified_under_fedge_simulate(tmp_path: Path) -> None:
    """Message API client and server; --run-config overrides the app's own config, as under flwr run."""
    out = tmp_path / "run"
    done = run_cli(
        "simulate", "--flower-app", str(QUICKSTART), "--clients", "2", "--workers", "2",
        "--run-config", "num-server-rounds=2 fraction-evaluate=1.0", "--out", str(out),
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    rounds = json.loads((out / "metrics.json").read_text())["rounds"]
    assert [r["round"] for r in rounds] == [1, 2]  # num-server-rounds from the run config
    assert all(r["updates"] == 2 for r in rounds)
    assert all(r["train_metrics"]["train_loss"] > 0 for r in rounds)  # the clients' fit metrics, per round
    assert rounds[1]["evaluate_metrics"]["eval_acc"] == rounds[1]["accuracy"]
    assert rounds[1]["accuracy"] > 0.6  # the clients' own held-out digits, evaluated by their evaluate()
    assert rounds[1]["loss"] < rounds[0]["loss"]


def test_an_agent_hosts_the_flower_client_of_an_app_directory(
    start_task_server, start_agent, pki_dir: Path, tmp_path: Path
) -> None:
    initial = tmp_path / "initial.safetensors"
    spec = f"flower:{LEGACY}"
    initial.write_bytes(functions.initial_model({"task": "flower", "app": spec}, functions.Context()))
    server = start_task_server(pki_dir, "--init-model", str(initial), task="flower")
    (tmp_path / "unused.csv").write_text("a,label\n0,0\n")  # the Flower client reads its own partition
    agent = start_agent(
        pki_dir, "alice", tmp_path / "unused.csv", server.url, "--flower-app", str(LEGACY),
        "--node-config", "partition-id=1 num-partitions=4",
    )  # fmt: skip
    wait_for(lambda: (1, "alice") in stored_updates(server.data), 240, "alice's update of round 1")
    agent.stop()
