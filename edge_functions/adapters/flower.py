"""A Flower app directory, unmodified, as a fedge client app: the only part of fedge that imports flwr.

It reads ``DIR/pyproject.toml`` as ``flwr run`` does: ``[tool.flwr.app.components]`` names the ClientApp
and the ServerApp, ``[tool.flwr.app.config]`` is ``context.run_config`` (a host's ``--run-config``
overrides it). The ClientApp, built from a ``client_fn`` (a ``NumPyClient(...).to_client()`` or a
``Client``) or with the Message API (``@app.train()``, ``@app.evaluate()``), is sent the messages a Flower
SuperNode would get, with ``context.node_config`` holding ``partition-id`` and ``num-partitions``.

From the ServerApp fedge takes what its own server honours: the initial parameters, the number of rounds,
a FedAvg-family strategy's fractions and per-round configs, and its fit/evaluate metrics aggregation
functions. Anything else (another strategy, a central ``evaluate_fn``, a custom server or client manager,
a ``main`` that talks to the grid itself) is refused in one line that names it. The ServerApp's plan is a
function of the directory and the run config, so a device works it out from its own copy, as a host does.
"""

from __future__ import annotations

import functools
import importlib
import sys
import time
import tomllib
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from flwr.app import (
    DEFAULT_TTL,
    Array,
    ArrayRecord,
    ConfigRecord,
    Context,
    Metadata,
    MetricRecord,
    RecordDict,
)
from flwr.app.message import make_message
from flwr.clientapp import ClientApp
from flwr.common import EvaluateIns, FitIns, ndarrays_to_parameters, parameters_to_ndarrays
from flwr.compat.common.recorddict_compat import (
    evaluateins_to_recorddict,
    fitins_to_recorddict,
    recorddict_to_evaluateres,
    recorddict_to_fitres,
)
from flwr.server import strategy as legacy
from flwr.serverapp import ServerApp
from flwr.serverapp import strategy as message_api

from fedge.codec import Tensors
from fedge.edge_functions.app import App, AppContext, AppError, AppFailed, Result, weighted_mean

Pairs = list[tuple[int, Mapping[str, Any]]]
_LEGACY_STRATEGIES = (legacy.FedAvg, legacy.FedProx)
_MESSAGE_STRATEGIES = (message_api.FedAvg, message_api.FedProx)


class FlowerAppError(AppError):
    """A Flower app fedge cannot run as it is: one line naming what is missing or unsupported."""


@dataclass(frozen=True)
class Plan:
    """What fedge takes from the ServerApp."""

    initial: Tensors
    num_rounds: int
    fraction_train: float
    fraction_evaluate: float
    train_config: Callable[[int], dict[str, Any]]
    evaluate_config: Callable[[int], dict[str, Any]]
    aggregate_train: Callable[[Pairs], dict[str, float]]
    aggregate_evaluate: Callable[[Pairs], dict[str, float]]
    weighted_by_key: str = "num-examples"  # Message API: the metric that counts a reply's examples


@dataclass(frozen=True, eq=False)  # one per directory (``load``): hashed by identity, for ``_plan``'s cache
class FlowerProject:
    """A Flower app directory: its components and its default run config."""

    directory: Path
    clientapp: str
    serverapp: str
    defaults: dict[str, Any]

    def run_config(self, overrides: Mapping[str, Any]) -> dict[str, Any]:
        unknown = sorted(set(overrides) - set(self.defaults))
        if unknown:
            raise FlowerAppError(
                f"--run-config {unknown[0]!r} is not in [tool.flwr.app.config] of {self.directory}"
            )
        return {**self.defaults, **overrides}

    def client_app(self) -> ClientApp:
        found = _component(self.directory, self.clientapp, "clientapp")
        if not isinstance(found, ClientApp):
            raise FlowerAppError(f"clientapp {self.clientapp!r} is a {type(found).__name__}, not a ClientApp")
        return found

    def plan(self, run_config: Mapping[str, Any]) -> Plan:
        return _plan(self, tuple(sorted(self.run_config(run_config).items())))

    @property
    def app(self) -> App:
        """The ClientApp as a fedge app; it learns the run config from each call's context."""
        return App(
            f"flower:{self.directory}",
            functools.partial(_train, self),
            functools.partial(_evaluate, self),
            initial_params=lambda: self.plan({}).initial,
        )


def read_project(directory: Path) -> FlowerProject:
    """The components and config of ``directory``'s pyproject.toml; what is missing is said in one line."""
    path = directory / "pyproject.toml"
    if not path.is_file():
        raise FlowerAppError(f"{directory} is not a Flower app: it has no pyproject.toml")
    try:
        project = tomllib.loads(path.read_text())
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise FlowerAppError(f"{path} is not valid TOML: {exc}") from None
    flwr_app = project.get("tool", {}).get("flwr", {}).get("app", {})
    components = flwr_app.get("components", {})
    missing = [name for name in ("clientapp", "serverapp") if not isinstance(components.get(name), str)]
    if missing:
        raise FlowerAppError(
            f"{path} names no {' and no '.join(missing)} in [tool.flwr.app.components] "
            '(e.g. clientapp = "mypackage.client_app:app")'
        )
    config = flwr_app.get("config", {})
    return FlowerProject(directory.resolve(), components["clientapp"], components["serverapp"], config)


@functools.cache
def load(directory: Path) -> FlowerProject:
    return read_project(directory)


def _component(directory: Path, reference: str, what: str) -> Any:
    """``module:attr`` imported with the app's directory on the path, as ``flwr run`` does."""
    module, sep, attr = reference.partition(":")
    if not sep:
        raise FlowerAppError(f"{what} {reference!r} must be module:attribute")
    if str(directory) not in sys.path:
        sys.path.insert(0, str(directory))
    try:
        found = importlib.import_module(module)
    except ImportError as exc:
        raise FlowerAppError(f"cannot import {what} module {module!r} from {directory}: {exc}") from None
    if not hasattr(found, attr):
        raise FlowerAppError(f"{what} module {module!r} has no {attr!r}")
    return getattr(found, attr)


class _Captured(Exception):
    """The ServerApp's ``main`` reached ``strategy.start``: everything fedge needs is known."""

    def __init__(self, strategy: message_api.Strategy, arguments: dict[str, Any]) -> None:
        super().__init__("captured")
        self.strategy = strategy
        self.arguments = arguments


class _NoGrid:
    """The grid a ServerApp's ``main`` gets: fedge's server runs the rounds, so only ``strategy.start`` may
    be called; a ``main`` that drives the grid itself is refused by name."""

    def __getattr__(self, name: str) -> Any:
        raise FlowerAppError(
            f"the ServerApp calls grid.{name} itself: fedge runs a strategy's start(), not a custom main"
        )


@functools.cache
def _plan(project: FlowerProject, run_config: tuple[tuple[str, Any], ...]) -> Plan:
    server_app = _component(project.directory, project.serverapp, "serverapp")
    if not isinstance(server_app, ServerApp):
        raise FlowerAppError(f"serverapp {project.serverapp!r} is a {type(server_app).__name__}")
    context = Context(0, 0, {}, RecordDict(), dict(run_config))
    if server_app._main is not None:  # the Message API: main(grid, context) calls strategy.start(...)
        return _message_plan(server_app, context)
    return _legacy_plan(server_app, context)


def _message_plan(server_app: ServerApp, context: Context) -> Plan:
    start = message_api.Strategy.start

    def capture(self: message_api.Strategy, grid: Any, initial_arrays: ArrayRecord, **kwargs: Any) -> None:
        raise _Captured(self, {"initial_arrays": initial_arrays, **kwargs})

    message_api.Strategy.start = capture  # type: ignore[method-assign]
    try:
        assert server_app._main is not None
        server_app._main(_NoGrid(), context)  # type: ignore[arg-type]
    except _Captured as captured:
        strategy, arguments = captured.strategy, captured.arguments
    else:
        raise FlowerAppError("the ServerApp's main never called strategy.start(...)")
    finally:
        message_api.Strategy.start = start  # type: ignore[method-assign]
    if type(strategy) not in _MESSAGE_STRATEGIES:
        raise FlowerAppError(
            f"strategy {type(strategy).__name__} is not supported: fedge honours FedAvg and FedProx"
        )
    if arguments.get("evaluate_fn") is not None:
        raise FlowerAppError(
            "strategy.start(evaluate_fn=...) is not supported: fedge evaluates on the clients "
            "(fraction_evaluate)"
        )
    train = dict(arguments.get("train_config") or {})
    if isinstance(strategy, message_api.FedProx):
        train["proximal-mu"] = strategy.proximal_mu
    evaluate = dict(arguments.get("evaluate_config") or {})
    key = strategy.weighted_by_key

    def aggregator(function: Callable[[list[RecordDict], str], MetricRecord]) -> Callable:
        def aggregate(pairs: Pairs) -> dict[str, float]:
            replies = [RecordDict({"metrics": MetricRecord({**_numbers(m), key: n})}) for n, m in pairs]
            return _numbers(dict(function(replies, key)))

        return aggregate

    return Plan(
        initial={name: array.numpy() for name, array in arguments["initial_arrays"].items()},
        num_rounds=int(arguments.get("num_rounds", 3)),
        fraction_train=float(strategy.fraction_train),
        fraction_evaluate=float(strategy.fraction_evaluate),
        train_config=lambda round_: {**train, "server-round": round_},
        evaluate_config=lambda round_: {**evaluate, "server-round": round_},
        aggregate_train=aggregator(strategy.train_metrics_aggr_fn),
        aggregate_evaluate=aggregator(strategy.evaluate_metrics_aggr_fn),
        weighted_by_key=key,
    )


def _legacy_plan(server_app: ServerApp, context: Context) -> Plan:
    if server_app._server_fn is not None:
        components = server_app._server_fn(context)
        server, config, strategy = components.server, components.config, components.strategy
        manager = components.client_manager
    else:
        server, config, strategy = server_app._server, server_app._config, server_app._strategy
        manager = server_app._client_manager
    if server is not None:
        raise FlowerAppError("a custom Server in the ServerApp is not supported: fedge's server runs rounds")
    if manager is not None:
        raise FlowerAppError("a custom ClientManager is not supported: fedge's server selects clients")
    if type(strategy) not in _LEGACY_STRATEGIES:
        name = "no strategy" if strategy is None else f"strategy {type(strategy).__name__}"
        raise FlowerAppError(f"{name} is not supported: fedge honours FedAvg and FedProx")
    if strategy.evaluate_fn is not None:
        raise FlowerAppError(
            "the strategy's evaluate_fn is not supported: fedge evaluates on the clients (fraction_evaluate)"
        )
    if strategy.initial_parameters is None:
        raise FlowerAppError("the strategy has no initial_parameters: fedge needs the first global model")
    arrays = parameters_to_ndarrays(strategy.initial_parameters)
    proximal = {"proximal_mu": strategy.proximal_mu} if isinstance(strategy, legacy.FedProx) else {}
    on_fit, on_evaluate = strategy.on_fit_config_fn, strategy.on_evaluate_config_fn

    def aggregator(function: Callable[[Pairs], Mapping[str, Any]] | None) -> Callable[[Pairs], dict]:
        return (lambda pairs: _numbers(dict(function(pairs)))) if function is not None else weighted_mean

    return Plan(
        initial={_legacy_name(i): np.asarray(a) for i, a in enumerate(arrays)},
        num_rounds=int(config.num_rounds) if config is not None else 1,
        fraction_train=float(strategy.fraction_fit),
        fraction_evaluate=float(strategy.fraction_evaluate),
        train_config=lambda round_: {**(on_fit(round_) if on_fit else {}), **proximal},
        evaluate_config=lambda round_: dict(on_evaluate(round_) if on_evaluate else {}),
        aggregate_train=aggregator(strategy.fit_metrics_aggregation_fn),
        aggregate_evaluate=aggregator(strategy.evaluate_metrics_aggregation_fn),
    )


def _legacy_name(index: int) -> str:
    """A legacy client's arrays have no names, only an order: names that sort in that order keep it."""
    return f"{index:04d}"


def _numbers(metrics: Mapping[str, Any]) -> dict[str, float]:
    return {k: float(v) for k, v in metrics.items() if isinstance(v, int | float) and not isinstance(v, bool)}


def _scalars(metrics: Mapping[str, Any]) -> dict[str, Any]:
    """Flower metrics may hold lists; fedge's are scalars only."""
    return {k: v for k, v in metrics.items() if isinstance(v, bool | int | float | str)}


def _flower_context(context: AppContext, run_config: dict[str, Any]) -> Context:
    """The Context a SuperNode gives its ClientApp, its state kept while the fedge instance is warm."""
    state = context.state.setdefault("flwr", RecordDict())
    node_config = {"partition-id": context.partition_id, "num-partitions": context.num_partitions}
    return Context(0, context.partition_id, node_config, state, run_config)


def _send(
    project: FlowerProject, kind: str, content: RecordDict, context: Context, round_: int
) -> RecordDict:
    metadata = Metadata(
        run_id=0,
        message_id="",
        group_id=str(round_),
        src_node_id=0,
        dst_node_id=context.node_id,
        reply_to_message_id="",
        created_at=time.time(),
        ttl=DEFAULT_TTL,
        message_type=kind,
    )  # fmt: skip  (as Flower's own simulation addresses a message to a node)
    message = make_message(metadata, content)
    reply = project.client_app()(message, context)
    if reply.has_error():
        raise AppFailed(f"the Flower ClientApp's {kind} failed: {reply.error.reason}")
    return reply.content


def _train(project: FlowerProject, params: Tensors, _data: Any, config: dict, context: AppContext) -> Result:
    run_config = project.run_config(_app_config(project, context))
    plan = project.plan(run_config)
    round_ = int(config.get("server-round", 0))
    flower = _flower_context(context, run_config)
    if project.client_app()._call is not None:  # built from client_fn: the legacy messages
        names = sorted(params)
        fit = FitIns(ndarrays_to_parameters([params[n] for n in names]), plan.train_config(round_))
        reply = recorddict_to_fitres(
            _send(project, "train", fitins_to_recorddict(fit, keep_input=True), flower, round_), False
        )
        fitted = parameters_to_ndarrays(reply.parameters)
        if len(fitted) != len(names):
            raise AppFailed(f"the Flower client returned {len(fitted)} arrays for {len(names)} tensors")
        return Result(dict(zip(names, fitted, strict=True)), reply.num_examples, _scalars(reply.metrics))
    content = RecordDict(
        {"arrays": ArrayRecord({n: Array(np.asarray(a)) for n, a in params.items()}),
         "config": ConfigRecord(plan.train_config(round_))}
    )  # fmt: skip
    replied = _send(project, "train", content, flower, round_)
    metrics = dict(replied.metric_records.get("metrics", MetricRecord()))
    arrays = next(iter(replied.array_records.values()), None)
    if arrays is None:
        raise AppFailed("the Flower ClientApp's train replied without arrays")
    return Result(
        {name: array.numpy() for name, array in arrays.items()},
        _examples(metrics, plan.weighted_by_key, "train"),
        _scalars(metrics),
    )


def _evaluate(
    project: FlowerProject, params: Tensors, _data: Any, config: dict, context: AppContext
) -> Result:
    run_config = project.run_config(_app_config(project, context))
    plan = project.plan(run_config)
    round_ = int(config.get("server-round", 0))
    flower = _flower_context(context, run_config)
    if project.client_app()._call is not None:
        names = sorted(params)
        ins = EvaluateIns(ndarrays_to_parameters([params[n] for n in names]), plan.evaluate_config(round_))
        reply = recorddict_to_evaluateres(
            _send(project, "evaluate", evaluateins_to_recorddict(ins, keep_input=True), flower, round_)
        )
        return Result(num_examples=reply.num_examples, metrics=_scalars(reply.metrics), loss=reply.loss)
    content = RecordDict(
        {"arrays": ArrayRecord({n: Array(np.asarray(a)) for n, a in params.items()}),
         "config": ConfigRecord(plan.evaluate_config(round_))}
    )  # fmt: skip
    metrics = dict(_send(project, "evaluate", content, flower, round_).metric_records.get("metrics", {}))
    losses = [k for k in metrics if "loss" in k]
    if not losses:
        raise AppFailed("the Flower ClientApp's evaluate reported no loss among its metrics")
    return Result(
        num_examples=_examples(metrics, plan.weighted_by_key, "evaluate"),
        metrics=_scalars(metrics),
        loss=metrics[losses[0]],
    )


def _app_config(project: FlowerProject, context: AppContext) -> dict[str, Any]:
    """The app's own keys of the context's run config (a host adds its own, e.g. the partition)."""
    return {k: v for k, v in context.run_config.items() if k in project.defaults}


def _examples(metrics: Mapping[str, Any], key: str, what: str) -> int:
    value = metrics.get(key)
    if not isinstance(value, int | float) or isinstance(value, bool):
        raise AppFailed(f"the Flower ClientApp's {what} reply has no {key!r} metric (its examples)")
    return int(value)


def aggregate(event: dict, _context: object) -> dict[str, float]:
    """A round's metrics aggregated by the ServerApp's function (else weighted by examples): a pool
    function, so that the host that asks never imports the app (nor torch)."""
    project = load(Path(event["directory"]))
    plan = project.plan(event.get("run_config", {}))
    pairs = [(int(n), m) for n, m in event["results"]]
    if not pairs:
        return {}
    function = plan.aggregate_train if event["kind"] == "train" else plan.aggregate_evaluate
    return function(pairs)


def plan_of(event: dict, _context: object) -> dict[str, Any]:
    """What a host needs of the ServerApp, as JSON: rounds and fractions, and the merged run config."""
    project = load(Path(event["directory"]))
    run_config = project.run_config(event.get("run_config", {}))
    plan = project.plan(run_config)
    return {
        "num_rounds": plan.num_rounds,
        "fraction_train": plan.fraction_train,
        "fraction_evaluate": plan.fraction_evaluate,
        "run_config": run_config,
    }
