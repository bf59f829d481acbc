"""The clients' app in a simulation (``--app``, ``--flower-app``): what the events name, what the Flower
app's ServerApp settles (rounds, fractions), how a round is evaluated and its metrics aggregated.

This process imports neither torch nor flwr: whatever needs the app runs on the pool's workers
(``fedge.edge_functions.adapters.flower``'s ``plan_of`` and ``aggregate``), which answer JSON.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator, Mapping
from typing import Any

import numpy as np

from fedge.console import UserError
from fedge.edge_functions import app, events
from fedge.edge_functions.runtime import Invocation, WarmPool
from fedge.settings import SimulationSettings

_FLOWER = "fedge.edge_functions.adapters.flower"


def spec(settings: SimulationSettings) -> str | None:
    if settings.flower_app is not None:
        return f"flower:{settings.flower_app.resolve()}"
    return settings.app


def run_config(settings: SimulationSettings) -> dict[str, app.Scalar]:
    """The ``--run-config`` overrides; each worker merges them over the app's own defaults."""
    with refused():
        return app.parse_run_config(settings.run_config)


@contextlib.contextmanager
def refused() -> Iterator[None]:
    """An app that cannot run as asked stops the simulation with its one line."""
    try:
        yield
    except (app.AppError, app.AppFailed) as exc:
        raise UserError(str(exc)) from None


def _plan(pool: WarmPool, settings: SimulationSettings) -> dict[str, Any]:
    assert settings.flower_app is not None
    event = {"directory": str(settings.flower_app.resolve()), "run_config": run_config(settings)}
    with refused():
        return pool.invoke(f"{_FLOWER}:plan_of", event).result().result


def settle(pool: WarmPool, settings: SimulationSettings) -> SimulationSettings:
    """A Flower app's rounds and share of clients come from its ServerApp, as under ``flwr run``, unless
    the command line set them."""
    if settings.flower_app is None:
        return settings
    if not settings.flower_app.is_dir():
        raise UserError(f"--flower-app {settings.flower_app} is not a directory")
    plan = _plan(pool, settings)
    given = settings.model_fields_set
    update = {
        key: value
        for key, value in (("rounds", plan["num_rounds"]), ("fraction", plan["fraction_train"]))
        if key not in given
    }
    return settings.model_copy(update=update)


def data(settings: SimulationSettings, share: events.DataSpec) -> events.DataSpec | events.AppData:
    """A Flower client reads its own partition (by ``partition-id``); other apps get the run's share."""
    if settings.flower_app is not None:
        return events.AppData(num_clients=share.num_clients, index=share.index)
    return share


def aggregate(
    pool: WarmPool, settings: SimulationSettings, kind: str, results: list[tuple[int, Mapping[str, float]]]
) -> dict[str, float]:
    """A round's metrics, by the Flower app's aggregation function, else weighted by examples."""
    if settings.flower_app is None or not results:
        return app.weighted_mean(results)
    event = {
        "directory": str(settings.flower_app.resolve()), "run_config": run_config(settings),
        "kind": kind, "results": [[n, dict(m)] for n, m in results],
    }  # fmt: skip
    with refused():
        return pool.invoke(f"{_FLOWER}:aggregate", event).result().result


def evaluate(
    pool: WarmPool, settings: SimulationSettings, event: events.EvaluateEvent, round_: int
) -> tuple[list[Invocation], events.EvaluateResult]:
    """The current model evaluated by the app: centrally on its held-out data, or (a Flower app) by a
    ``fraction_evaluate`` share of the clients on their own, aggregated as its ServerApp says."""
    if settings.flower_app is None:
        with refused():
            evaluated = pool.invoke("evaluate", event).result()
        return [evaluated], events.EvaluateResult.model_validate(evaluated.result)
    fraction = _plan(pool, settings)["fraction_evaluate"]
    chosen = _evaluators(settings, fraction, round_)
    futures = [
        pool.invoke("evaluate", event.model_copy(update={"data": events.AppData(num_clients=settings.clients,
                                                                                 index=i)}))
        for i in chosen
    ]  # fmt: skip
    with refused():
        invocations = [f.result() for f in futures]
    scores = [events.EvaluateResult.model_validate(i.result) for i in invocations]
    if not scores:
        return [], events.EvaluateResult(model_sha256=None, round=0, loss=math.nan, accuracy=None)
    examples = sum(s.num_examples for s in scores)
    metrics = aggregate(pool, settings, "evaluate", [(s.num_examples, s.metrics) for s in scores])
    return invocations, events.EvaluateResult(
        model_sha256=scores[0].model_sha256,
        round=scores[0].round,
        loss=sum(s.loss * s.num_examples for s in scores) / examples,
        accuracy=accuracy(metrics),
        num_examples=examples,
        metrics=metrics,
    )


def _evaluators(settings: SimulationSettings, fraction: float, round_: int) -> list[int]:
    """Which clients evaluate: as Flower samples them, ``int(fraction * clients)`` (at least one when the
    fraction is not 0), drawn anew each round from the run's seed."""
    count = 0 if fraction <= 0 else max(1, int(fraction * settings.clients))
    rng = np.random.default_rng([settings.seed, round_])
    return sorted(int(i) for i in rng.choice(settings.clients, count, replace=False))


def accuracy(metrics: Mapping[str, float]) -> float | None:
    """The metric that is an accuracy: ``accuracy``, else the first whose name says so (``eval_acc``)."""
    if "accuracy" in metrics:
        return metrics["accuracy"]
    return next((v for k, v in metrics.items() if "acc" in k.lower()), None)
