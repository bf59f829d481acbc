"""The same federated task run by Flower's simulation (FedAvg), for ``bench/vs_flower.py``.

Model, data, Dirichlet partition, seed, optimizer and training loop are fedge's own (imported, not copied),
so that the only difference between the two runs is the framework. Each ClientApp uses one torch thread, as
each fedge worker does. Run as ``python -m bench.flower_app --clients N --rounds R --epochs E --out FILE``;
it writes the time at the end of every round (after the centralized evaluation) and the accuracies.
"""

from __future__ import annotations

import argparse
import functools
import json
import time
from pathlib import Path

import torch
from flwr.app import ArrayRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid, ServerApp
from flwr.serverapp.strategy import FedAvg
from flwr.simulation import run_simulation

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


if __name__ == "__main__":
    main()
