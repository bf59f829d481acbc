"""The stateless functions a client runs: ``train`` and ``evaluate``, with the signature of a FaaS handler.

``event`` says what to do (server, credentials, round, data); ``context`` is what a warm instance may keep
between invocations (the model last downloaded, the data partition), never anything another client sent.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn

from fedge import compression, descriptors
from fedge.codec import Tensors, decode, encode, encode_hashed
from fedge.edge_functions import partition, tasks
from fedge.edge_functions.events import (
    CalibrateEvent,
    CalibrateResult,
    DataSpec,
    EvaluateEvent,
    EvaluateResult,
    InitialModelEvent,
    LocalData,
    TrainEvent,
    TrainResult,
)
from fedge.files import write_file
from fedge.security.pki import Credentials
from fedge.transport import FedgeClient
from fedge.wire import TrainConfig, UpdateMeta


class Hooks:
    """Where a host may step into a training run, to make this machine act as another device would (a
    simulation does: ``fedge.sim.worker``); here, at each, nothing happens."""

    def downloaded(self, size: int) -> None:
        """The model's ``size`` bytes arrived."""

    def trained(self, tensors: Tensors, base: Tensors) -> Tensors:
        """The update, once trained from ``base``: what is sent."""
        return tensors

    def ready(self, work_seconds: float, size: int) -> bool:
        """The update of ``size`` bytes is encoded after ``work_seconds`` of work: False holds it back."""
        return True


NO_HOOKS = Hooks()


@dataclass
class Context:
    """Warm state of one function instance."""

    model_sha256: str | None = None
    model_round: int = 0
    model: Tensors = field(default_factory=dict)
    partitions: dict[str, tuple[np.ndarray, np.ndarray]] = field(default_factory=dict)
    splits: partition.Splits = field(default_factory=partition.Splits)
    connections: dict[tuple[str, Path, int], FedgeClient] = field(default_factory=dict)

    def api(self, server: str, creds: Credentials) -> FedgeClient:
        """A client kept open across invocations, as warm FaaS instances keep theirs: the mutual TLS handshake
        is paid once per party, not once per round. A renewed certificate opens a new one. A worker serving
        thousands of simulated clients keeps the most recent ``CONNECTIONS_PER_WORKER``, so its descriptors
        (and the server's) stay bounded."""
        key = (server, creds.cert, creds.cert.stat().st_mtime_ns)
        api = self.connections.pop(key, None)
        if api is None:
            if len(self.connections) >= descriptors.CONNECTIONS_PER_WORKER:  # bounded: least recently used
                self.connections.pop(next(iter(self.connections))).close()
            api = FedgeClient(server, creds)
        self.connections[key] = api  # the most recently used last
        return api

    def fetch_model(self, api: FedgeClient, expected_sha256: str | None = None) -> int:
        """Bring the cached global model up to date; returns the bytes downloaded (0 on an ETag hit).
        When the round's announcement named the model and it is the one cached, nothing is asked."""
        if expected_sha256 is not None and expected_sha256 == self.model_sha256:
            return 0
        download = api.model(cached_sha256=self.model_sha256)
        if download is None:
            return 0
        self.model, _ = decode(download.body)
        self.model_sha256 = download.sha256
        self.model_round = download.round
        return len(download.body)

    def partition(self, task: tasks.Task, spec: DataSpec | LocalData) -> tuple[np.ndarray, np.ndarray]:
        key = f"{task.name}:{spec.model_dump_json()}"
        if isinstance(spec, LocalData):
            return self._local(key, spec.path)
        if key not in self.partitions:
            data = task.load_data()
            mine = self.splits.share(
                task.name, data.y_train, spec.num_clients, spec.partition, spec.seed, spec.index,
                data.groups_train,
            )  # fmt: skip
            self.partitions[key] = (data.x_train[mine], data.y_train[mine])
        return self.partitions[key]

    def _local(self, key: str, path: Path) -> tuple[np.ndarray, np.ndarray]:
        """A device's own file, read again only when it changed (its data may grow between rounds)."""
        stat = path.stat()
        stamped = f"{key}:{stat.st_mtime_ns}:{stat.st_size}"
        if stamped not in self.partitions:
            self.partitions = {k: v for k, v in self.partitions.items() if not k.startswith(key)}
            with np.load(path, allow_pickle=False) as arrays:
                self.partitions[stamped] = (arrays["x"].astype(np.float32), arrays["y"].astype(np.int64))
        return self.partitions[stamped]


def train(event: dict, context: Context, hooks: Hooks = NO_HOOKS) -> dict:
    """Train the current global model on this client's data and send the update; returns what happened
    (a ``TrainResult``)."""
    ev = TrainEvent.model_validate(event)
    started = time.perf_counter()
    task = tasks.get(ev.task)
    x, y = context.partition(task, ev.data)
    api = context.api(ev.server, ev.credentials.get())
    fetching = time.perf_counter()
    bytes_down = context.fetch_model(api, ev.model_sha256)
    hooks.downloaded(bytes_down)
    download_seconds = time.perf_counter() - fetching  # with bytes_down: the device's bandwidth
    model = task.build_model()
    tasks.load_tensors(model, context.model)
    if isinstance(ev.data, DataSpec):
        torch.manual_seed(ev.data.seed * 1_000_003 + ev.round * 1009 + ev.data.index)
    loss = fit(model, x, y, ev.config, max_steps=ev.max_steps)
    tensors = hooks.trained(tasks.tensors_of(model), context.model)
    tensors, how = compression.compress(tensors, context.model, ev.compression)
    examples = max(1, round(len(y) * ev.weight))
    meta = UpdateMeta(examples, loss, context.model_sha256 or "", how, steps=ev.max_steps)
    body, digest = encode_hashed(tensors, meta.to_metadata())
    delivered = hooks.ready(time.perf_counter() - started - download_seconds, len(body))  # not the network
    staleness = None
    if delivered and ev.outbox is None:
        staleness = api.post_update(ev.round, body, body_sha256=digest).staleness
    elif delivered:
        ev.outbox.mkdir(parents=True, exist_ok=True)
        write_file(ev.outbox / f"round-{ev.round}.safetensors", body)  # whole, or not at all
    return TrainResult(
        round=ev.round,
        num_examples=examples,
        staleness=staleness,
        loss=loss,
        bytes_up=len(body),
        bytes_down=bytes_down,
        download_seconds=download_seconds,
        seconds=time.perf_counter() - started,
    ).model_dump()


def calibrate(event: dict, context: Context) -> dict:
    """Time two short runs of different sizes on this device's data, with no server: the two points that
    seed the placement predictor's line before any round has run here."""
    ev = CalibrateEvent.model_validate(event)
    task = tasks.get(ev.task)
    x, y = context.partition(task, ev.data)
    small, large = timed_fits(task, x, y, ev.config, ev.steps)
    return CalibrateResult(points=(small, large)).model_dump()


def timed_fits(
    task: tasks.Task,
    x: np.ndarray,
    y: np.ndarray,
    config: TrainConfig,
    steps: tuple[int, ...],
    device: torch.device | None = None,
) -> list[tuple[int, float]]:
    """(steps, seconds) of a fresh model built, trained for each number of ``steps`` and encoded, after one
    warm-up step: first-call costs (allocation, kernel selection) are not per-step costs, but building and
    encoding the model are part of every round, so the line's intercept holds them."""
    fit(task.build_model(), x, y, config, device, max_steps=1)
    points = []
    for n in steps:
        started = time.perf_counter()
        model = task.build_model()
        fit(model, x, y, config, device, max_steps=n)
        encode(tasks.tensors_of(model))
        points.append((n, time.perf_counter() - started))
    return points


def evaluate(event: dict, context: Context) -> dict:
    """Accuracy and loss of the current global model on the task's held-out test set."""
    ev = EvaluateEvent.model_validate(event)
    task = tasks.get(ev.task)
    data = task.load_data()
    api = context.api(ev.server, ev.credentials.get())
    context.fetch_model(api)
    model = task.build_model()
    tasks.load_tensors(model, context.model)
    loss, accuracy = score(model, data.x_test, data.y_test)
    return EvaluateResult(
        model_sha256=context.model_sha256, round=context.model_round, loss=loss, accuracy=accuracy
    ).model_dump()


def initial_model(event: dict, _: Context) -> bytes:
    """A freshly initialized global model for the event's task, seeded, as a safetensors body."""
    ev = InitialModelEvent.model_validate(event)
    task = tasks.get(ev.task)
    return encode(task.initial_tensors(ev.seed), {"round": "0", "task": task.name})


def fit(
    model: nn.Module,
    x: np.ndarray,
    y: np.ndarray,
    config: TrainConfig,
    device: torch.device | None = None,
    max_steps: int | None = None,
) -> float:
    """Minibatch SGD with momentum, plus FedProx's proximal term when ``proximal_mu`` > 0 (it keeps the
    local model near the global one on skewed data); returns the mean training loss of the last epoch.
    ``device`` (an executor's GPU) moves the model and data there; the model stays there. ``max_steps``
    stops after that many minibatches in all, for a round the placement policy cut short."""
    inputs, targets = torch.from_numpy(x), torch.from_numpy(y)
    if device is not None:
        model.to(device)
        inputs, targets = inputs.to(device), targets.to(device)
    optimizer = torch.optim.SGD(model.parameters(), lr=config.learning_rate, momentum=0.9)
    anchor = [p.detach().clone() for p in model.parameters()]
    model.train()
    total = 0.0
    budget = config.local_epochs * -(-len(targets) // config.batch_size) if max_steps is None else max_steps
    seen = len(targets)
    for _ in range(config.local_epochs):
        if budget <= 0:
            break
        total, seen = 0.0, 0
        for batch in torch.randperm(len(targets)).split(config.batch_size)[:budget]:
            budget -= 1
            optimizer.zero_grad()
            loss = nn.functional.cross_entropy(model(inputs[batch]), targets[batch])
            if config.proximal_mu > 0:
                drift = sum(((p - a) ** 2).sum() for p, a in zip(model.parameters(), anchor, strict=True))
                loss = loss + config.proximal_mu / 2 * drift
            loss.backward()
            optimizer.step()
            total += loss.item() * len(batch)
            seen += len(batch)
    return total / max(seen, 1)


@torch.no_grad()
def score(model: nn.Module, x: np.ndarray, y: np.ndarray) -> tuple[float, float]:
    model.eval()
    logits = model(torch.from_numpy(x))
    targets = torch.from_numpy(y)
    loss = nn.functional.cross_entropy(logits, targets).item()
    return loss, (logits.argmax(dim=1) == targets).float().mean().item()


FUNCTIONS = {"train": train, "evaluate": evaluate, "initial_model": initial_model, "calibrate": calibrate}
