"""The task registry: what to train (a model) on what (a data set). The server never needs to know.

Built-in tasks are ``mnist`` and ``digits``. A package adds its own under the entry-point
group ``fedge.tasks``, pointing at a ``Task``; then ``--task NAME`` (server) or ``--dataset NAME``
(simulate) use it.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass
from importlib.metadata import entry_points

import numpy as np
import torch
from torch import nn

from fedge.codec import Tensors
from fedge.edge_functions import datasets, shakespeare


@dataclass(frozen=True)
class Task:
    name: str
    build_model: Callable[[], nn.Module]
    load_data: Callable[[], datasets.Dataset]

    def initial_tensors(self, seed: int) -> Tensors:
        torch.manual_seed(seed)
        return tensors_of(self.build_model())


def tensors_of(model: nn.Module) -> Tensors:
    return {name: t.detach().cpu().numpy() for name, t in model.state_dict().items()}


def load_tensors(model: nn.Module, tensors: Tensors) -> None:
    model.load_state_dict({name: torch.from_numpy(np.array(t)) for name, t in tensors.items()})


def mnist_cnn() -> nn.Module:
    """LeNet-5 as in Flower's quickstart: 44k parameters, fast on one core."""
    return nn.Sequential(
        nn.Conv2d(1, 6, 5),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(6, 16, 5),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(16 * 4 * 4, 120),
        nn.ReLU(),
        nn.Linear(120, 84),
        nn.ReLU(),
        nn.Linear(84, 10),
    )


def digits_cnn() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(1, 16, 3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(16 * 4 * 4, 64),
        nn.ReLU(),
        nn.Linear(64, 10),
    )


class CharLSTM(nn.Module):
    """Next-character model of LEAF's Shakespeare task, smaller (one 128-unit layer) for CPU rounds."""

    def __init__(
        self, vocabulary: int = len(shakespeare.ALPHABET), embedding: int = 8, hidden: int = 128
    ) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocabulary, embedding)
        self.lstm = nn.LSTM(embedding, hidden, batch_first=True)
        self.head = nn.Linear(hidden, vocabulary)

    def forward(self, codes: torch.Tensor) -> torch.Tensor:
        states, _ = self.lstm(self.embed(codes))
        return self.head(states[:, -1])


_BUILTIN = {
    "mnist": Task("mnist", mnist_cnn, functools.partial(datasets.load, "mnist")),
    "digits": Task("digits", digits_cnn, functools.partial(datasets.load, "digits")),
    "shakespeare": Task("shakespeare", CharLSTM, functools.partial(datasets.load, "shakespeare")),
}


class UnknownTask(LookupError):
    pass


@functools.cache
def get(name: str) -> Task:
    if name in _BUILTIN:
        return _BUILTIN[name]
    for entry in entry_points(group="fedge.tasks", name=name):
        task = entry.load()
        if isinstance(task, Task):
            return task
    raise UnknownTask(
        f"unknown task {name!r}: built in are {', '.join(_BUILTIN)}; others come from 'fedge.tasks'"
    )
