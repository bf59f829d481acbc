"""``fedge simulate --backend ray``: the simulated clients' invocations run as Ray actors, on any node.

Each actor is a warm function instance like a worker of the local pool (``edge_functions.runtime``): it
imports torch once and keeps its ``Context`` (the model cached by sha256, the data split, one mutual-TLS
connection per client it served) for the whole run. A client's invocations always go to the same actor
(its index modulo the actors), so its connection and its model copy are reused every round. The server
stays the real ``fedge server`` process this machine starts; actors reach it over mutual TLS at its URL
and read their certificates and data set from paths, so every node must see this machine's loopback and
files (a cluster on one machine, the test's; a multi-machine cluster needs a shared work directory and
a server address the nodes can reach).

Ray comes with the ``ray`` extra (``pip install 'fedge[ray]'``).
"""

from __future__ import annotations

import importlib.util
import itertools
import os
import socket
import threading
import time
from collections import Counter
from concurrent.futures import Future
from typing import Any

from pydantic import BaseModel

from fedge import extras
from fedge.console import UserError
from fedge.edge_functions.runtime import Invocation, resolve
from fedge.sim.sharded import payload_of, shard_of


def require_ray() -> None:
    """One line naming the extra, instead of an import error half-way through a run."""
    absent = extras.missing("ray", extras.is_installed)
    if absent or importlib.util.find_spec("ray") is None:
        raise UserError(extras.message(("simulate", "--backend", "ray"), "ray", absent or ["ray"]))


def _reachable(address: str) -> None:
    """Ray waits on a cluster address that answers nothing for minutes, in silence: ask it first."""
    host, _, port = address.rpartition(":")
    try:
        socket.create_connection((host.strip("[]") or "127.0.0.1", int(port)), timeout=5).close()
    except (OSError, ValueError) as exc:
        raise UserError(f"no Ray cluster answers at {address}: {exc}") from None


class _Host:
    """One warm function instance on a Ray node (the actor's class; made remote in ``RayPool``)."""

    def __init__(self) -> None:
        import ray
        import torch

        from fedge.edge_functions.functions import FUNCTIONS, Context

        torch.set_num_threads(1)
        self._functions = FUNCTIONS
        self._context = Context()
        self._node = ray.get_runtime_context().get_node_id()
        self._calls = 0

    def ready(self) -> str:
        return self._node

    def call(self, function: str, event: dict) -> tuple[Any, float, bool, int, str]:
        started = time.perf_counter()
        result = resolve(function, self._functions)(event, self._context)
        self._calls += 1
        return result, time.perf_counter() - started, self._calls == 1, os.getpid(), self._node


class RayPool:
    """The local pool's interface (``warm``, ``invoke``, ``close``) over ``workers`` Ray actors."""

    def __init__(self, workers: int, address: str | None = None) -> None:
        require_ray()
        import ray

        self._ray = ray
        if address is not None:
            _reachable(address)
        try:
            ray.init(
                address=address, include_dashboard=False, log_to_driver=False, configure_logging=False,
                num_cpus=None if address else workers,
            )  # fmt: skip
        except (ConnectionError, RuntimeError, ValueError) as exc:
            raise UserError(
                f"cannot start or reach Ray{f' at {address}' if address else ''}: {exc}"
            ) from None
        host = ray.remote(num_cpus=1)(_Host)
        self._actors = [host.options(scheduling_strategy="SPREAD").remote() for _ in range(workers)]
        self._spare = itertools.count()
        self._lock = threading.Lock()
        self.nodes: Counter[str] = Counter()  # invocations per Ray node id

    def warm(self, wait: bool = True) -> None:
        ready = [actor.ready.remote() for actor in self._actors]
        if wait:
            self._ray.get(ready)

    def invoke(
        self, function: str, event: BaseModel | dict, timeout: float | None = None
    ) -> Future[Invocation]:
        """Run ``function(event)`` on the actor that serves this client (any, for a client-less event).
        ``timeout`` is the local pool's; an actor past it is not killed, Ray's own task limits apply."""
        payload = payload_of(event)
        actor = self._actors[shard_of(payload, len(self._actors), self._spare)]
        done: Future[Invocation] = Future()
        pending = actor.call.remote(function, payload).future()
        pending.add_done_callback(lambda f: self._settle(function, f, done))
        return done

    def _settle(self, function: str, finished: Future, done: Future[Invocation]) -> None:
        try:
            result, seconds, cold, pid, node = finished.result()
        except self._ray.exceptions.RayTaskError as exc:  # the function's own error, as it raised it
            done.set_exception(exc.cause if isinstance(exc.cause, Exception) else exc)
            return
        except Exception as exc:
            done.set_exception(exc)
            return
        with self._lock:
            self.nodes[node] += 1
        done.set_result(Invocation(function, result, cold, 0.0, seconds, pid))

    def close(self) -> None:
        for actor in self._actors:
            self._ray.kill(actor)
        self._ray.shutdown()
