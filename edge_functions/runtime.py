"""A warm pool of function instances, the way a FaaS platform keeps instances warm: worker processes here,
containers in ``edge_functions.containers`` (the same pool, with instances of another kind).

Each worker imports torch once, then serves many invocations, keeping its ``Context`` (model cache by
sha256, data) between them. The parent process never imports torch: it only routes events and collects
results. Like a FaaS platform, the pool starts workers on demand or ahead of time (``warm``, e.g. when a
round is announced), retires a worker idle for longer than ``keep_alive``, and replaces a worker that crashes
or runs past its invocation's deadline: that invocation fails with ``WorkerFailed``, never silently.
"""

from __future__ import annotations

import contextlib
import ctypes
import importlib
import multiprocessing
import os
import signal
import sys
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from multiprocessing.connection import Connection
from typing import Any, Protocol

from pydantic import BaseModel

START_TIMEOUT = 300.0
_PR_SET_PDEATHSIG = 1


@dataclass(frozen=True)
class Invocation:
    function: str
    result: Any
    cold: bool  # it waited for its worker to start (a cold start); False on a worker already warm
    startup_seconds: float  # how long it waited for that start-up (0 when warm)
    seconds: float  # the function's own run time, in the worker
    pid: int


class WorkerFailed(RuntimeError):
    """The worker crashed or hung past the deadline; it has been replaced, the invocation is lost."""


class Instance(Protocol):
    """One warm function instance, as the pool drives it: started when made, ``start_up`` waits until it
    serves, ``call`` runs one invocation (raising ``WorkerFailed`` when the instance died or hung, the
    function's own error otherwise), ``stop`` ends it (``force``: at once)."""

    pid: int
    ready: bool
    idle_since: float

    def start_up(self) -> float: ...

    def call(self, function: str, event: dict, timeout: float | None) -> tuple[Any, float]: ...

    def ask_to_stop(self) -> None: ...

    def stop(self, force: bool = False) -> None: ...


def _serve(conn: Connection, threads: int) -> None:
    """A worker's main loop. Signals go to the agent, which decides when its workers stop."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    _die_with_parent()
    import torch

    from fedge.edge_functions.functions import FUNCTIONS, Context

    torch.set_num_threads(threads)
    context = Context()
    conn.send(("ready", os.getpid()))
    while (request := conn.recv()) is not None:
        function, event = request
        started = time.perf_counter()
        try:
            result = resolve(function, FUNCTIONS)(event, context)
        except Exception as exc:
            conn.send(("error", _portable(exc)))
        else:
            conn.send(("ok", (result, time.perf_counter() - started)))
    conn.close()
    # Everything a worker owes went down the pipe; the interpreter's teardown (torch's, mostly) would add
    # a second to every pool's close, so the worker leaves without it.
    os._exit(0)


def resolve(function: str, builtin: dict[str, Any]) -> Any:
    """A built-in function by name, or ``module:attr`` (a host's wrapper of one, e.g. the simulation's
    emulated ``train``): the pool's own parent names it, so the import trusts no one the worker does not."""
    if function in builtin:
        return builtin[function]
    module, sep, attr = function.partition(":")
    if not sep:
        raise KeyError(f"no function {function!r}")
    return getattr(importlib.import_module(module), attr)


def _die_with_parent() -> None:
    """On Linux, a worker whose agent was killed outright dies too, instead of training for nobody.
    (The signal follows the thread that started the worker: the pool's threads live as long as the pool.)"""
    if sys.platform == "linux":
        ctypes.CDLL(None).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)


def _portable(exc: Exception) -> Exception:
    """The exception itself when it survives pickling between our own processes, else its text."""
    try:
        multiprocessing.reduction.ForkingPickler.dumps(exc)
    except Exception:
        return RuntimeError(f"{type(exc).__name__}: {exc}")
    return exc


class _Worker:
    def __init__(self, threads: int) -> None:
        context = multiprocessing.get_context("spawn")
        self._conn, child = context.Pipe()
        self._process = context.Process(target=_serve, args=(child, threads), daemon=True)
        self._process.start()
        child.close()
        self.ready = False
        self.pid = self._process.pid or 0
        self.idle_since = time.monotonic()

    def _receive(self, give_up: float, what: str) -> tuple[str, Any]:
        while not self._conn.poll(0.1):
            if not self._process.is_alive():
                raise WorkerFailed(f"worker {self.pid} crashed {what} (exit code {self._process.exitcode})")
            if time.monotonic() > give_up:
                raise WorkerFailed(f"worker {self.pid} hung {what}: stopped after the deadline")
        try:
            return self._conn.recv()
        except (EOFError, OSError):
            raise WorkerFailed(f"worker {self.pid} crashed {what}") from None

    def start_up(self) -> float:
        """Wait until torch is imported; returns how long this call waited."""
        if self.ready:
            return 0.0
        started = time.perf_counter()
        self._receive(time.monotonic() + START_TIMEOUT, "while starting")
        self.ready = True
        return time.perf_counter() - started

    def call(self, function: str, event: dict, timeout: float | None) -> tuple[Any, float]:
        self._conn.send((function, event))
        kind, payload = self._receive(time.monotonic() + (timeout or float("inf")), f"running {function}")
        if kind == "error":
            raise payload
        return payload

    def ask_to_stop(self) -> None:
        with contextlib.suppress(OSError):
            self._conn.send(None)

    def stop(self, force: bool = False) -> None:
        if self._process.is_alive() and not force:
            self.ask_to_stop()
            self._process.join(5)
        if self._process.is_alive():
            self._process.kill()
            self._process.join()
        self._conn.close()


class WarmPool:
    def __init__(
        self,
        workers: int,
        keep_alive: float | None = None,
        threads: int | None = None,
        instances: Callable[[int], Instance] | None = None,
    ) -> None:
        """``workers`` at most at once; with ``keep_alive``, a worker idle that long is retired. Each
        worker's torch uses ``threads`` (the cores shared among the pool's workers, unless told).
        ``instances(threads)`` starts one: a worker process, unless told (``containers.instances``)."""
        self.workers = workers
        self.keep_alive = keep_alive
        self._threads = threads or max(1, (os.cpu_count() or 1) // workers)
        self._instances = instances or _Worker
        self._lock = threading.Lock()
        self._idle: list[Instance] = []
        self._busy = 0
        self._closed = threading.Event()
        self._calls = ThreadPoolExecutor(workers, thread_name_prefix="fedge-invoke")
        if keep_alive is not None:
            threading.Thread(target=self._retire_idle, name="fedge-keep-alive", daemon=True).start()

    def warm(self, wait: bool = True) -> None:
        """Start workers up to the pool's size now, so the next invocations do not pay a cold start. One
        that cannot even be made (Docker's daemon gone) is left to the next invocation, which says so."""
        with self._lock:
            missing = self.workers - len(self._idle) - self._busy
            with contextlib.suppress(WorkerFailed):
                for _ in range(missing):
                    self._idle.append(self._instances(self._threads))
            starting = [w for w in self._idle if not w.ready]
        if wait:
            for worker in starting:
                worker.start_up()

    def live_workers(self) -> int:
        with self._lock:
            return len(self._idle) + self._busy

    def invoke(
        self, function: str, event: BaseModel | dict, timeout: float | None = None
    ) -> Future[Invocation]:
        """Run ``function(event)`` on a warm worker; past ``timeout`` seconds of run time it is killed (none,
        or infinite: never). A typed event goes to the worker as its JSON-shaped dict."""
        payload = event.model_dump(mode="json") if isinstance(event, BaseModel) else event
        return self._calls.submit(self._run, function, payload, timeout)

    def _run(self, function: str, event: dict, timeout: float | None) -> Invocation:
        with self._lock:
            self._busy += 1
            worker = self._idle.pop() if self._idle else None
        healthy = False
        try:
            made = 0.0  # a cold start counts from the making (a container's start through Docker's API)
            if worker is None:
                making = time.perf_counter()
                worker = self._instances(self._threads)
                made = time.perf_counter() - making
            startup = made + worker.start_up()
            cold = startup > 0
            try:
                result, seconds = worker.call(function, event, timeout)
            except WorkerFailed:
                raise
            except Exception:
                healthy = True
                raise
            healthy = True
            return Invocation(function, result, cold, startup, seconds, worker.pid)
        finally:
            with self._lock:
                self._busy -= 1
                if healthy and worker is not None:
                    worker.idle_since = time.monotonic()
                    self._idle.append(worker)
            if not healthy and worker is not None:
                worker.stop(force=True)

    def _retire_idle(self) -> None:
        assert self.keep_alive is not None
        while not self._closed.wait(min(self.keep_alive / 4, 1.0)):
            now = time.monotonic()
            with self._lock:
                retiring = [w for w in self._idle if now - w.idle_since > self.keep_alive]
                self._idle = [w for w in self._idle if w not in retiring]
            for worker in retiring:
                worker.stop()

    def close(self) -> None:
        """Let running invocations finish, then stop every worker."""
        self._closed.set()
        self._calls.shutdown(wait=True, cancel_futures=True)
        with self._lock:
            idle, self._idle = self._idle, []
        for worker in idle:  # all told first, so they wind down together, not one after another
            worker.ask_to_stop()
        for worker in idle:
            worker.stop()
