"""The stateless functions a client runs: ``train`` and ``evaluate``, with the signature of a FaaS handler.

Each runs the client's app (``fedge.edge_functions.app``): a user's own, a Flower app, or a task, which is
an app of fedge's own SGD loop (``TaskApp``). One path, whoever hosts it.

``event`` says what to do (server, credentials, round, data); ``context`` is what a warm instance may keep
between invocations (the model last downloaded, the data partition), never anything another client sent.
"""

from __future__ import annotations

import functools
import resource
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import torch
from torch import nn

from fedge import compression, descriptors, pricing
from fedge.codec import Tensors, decode, encode, encode_hashed
from fedge.edge_functions import app, datafiles, partition, tasks
from fedge.edge_functions.app import App, AppContext, Result
from fedge.edge_functions.datafiles import Examples
from fedge.edge_functions.events import (
    AppData,
    CalibrateEvent,
    CalibrateResult,
    CheckDataEvent,
    CheckDataResult,
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
from fedge.transport import FedgeClient, ServerError
from fedge.wire import EvaluationReport, TrainConfig, UpdateMeta


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

    def billed(self, seconds: float) -> float:
        """The function seconds ``seconds`` of work here take on the device whose bill is counted."""
        return seconds


NO_HOOKS = Hooks()


@dataclass
class Context:
    """Warm state of one function instance."""

    model_sha256: str | None = None
    model_round: int = 0
    model: Tensors = field(default_factory=dict)
    partitions: dict[str, Any] = field(default_factory=dict)
    connections: dict[tuple[str, Path, int], FedgeClient] = field(default_factory=dict)
    app_states: dict[str, dict[str, Any]] = field(default_factory=dict)

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

    def app_context(
        self, spec: str, data: DataSpec | LocalData | AppData | None, run_config: dict
    ) -> AppContext:
        """Who the client is, for the app; its ``state`` lasts per app and client while warm."""
        index, clients, extra = 0, 1, {}
        if isinstance(data, DataSpec):
            index, clients = data.index, data.num_clients
            extra = {"partition": data.partition, "seed": data.seed, "split": data.split}
        elif isinstance(data, AppData):
            index, clients = data.index, data.num_clients
        state = self.app_states.setdefault(f"{spec}:{index}/{clients}", {})
        return AppContext(index, clients, {**extra, **run_config}, state)

    def data(self, loaded: App, spec: DataSpec | LocalData | AppData, context: AppContext, task: str) -> Any:
        """The examples ``loaded`` trains on: a device's own file (read again only when it changed: its data
        may grow between rounds), else what the app loads itself, else (a simulation's client of an app
        that loads nothing) its share of ``task``'s data; once per instance."""
        key = f"{loaded.name}:{spec.model_dump_json()}"
        if isinstance(spec, LocalData):
            stat = spec.path.stat() if spec.path.is_file() else None
            stamped = f"{key}:{stat and stat.st_mtime_ns}:{stat and stat.st_size}"
            if stamped not in self.partitions:
                self.partitions = {k: v for k, v in self.partitions.items() if not k.startswith(key)}
                self.partitions[stamped] = datafiles.load(spec.path, spec.label)
            return self.partitions[stamped]
        if key not in self.partitions:
            if loaded.load_data is not None:
                self.partitions[key] = app.run(lambda: loaded.load_data(context), "load_data")
            elif isinstance(spec, DataSpec):
                self.partitions[key] = load_app(task).load_data(context)
            else:
                self.partitions[key] = None  # the app (a Flower client) reads its own
        return self.partitions[key]


@dataclass(frozen=True)
class TaskApp:
    """A task (a model and a data set) as an app: fedge's own SGD loop (``fit``) and test (``score``)."""

    task: tasks.Task
    # The splits this worker made: one per federation's partitioning, never one per client (O(N²) a round).
    splits: partition.Splits = field(default_factory=partition.Splits, compare=False, repr=False)

    def train(self, params: Tensors, data: Examples, config: dict, context: AppContext) -> Result:
        x, y = data
        model = self.task.build_model()
        tasks.load_tensors(model, params)
        device = torch.get_default_device()  # a host's ``with torch.device(...)``: an executor's GPU
        loss = fit(
            model, x, y, TrainConfig.model_validate(config), None if device.type == "cpu" else device,
            max_steps=config.get("max-steps"),
        )  # fmt: skip
        return Result(tasks.tensors_of(model), len(y), {"train_loss": loss})

    def evaluate(self, params: Tensors, data: Examples, config: dict, context: AppContext) -> Result:
        x, y = data
        model = self.task.build_model()
        tasks.load_tensors(model, params)
        loss, accuracy = score(model, x, y)
        return Result(num_examples=len(y), metrics={"accuracy": accuracy}, loss=loss)

    def initial_params(self) -> Tensors:
        return tasks.tensors_of(self.task.build_model())

    def load_data(self, context: AppContext) -> Examples:
        """The client's share of the task's training set, split as the run says (``partition``, ``seed``)."""
        data = self.task.load_data()
        spec, seed = context.run_config.get("partition", "iid"), int(context.run_config.get("seed", 0))
        if context.run_config.get("split") == "test":  # held out: an even share, whatever the partition
            held_out = f"{self.task.name}:test"
            mine = self.splits.share(
                held_out, data.y_test, context.num_partitions, "iid", seed, context.partition_id
            )
            return data.x_test[mine], data.y_test[mine]
        mine = self.splits.share(
            self.task.name, data.y_train, context.num_partitions, str(spec), seed, context.partition_id,
            data.groups_train,
        )  # fmt: skip
        return data.x_train[mine], data.y_train[mine]

    def load_test_data(self) -> Examples:
        data = self.task.load_data()
        return data.x_test, data.y_test


@functools.cache
def load_app(spec: str) -> App:
    """A task's name, ``flower:DIR`` (a Flower app directory), or what ``app.load`` finds."""
    if spec.startswith("flower:"):
        try:
            from fedge.edge_functions.adapters import flower
        except ImportError as exc:
            raise app.AppError(f"a Flower app needs flwr installed beside fedge ({exc})") from None
        return flower.load(Path(spec.removeprefix("flower:"))).app
    try:
        return App.of(spec, TaskApp(tasks.get(spec)))
    except tasks.UnknownTask:
        return app.load(spec)


def app_config(config: TrainConfig, round_: int, max_steps: int | None = None) -> dict[str, Any]:
    """The round's configuration as an app gets it: the server's hyper-parameters and the round."""
    extra = {} if max_steps is None else {"max-steps": max_steps}
    return {**config.model_dump(), "server-round": round_, **extra}


def train(event: dict, context: Context, hooks: Hooks = NO_HOOKS) -> dict:
    """Train the current global model with the client's app on its data and send the update; returns what
    happened (a ``TrainResult``). An app that fails, or returns what cannot be an update, raises
    ``AppFailed`` before anything is sent."""
    ev = TrainEvent.model_validate(event)
    started = time.perf_counter()
    spec = ev.app or ev.task
    loaded = load_app(spec)
    app_context = context.app_context(spec, ev.data, ev.run_config)
    data = context.data(loaded, ev.data, app_context, ev.task)
    api = context.api(ev.server, ev.credentials.get())
    fetching = time.perf_counter()
    bytes_down = context.fetch_model(api, ev.model_sha256)
    hooks.downloaded(bytes_down)
    download_seconds = time.perf_counter() - fetching  # with bytes_down: the device's bandwidth
    if isinstance(ev.data, DataSpec):
        torch.manual_seed(ev.data.seed * 1_000_003 + ev.round * 1009 + ev.data.index)
    config = app_config(ev.config, ev.round, ev.max_steps)
    base = context.model
    result = app.checked_train(
        app.run(lambda: loaded.train(dict(base), data, config, app_context), "train"), base
    )
    assert result.params is not None  # checked_train refuses a result without them
    metrics = app.numeric(result.metrics)
    loss = metrics.get("train_loss", metrics.get("loss"))
    tensors = hooks.trained(result.params, context.model)
    tensors, how = compression.compress(tensors, context.model, ev.compression)
    examples = max(1, round(result.num_examples * ev.weight))
    usage = pricing.device_round(hooks.billed(time.perf_counter() - started), peak_memory_gb(), bytes_down)
    meta = UpdateMeta(
        examples, loss, context.model_sha256 or "", how, steps=ev.max_steps, metrics=metrics, usage=usage
    )
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
        metrics=metrics,
    ).model_dump()


def peak_memory_gb() -> float:
    """The most memory this function's process has held (Linux reports KiB): a device has no configured
    memory size to bill by, so its GB-seconds count what it used."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / pricing.GB


def calibrate(event: dict, context: Context) -> dict:
    """Time two short runs of different sizes on this device's data, with no server: the two points that
    seed the placement predictor's line before any round has run here."""
    ev = CalibrateEvent.model_validate(event)
    task = tasks.get(ev.task)
    loaded = load_app(ev.task)
    x, y = context.data(loaded, ev.data, context.app_context(ev.task, ev.data, {}), ev.task)
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
    """Loss and metrics of the current global model by the app's ``evaluate``: on its held-out data
    (``load_test_data``; a task's test set), or, when the event names a client, on that client's own."""
    ev = EvaluateEvent.model_validate(event)
    spec = ev.app or ev.task
    loaded = load_app(spec)
    app_context = context.app_context(spec, ev.data, ev.run_config)
    if ev.data is not None:
        data = context.data(loaded, ev.data, app_context, ev.task)
    elif loaded.load_test_data is not None:
        test, key = loaded.load_test_data, f"{spec}:test"
        if key not in context.partitions:  # once per warm instance
            context.partitions[key] = app.run(test, "load_test_data")
        data = context.partitions[key]
    else:
        raise app.AppError(f"app {spec!r} has no load_test_data() for a central evaluation")
    api = context.api(ev.server, ev.credentials.get())
    context.fetch_model(api, None if ev.asked is None else ev.asked.model_sha256)
    model = dict(context.model)
    result = app.checked_evaluate(
        app.run(lambda: loaded.evaluate(model, data, {"server-round": context.model_round}, app_context),
                "evaluate")
    )  # fmt: skip
    assert result.loss is not None  # checked_evaluate refuses a result without it
    metrics = app.numeric(result.metrics)
    sent = False
    if ev.asked is not None and context.model_sha256 == ev.asked.model_sha256:
        report = EvaluationReport(
            model_sha256=ev.asked.model_sha256, loss=result.loss, num_examples=result.num_examples,
            metrics=metrics,
        )  # fmt: skip
        api.post_evaluation(ev.asked.round, report)
        sent = True
    return EvaluateResult(
        model_sha256=context.model_sha256,
        round=context.model_round,
        loss=result.loss,
        accuracy=metrics.get("accuracy"),
        num_examples=result.num_examples,
        metrics=metrics,
        sent=sent,
    ).model_dump()


def initial_model(event: dict, _: Context) -> bytes:
    """The app's first global model (its ``initial_params``), seeded, as a safetensors body."""
    ev = InitialModelEvent.model_validate(event)
    spec = ev.app or ev.task
    loaded = load_app(spec)
    if loaded.initial_params is None:
        raise app.AppError(f"app {spec!r} has no initial_params(): give the server --init-model")
    torch.manual_seed(ev.seed)
    np.random.seed(ev.seed)
    params = app.run(loaded.initial_params, "initial_params")
    if not isinstance(params, dict) or not params:
        raise app.AppFailed("the app's initial_params returned no dict of tensor name -> array")
    return encode({k: np.asarray(v) for k, v in params.items()}, {"round": "0", "task": ev.task})


def check_data(event: dict, context: Context) -> dict:
    """Whether the device's data fits the app: its ``evaluate`` of the global model on a few examples runs
    (an input of the wrong shape, a label past the model's classes fail here, in one line, once). The
    model is the server's (kept: the first round need not download it), else the app's first one."""
    ev = CheckDataEvent.model_validate(event)
    spec = ev.app or ev.task
    loaded = load_app(spec)
    app_context = context.app_context(spec, ev.data, ev.run_config)
    data = context.data(loaded, ev.data, app_context, ev.task)
    if not (isinstance(data, tuple) and len(data) == 2):  # the app reads its own, in its own form
        return CheckDataResult(examples=1).model_dump()
    x, y = data
    params = _model_to_check(ev, context, loaded)
    if params is not None:
        app.checked_evaluate(
            app.run(lambda: loaded.evaluate(params, (x[:8], y[:8]), {}, app_context), "evaluate")
        )
    return CheckDataResult(examples=len(y)).model_dump()


def _model_to_check(ev: CheckDataEvent, context: Context, loaded: App) -> Tensors | None:
    if ev.server is not None and ev.credentials is not None:
        try:
            context.fetch_model(context.api(ev.server, ev.credentials.get()))
            return dict(context.model)
        except (httpx.HTTPError, ServerError):
            pass  # the server is not reachable yet: the app's own first model, if it has one
    return app.run(loaded.initial_params, "initial_params") if loaded.initial_params else None


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


FUNCTIONS = {
    "train": train,
    "evaluate": evaluate,
    "initial_model": initial_model,
    "calibrate": calibrate,
    "check_data": check_data,
}
