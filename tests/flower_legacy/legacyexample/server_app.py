"""legacyexample: the ServerApp from a server_fn, with metrics aggregation functions."""

import torch
from flwr.common import Context, ndarrays_to_parameters
from flwr.server import ServerApp, ServerAppComponents, ServerConfig
from flwr.server.strategy import FedAvg

from legacyexample.client_app import get_weights
from legacyexample.task import Net


def weighted_average(metrics):
    accuracies = [num_examples * m["accuracy"] for num_examples, m in metrics]
    examples = [num_examples for num_examples, _ in metrics]
    return {"accuracy": sum(accuracies) / sum(examples)}


def largest_loss(metrics):
    """Not a mean, so that a test can tell the app's own aggregation from fedge's default."""
    return {"train_loss": max(m["train_loss"] for _, m in metrics)}


def server_fn(context: Context):
    torch.manual_seed(0)
    strategy = FedAvg(
        fraction_fit=1.0,
        fraction_evaluate=context.run_config["fraction-evaluate"],
        initial_parameters=ndarrays_to_parameters(get_weights(Net())),
        evaluate_metrics_aggregation_fn=weighted_average,
        fit_metrics_aggregation_fn=largest_loss,
    )
    return ServerAppComponents(
        strategy=strategy, config=ServerConfig(num_rounds=context.run_config["num-server-rounds"])
    )


app = ServerApp(server_fn=server_fn)
