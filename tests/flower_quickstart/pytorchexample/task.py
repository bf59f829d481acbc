"""pytorchexample: a Flower / PyTorch app. The model, the data and the training loop."""

import functools

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset


class Net(nn.Module):
    """LeNet-5, as in Flower's quickstart, for 1x28x28 digits."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(1, 6, 5)
        self.pool = nn.MaxPool2d(2, 2)
        self.conv2 = nn.Conv2d(6, 16, 5)
        self.fc1 = nn.Linear(16 * 4 * 4, 120)
        self.fc2 = nn.Linear(120, 84)
        self.fc3 = nn.Linear(84, 10)

    def forward(self, x):
        x = self.pool(F.relu(self.conv1(x)))
        x = self.pool(F.relu(self.conv2(x)))
        x = x.view(-1, 16 * 4 * 4)
        x = F.relu(self.fc1(x))
        x = F.relu(self.fc2(x))
        return self.fc3(x)


@functools.cache
def _partition(partition_id: int, num_partitions: int):
    """Offline MNIST (fedge's demo data) instead of a download: an IID share, 80% train, 20% validation."""
    from fedge.edge_functions import datasets, partition

    data = datasets.load("mnist")
    mine = np.random.default_rng(partition_id).permutation(
        partition.split(data.y_train, num_partitions, "iid", 0)[partition_id]
    )
    x = torch.from_numpy(data.x_train[mine]).float()
    y = torch.from_numpy(data.y_train[mine]).long()
    cut = int(0.8 * len(y))
    return TensorDataset(x[:cut], y[:cut]), TensorDataset(x[cut:], y[cut:])


def load_data(partition_id: int, num_partitions: int, batch_size: int):
    """Load partition MNIST data."""
    train, test = _partition(partition_id, num_partitions)
    generator = torch.Generator().manual_seed(partition_id)
    return DataLoader(train, batch_size=batch_size, shuffle=True, generator=generator), DataLoader(
        test, batch_size=batch_size
    )


def train(net, trainloader, epochs, lr, device):
    """Train the model on the training set."""
    net.to(device)
    criterion = torch.nn.CrossEntropyLoss().to(device)
    optimizer = torch.optim.SGD(net.parameters(), lr=lr, momentum=0.9)
    net.train()
    running_loss = 0.0
    for _ in range(epochs):
        for images, labels in trainloader:
            optimizer.zero_grad()
            loss = criterion(net(images.to(device)), labels.to(device))
            loss.backward()
            optimizer.step()
            running_loss += loss.item()
    return running_loss / (epochs * len(trainloader))


def test(net, testloader, device):
    """Validate the model on the test set."""
    net.to(device)
    criterion = torch.nn.CrossEntropyLoss()
    correct, loss = 0, 0.0
    with torch.no_grad():
        for images, labels in testloader:
            outputs = net(images.to(device))
            loss += criterion(outputs, labels.to(device)).item()
            correct += (torch.max(outputs.data, 1)[1] == labels.to(device)).sum().item()
    accuracy = correct / len(testloader.dataset)
    return loss / len(testloader), accuracy
