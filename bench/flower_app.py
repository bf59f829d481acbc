"""The Flower side of two benchmarks.

``python -m bench flower-app``: one Flower app directory, unmodified (tests/flower_quickstart, the
quickstart layout in the Message API), run by Flower's own simulation runtime (what ``flwr run`` starts:
the app's pyproject config fused with ``--run-config``, clients as Ray actors) and by ``fedge simulate
--flower-app`` (mutual TLS, a server process, warm workers), in interleaved pairs, same clients, rounds and
run config. Per run: seconds per round (the interval between the ends of two consecutive rounds' client
evaluations; the first round, with each framework's start-up, apart), the evaluated accuracy per round
(every client evaluates, ``fraction-evaluate=1.0``, so both average the same clients) and peak memory.

``bench/vs_flower.py`` runs the same federated task in Flower (``main`` below): model, data, Dirichlet
partition, seed, optimizer and training loop are fedge's own (imported, not copied), so that the only
difference between the two runs is the framework. Each ClientApp uses one torch thread, as each fedge
worker does. Run as ``python -m bench.flower_app --clients N --rounds R --epochs E --out FILE``; it writes
the time at the end of every round (after the centralized evaluation) and the accuracies.
"""

from __future__ import annotations

import argparse
import functools
import itertools
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from flwr.app import ArrayRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid, ServerApp
from flwr.serverapp.strategy import FedAvg
from flwr.simulation import run_simulation

from bench.vs_flower import ROOT, sampled_run
from fedge.edge_functions import partition, tasks
from fedge.edge_functions.functions import fit, score
from fedge.wire import TrainConfig


@functools.cache
def client_data(task: str, spec: str, index: int, clients: int, seed: int) -> tuple:
    data = tasks.get(task).load_data()
    mine = partition.split(data.y_train, clients, spec, seed, data.groups_train)[index]
    return data.x_train[mine], data.y_train[mine]


def make_apps(args: argparse.Namespace, events: list[dict]) -> tuple[ServerApp, ClientApp]:
    clients, seed = args.clients, args.seed
    config = TrainConfig(local_epochs=args.epochs, learning_rate=args.lr)
    client_app = ClientApp()

    @client_app.train()
    def train(msg: Message, context: Context) -> Message:
        torch.set_num_threads(1)
        index = int(context.node_config["partition-id"])
        x, y = client_data(args.task, args.partition, index, clients, seed)
        model = tasks.get(args.task).build_model()
        model.load_state_dict(msg.content["arrays"].to_torch_state_dict())
        server_round = int(msg.content["config"]["server-round"])
        torch.manual_seed(seed * 1_000_003 + server_round * 1009 + index)
        loss = fit(model, x, y, config)
        metrics = MetricRecord({"train_loss": loss, "num-examples": len(y)})
        return Message(
            RecordDict({"arrays": ArrayRecord(model.state_dict()), "metrics": metrics}), reply_to=msg
        )

    server_app = ServerApp()

    @server_app.main()
    def main(grid: Grid, context: Context) -> None:
        task = tasks.get(args.task)
        test = task.load_data()

        def evaluate(server_round: int, arrays: ArrayRecord) -> MetricRecord:
            model = task.build_model()
            model.load_state_dict(arrays.to_torch_state_dict())
            loss, accuracy = score(model, test.x_test, test.y_test)
            events.append({"round": server_round, "time": time.time(), "accuracy": accuracy, "loss": loss})
            return MetricRecord({"accuracy": accuracy, "loss": loss})

        strategy = FedAvg(
            fraction_train=1.0,
            fraction_evaluate=0.0,
            min_train_nodes=clients,
            min_available_nodes=clients,
        )
        initial = ArrayRecord(_initial_state(task, seed))
        strategy.start(grid=grid, initial_arrays=initial, num_rounds=args.rounds, evaluate_fn=evaluate)

    return server_app, client_app


def _initial_state(task: tasks.Task, seed: int) -> dict:
    torch.manual_seed(seed)
    return task.build_model().state_dict()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--clients", type=int, required=True)
    parser.add_argument("--rounds", type=int, required=True)
    parser.add_argument("--epochs", type=int, required=True)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--task", default="mnist")
    parser.add_argument("--partition", default="dirichlet:0.5")
    parser.add_argument("--lr", type=float, default=TrainConfig().learning_rate)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    started = time.time()
    events: list[dict] = []
    server_app, client_app = make_apps(args, events)
    run_simulation(
        server_app=server_app,
        client_app=client_app,
        num_supernodes=args.clients,
        backend_config={"client_resources": {"num_cpus": 1, "num_gpus": 0.0}},
    )
    args.out.write_text(json.dumps({"started": started, "events": events}))


APP = ROOT / "tests" / "flower_quickstart"
FULL_APP = {"clients": 10, "rounds": 5, "pairs": 3, "workers": 2}
QUICK_APP = {"clients": 2, "rounds": 2, "pairs": 1, "workers": 2}


def run(quick: bool) -> dict:
    """Interleaved pairs: the order alternates, so that neither framework always runs on a warmer machine."""
    size = QUICK_APP if quick else FULL_APP
    runs: dict[str, list[dict]] = {"fedge": [], "flower": []}
    for pair in range(size["pairs"]):
        for framework in ("fedge", "flower") if pair % 2 == 0 else ("flower", "fedge"):
            runs[framework].append(_measure_app(framework, size))
    summary = {name: _summary(done) for name, done in runs.items()}
    return {"workload": size, "runs": runs, "summary": summary}


def _measure_app(framework: str, size: dict) -> dict:
    run_config = f"num-server-rounds={size['rounds']} fraction-evaluate=1.0"
    with tempfile.TemporaryDirectory(prefix=f"bench-app-{framework}-") as tmp:
        out = Path(tmp)
        if framework == "fedge":
            command = [
                sys.executable, "-m", "fedge", "simulate", "--flower-app", str(APP), "--clients",
                str(size["clients"]), "--workers", str(size["workers"]), "--run-config", run_config,
                "--out", str(out),
            ]  # fmt: skip
        else:
            command = [
                sys.executable, "-c", "from bench.flower_app import flower_run; flower_run()", str(APP),
                str(size["clients"]), str(size["workers"]), run_config, str(out / "flower.json"),
            ]  # fmt: skip
        started, sampler = sampled_run(command, framework, timeout=3600)
        if framework == "fedge":
            rounds = json.loads((out / "metrics.json").read_text())["rounds"]
        else:
            rounds = json.loads((out / "flower.json").read_text())["rounds"]
    ends = [started] + [r["ended"] for r in rounds]
    durations = [b - a for a, b in itertools.pairwise(ends)]
    return {
        "first_round_seconds": durations[0],
        "seconds_per_round": statistics.median(durations[1:]) if len(durations) > 1 else durations[0],
        "accuracy_per_round": [r["accuracy"] for r in rounds],
        "peak_rss_mb": sampler.peak_total / 2**20,
    }


def _summary(done: list[dict]) -> dict:
    """min/median/max over the runs of each figure."""

    def spread(values: list[float]) -> dict:
        return {"min": min(values), "median": statistics.median(values), "max": max(values)}

    return {
        "seconds_per_round": spread([d["seconds_per_round"] for d in done]),
        "first_round_seconds": spread([d["first_round_seconds"] for d in done]),
        "peak_rss_mb": spread([d["peak_rss_mb"] for d in done]),
        "final_accuracy": spread([d["accuracy_per_round"][-1] for d in done]),
    }


def flower_run() -> None:
    """One run of the app by Flower's simulation runtime, as ``flwr run`` starts it for a local simulation
    (the app's config fused with the run config, for the ServerApp and every ClientApp). Only a clock is
    added: the end of each round's client evaluation (the strategy's ``aggregate_evaluate``)."""
    from flwr.app import Context as FlowerContext
    from flwr.app import RecordDict
    from flwr.common.config import get_fused_config_from_dir
    from flwr.common.constant import RUN_ID_NUM_BYTES, SUPERLINK_NODE_ID, TASK_ID_NUM_BYTES
    from flwr.server.superlink.linkstate.utils import generate_rand_int_from_bytes
    from flwr.serverapp.strategy import FedAvg as FlowerFedAvg
    from flwr.simulation.run_simulation import _run_simulation
    from flwr.supercore.constant import NOOP_FEDERATION_ID
    from flwr.supercore.run import Run
    from flwr.supercore.task_identity import TaskIdentity
    from flwr.supercore.telemetry import EventType

    from fedge.edge_functions.adapters import flower
    from fedge.edge_functions.app import parse_run_config

    directory, clients, workers, run_config_text, out = sys.argv[1:6]
    overrides = parse_run_config(run_config_text)
    rounds: list[dict] = []
    evaluate = FlowerFedAvg.aggregate_evaluate

    def timed(self, server_round, replies):  # type: ignore[no-untyped-def]
        metrics = evaluate(self, server_round, replies)
        accuracy = None if metrics is None else metrics.get("eval_acc")
        rounds.append({"round": server_round, "ended": time.time(), "accuracy": accuracy})
        return metrics

    FlowerFedAvg.aggregate_evaluate = timed  # type: ignore[method-assign]
    run_record = Run.create_empty(generate_rand_int_from_bytes(RUN_ID_NUM_BYTES))
    run_record.primary_task_id = generate_rand_int_from_bytes(TASK_ID_NUM_BYTES)
    run_record.federation_id = NOOP_FEDERATION_ID
    run_record.override_config = overrides
    TaskIdentity.task_id = 1  # as Flower's own run_simulation() sets it up
    TaskIdentity.run_id = run_record.run_id
    TaskIdentity.node_id = SUPERLINK_NODE_ID
    fused = get_fused_config_from_dir(Path(directory), overrides)
    context = FlowerContext(run_record.run_id, 0, {}, RecordDict(), fused)
    project = flower.read_project(Path(directory))
    sys.path.insert(0, directory)
    _run_simulation(
        num_supernodes=int(clients), exit_event=EventType.FLWR_SIMULATION_RUN_LEAVE,
        client_app_attr=project.clientapp, server_app_attr=project.serverapp, app_dir=directory,
        run=run_record, server_app_context=context, is_app=True,
        backend_config={"client_resources": {"num_cpus": 1, "num_gpus": 0.0},
                        "init_args": {"num_cpus": int(workers)}},
    )  # fmt: skip
    Path(out).write_text(json.dumps({"rounds": rounds}))


def render(result: dict) -> str:
    w, summary = result["workload"], result["summary"]
    lines = [
        f"tests/flower_quickstart (Flower's quickstart layout, Message API, LeNet on offline MNIST), "
        f"{w['clients']} clients, {w['rounds']} rounds, every client evaluating; {w['workers']} clients "
        f"train at a time in both; {w['pairs']} interleaved pair(s), min / median / max.",
        "",
        "| | fedge simulate --flower-app | Flower simulation |",
        "|---|---:|---:|",
    ]
    for label, key, fmt in (
        ("seconds per round (median after round 1)", "seconds_per_round", "{:.2f}"),
        ("first round, with start-up (s)", "first_round_seconds", "{:.1f}"),
        ("final accuracy", "final_accuracy", "{:.3f}"),
        ("peak memory, whole run (MB)", "peak_rss_mb", "{:.0f}"),
    ):
        cells = [
            " / ".join(fmt.format(summary[name][key][k]) for k in ("min", "median", "max"))
            for name in ("fedge", "flower")
        ]
        lines.append(f"| {label} | {cells[0]} | {cells[1]} |")
    lines += ["", "Accuracy per round (first pair):", "", "| round | fedge | Flower |", "|---:|---:|---:|"]
    first = [result["runs"][name][0]["accuracy_per_round"] for name in ("fedge", "flower")]
    for i, (a, b) in enumerate(zip(*first, strict=False), 1):
        lines.append(f"| {i} | {_acc(a)} | {_acc(b)} |")
    return "\n".join(lines)


def _acc(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f}"


if __name__ == "__main__":
    main()
