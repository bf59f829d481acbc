"""A Flower ``NumPyClient`` as a fedge ``train`` function, so an existing Flower client runs unchanged.

Flower hands a client its parameters as a list of arrays in the order of the model's ``state_dict``;
fedge names each tensor. ``names`` bridges the two: the tensor names in the client's order. The client
keeps its own data and training; fedge brings the global model (cached by sha256), mutual TLS and the
upload. Duck-typed on ``fit``, so this module never imports flwr.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any, Protocol

import numpy as np
from pydantic import BaseModel

from fedge.codec import encode_hashed
from fedge.edge_functions.events import CredentialPaths
from fedge.edge_functions.functions import Context
from fedge.transport import FedgeClient
from fedge.wire import UpdateMeta

Scalar = bool | int | float | str | bytes


class NumPyClient(Protocol):
    def fit(
        self, parameters: list[np.ndarray], config: dict[str, Scalar]
    ) -> tuple[list[np.ndarray], int, dict[str, Scalar]]: ...


class FlowerEvent(BaseModel):
    server: str
    credentials: CredentialPaths
    round: int
    config: dict[str, Scalar] = {}


class ShapeMismatch(ValueError):
    """The Flower client returned parameters that do not match the global model."""


def train_function(
    client_fn: Callable[[], NumPyClient], names: list[str]
) -> Callable[[dict, Context], dict[str, Any]]:
    """A fedge ``train(event, context)`` that runs ``client_fn().fit`` on the current global model."""

    def train(event: dict, context: Context) -> dict[str, Any]:
        ev = FlowerEvent.model_validate(event)
        started = time.perf_counter()
        with FedgeClient(ev.server, ev.credentials.get()) as api:
            bytes_down = context.fetch_model(api)
            parameters = [context.model[name] for name in names]
            fitted, num_examples, metrics = client_fn().fit(parameters, {**ev.config, "round": ev.round})
            tensors = dict(zip(names, _check(parameters, fitted), strict=True))
            meta = UpdateMeta(num_examples, _train_loss(metrics), context.model_sha256)
            body, digest = encode_hashed(tensors, meta.to_metadata())
            api.post_update(ev.round, body, body_sha256=digest)
        return {
            "round": ev.round,
            "num_examples": num_examples,
            "metrics": {k: v for k, v in metrics.items() if not isinstance(v, bytes)},
            "bytes_up": len(body),
            "bytes_down": bytes_down,
            "seconds": time.perf_counter() - started,
        }

    return train


def _check(expected: list[np.ndarray], fitted: list[np.ndarray]) -> list[np.ndarray]:
    if len(fitted) != len(expected):
        raise ShapeMismatch(f"the client returned {len(fitted)} arrays for {len(expected)} tensors")
    out = []
    for before, after in zip(expected, fitted, strict=True):
        after = np.asarray(after)
        if after.shape != before.shape:
            raise ShapeMismatch(f"the client returned shape {after.shape} for a tensor of {before.shape}")
        out.append(after.astype(before.dtype, copy=False))
    return out


def _train_loss(metrics: dict[str, Scalar]) -> float | None:
    """The training loss a Flower client reports among its fit metrics (``train_loss``), when it does."""
    loss = metrics.get("train_loss")
    return float(loss) if isinstance(loss, int | float) and not isinstance(loss, bool) else None
