"""The client app contract: the user's own ``train`` and ``evaluate``, which every host runs.

An app is anything with ``train(params, data, config, context) -> Result(params, num_examples, metrics)``
and ``evaluate(params, data, config, context) -> Result(loss, num_examples, metrics)`` (a module, a class
instance), and optionally ``initial_params()`` (the first global model), ``load_data(context)`` (its own
examples, instead of the host's) and ``load_test_data()`` (held-out data a host evaluates centrally on).
Parameters are NumPy arrays by tensor name, in and out, so torch, sklearn or plain NumPy all fit.

It is named by ``module:attr`` (``--app``), by a name under the entry-point group ``fedge.apps``, or by a
task (``fedge.edge_functions.tasks``): the built-in tasks are apps too, so every host has one training path.
What an app returns is checked here, as a pure function, before anything of it leaves the device: an app
that raises or returns something unusable fails the round with one line (``AppFailed``).
"""

from __future__ import annotations

import functools
import importlib
import math
import numbers
import tomllib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from importlib.metadata import entry_points
from typing import Any

import numpy as np

from fedge.codec import Tensors

GROUP = "fedge.apps"
Scalar = bool | int | float | str
Metrics = dict[str, Scalar]


@dataclass(frozen=True)
class Result:
    """What ``train`` (``params``) or ``evaluate`` (``loss``) answers, with the examples it used."""

    params: Tensors | None = None
    num_examples: int = 0
    metrics: Metrics = field(default_factory=dict)
    loss: float | None = None


@dataclass
class AppContext:
    """Who this client is among how many, the run's configuration, and ``state`` an app may keep between
    the rounds of one warm instance (never anything another client sent)."""

    partition_id: int = 0
    num_partitions: int = 1
    run_config: dict[str, Any] = field(default_factory=dict)
    state: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class App:
    """An app, loaded: its functions, each optional one None when it has none."""

    name: str
    train: Callable[..., Result]
    evaluate: Callable[..., Result]
    initial_params: Callable[[], Tensors] | None = None
    load_data: Callable[[AppContext], Any] | None = None
    load_test_data: Callable[[], Any] | None = None

    @classmethod
    def of(cls, name: str, target: Any) -> App:
        """The contract's functions of ``target``; one missing or not callable is refused by name."""
        found = {}
        for required in ("train", "evaluate"):
            function = getattr(target, required, None)
            if not callable(function):
                raise AppError(f"app {name!r} has no {required}(params, data, config, context) function")
            found[required] = function
        optional = {
            key: getattr(target, key, None)
            for key in ("initial_params", "load_data", "load_test_data")
            if callable(getattr(target, key, None))
        }
        return cls(name, found["train"], found["evaluate"], **optional)


class AppError(ValueError):
    """An app that cannot be found or loaded, or that returned something fedge cannot use: one line."""


class AppFailed(RuntimeError):
    """The app failed during a round: the device reports it, with this one line, in its skip notice."""


@functools.cache
def load(spec: str) -> App:
    """``module:attr``, ``module.name`` or a name under ``fedge.apps`` (a task's name is resolved by the
    functions, which know fedge's own training loop: ``functions.load_app``)."""
    module, sep, attr = spec.partition(":")
    if sep or "." in spec:
        try:
            target: Any = importlib.import_module(module)
        except ImportError as exc:
            raise AppError(f"cannot import the app module {module!r}: {exc}") from None
        for part in attr.split(".") if attr else ():
            if not hasattr(target, part):
                raise AppError(f"module {module!r} has no {attr!r}")
            target = getattr(target, part)
        return App.of(spec, target)
    for entry in entry_points(group=GROUP, name=spec):
        return App.of(spec, entry.load())
    raise AppError(
        f"unknown app {spec!r}: give module:attr, a task's name or a name under the entry points {GROUP!r}"
    )


def parse_run_config(text: str) -> dict[str, Scalar]:
    """``"k=v k=v"`` as ``flwr run --run-config`` takes it: each value a TOML value (a number, a boolean, a
    quoted string); an unquoted word is a string."""
    config: dict[str, Scalar] = {}
    for pair in text.split():
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise AppError(f"--run-config takes key=value pairs, not {pair!r}")
        try:
            parsed = tomllib.loads(f"v = {value}")["v"]
        except tomllib.TOMLDecodeError:
            parsed = value
        if not isinstance(parsed, bool | int | float | str):
            raise AppError(f"--run-config {key!r}: a number, a boolean or a string, not {value!r}")
        config[key] = parsed
    return config


def run(step: Callable[[], Any], what: str) -> Any:
    """The app's own call: whatever it raises becomes one line, its type and first line of text."""
    try:
        return step()
    except Exception as exc:
        text = str(exc).strip().splitlines()
        raise AppFailed(f"the app's {what} raised {type(exc).__name__}: {text[0] if text else ''}") from exc


def checked_train(result: Any, model: Mapping[str, np.ndarray]) -> Result:
    """``train``'s result, if it can be an update of ``model``: the same tensors, shapes and dtypes (a
    value that only needs a cast, float64 for float32, is cast), finite, on a positive whole number of
    examples, with scalar metrics; otherwise ``AppFailed`` with what is wrong."""
    result = _result(result, "train")
    if not isinstance(result.params, Mapping):
        raise AppFailed("the app's train returned no params (a dict of tensor name -> array)")
    names, expected = set(result.params), set(model)
    if names != expected:
        missing, extra = sorted(expected - names), sorted(names - expected)
        raise AppFailed(f"the app's train returned the wrong tensors: missing {missing}, unexpected {extra}")
    params = {}
    for name, reference in model.items():
        value = np.asarray(result.params[name])
        if value.shape != reference.shape:
            raise AppFailed(
                f"the app's train returned {name!r} of shape {value.shape}, the model's is {reference.shape}"
            )
        if value.dtype != reference.dtype and not np.can_cast(value.dtype, reference.dtype, "same_kind"):
            raise AppFailed(
                f"the app's train returned {name!r} as {value.dtype}, the model's is {reference.dtype}"
            )
        value = value.astype(reference.dtype, copy=False)
        if value.dtype.kind in "fc" and not np.isfinite(value).all():
            raise AppFailed(f"the app's train returned non-finite values in {name!r}")
        params[name] = value
    return Result(params, result.num_examples, result.metrics)


def checked_evaluate(result: Any) -> Result:
    """``evaluate``'s result, if its loss is a finite number; else ``AppFailed``."""
    result = _result(result, "evaluate")
    if not _number(result.loss) or not math.isfinite(float(result.loss)):  # type: ignore[arg-type]
        raise AppFailed(f"the app's evaluate returned loss {result.loss!r}, not a finite number")
    return Result(None, result.num_examples, result.metrics, float(result.loss))  # type: ignore[arg-type]


def _result(result: Any, what: str) -> Result:
    if not isinstance(result, Result):
        raise AppFailed(f"the app's {what} returned {type(result).__name__}, not a fedge Result")
    examples = result.num_examples
    if isinstance(examples, bool) or not isinstance(examples, numbers.Integral):
        raise AppFailed(f"the app's {what} returned num_examples {examples!r}, not a whole number")
    if examples < 1:
        raise AppFailed(f"the app's {what} returned num_examples {examples}: it must be positive")
    if not isinstance(result.metrics, Mapping):
        raise AppFailed(f"the app's {what} returned metrics of type {type(result.metrics).__name__}")
    metrics = {}
    for key, value in result.metrics.items():
        if not isinstance(key, str) or not isinstance(value, bool | str | numbers.Real):
            raise AppFailed(f"the app's {what} returned metric {key!r} = {value!r}: metrics are scalars")
        if isinstance(value, numbers.Real) and not isinstance(value, bool | int):
            if not math.isfinite(float(value)):
                raise AppFailed(f"the app's {what} returned metric {key!r} = {value!r}, not finite")
            value = float(value)
        metrics[key] = value.item() if isinstance(value, np.generic) else value
    return Result(result.params, int(examples), metrics, result.loss)


def _number(value: Any) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def numeric(metrics: Mapping[str, Scalar]) -> dict[str, float]:
    """The metrics that are numbers, as floats: what is averaged and what travels in an update."""
    return {k: float(v) for k, v in metrics.items() if _number(v)}


def weighted_mean(results: list[tuple[int, Mapping[str, Scalar]]]) -> dict[str, float]:
    """Each numeric metric averaged over the clients that reported it, weighted by their examples: what
    fedge does when an app brings no aggregation function of its own."""
    sums: dict[str, float] = {}
    weights: dict[str, int] = {}
    for examples, metrics in results:
        for key, value in numeric(metrics).items():
            sums[key] = sums.get(key, 0.0) + examples * value
            weights[key] = weights.get(key, 0) + examples
    return {key: sums[key] / weights[key] for key in sums if weights[key] > 0}
