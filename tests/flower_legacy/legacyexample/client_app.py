"""legacyexample: the ClientApp from a client_fn, as Flower quickstarts were before the Message API."""

from collections import OrderedDict

import torch
from flwr.client import ClientApp, NumPyClient
from flwr.common import Context

from legacyexample.task import Net, load_data, test, train


def get_weights(net):
    return [val.cpu().numpy() for _, val in net.state_dict().items()]


def set_weights(net, parameters):
    state_dict = OrderedDict(
        {k: torch.tensor(v) for k, v in zip(net.state_dict().keys(), parameters, strict=True)}
    )
    net.load_state_dict(state_dict, strict=True)


class FlowerClient(NumPyClient):
    def __init__(self, net, trainloader, valloader, local_epochs, lr):
        self.net, self.trainloader, self.valloader = net, trainloader, valloader
        self.local_epochs, self.lr = local_epochs, lr

    def fit(self, parameters, config):
        set_weights(self.net, parameters)
        train_loss = train(self.net, self.trainloader, self.local_epochs, self.lr, "cpu")
        return get_weights(self.net), len(self.trainloader.dataset), {"train_loss": train_loss}

    def evaluate(self, parameters, config):
        set_weights(self.net, parameters)
        loss, accuracy = test(self.net, self.valloader, "cpu")
        return loss, len(self.valloader.dataset), {"accuracy": accuracy}


def client_fn(context: Context):
    partition_id = context.node_config["partition-id"]
    num_partitions = context.node_config["num-partitions"]
    trainloader, valloader = load_data(partition_id, num_partitions, context.run_config["batch-size"])
    local_epochs, lr = context.run_config["local-epochs"], context.run_config["learning-rate"]
    return FlowerClient(Net(), trainloader, valloader, local_epochs, lr).to_client()


app = ClientApp(client_fn)
