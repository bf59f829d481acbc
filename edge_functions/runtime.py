"""A warm pool of worker processes that host the functions, the way a FaaS platform keeps instances warm.

Each worker imports torch once, then serves many invocations, keeping its ``Context`` (model cache, data)
between them. The parent process never imports torch: it only routes events and collects results.
"""

from __future__ import annotations

import multiprocessing
import os
import time
from concurrent.futures import Future, ProcessPoolExecutor
from dataclasses import dataclass
from typing import Any

_context: Any = None
_invocations = 0


@dataclass(frozen=True)
class Invocation:
    function: str
    result: Any
    cold: bool  # first invocation in a fresh worker
    seconds: float
    pid: int


def _start_worker(threads: int) -> None:
    global _context
    import torch

    from fedge.edge_functions.functions import Context

    torch.set_num_threads(threads)
    _context = Context()


def _invoke(function: str, event: dict) -> Invocation:
    global _invocations
    from fedge.edge_functions.functions import FUNCTIONS

    started = time.perf_counter()
    result = FUNCTIONS[function](event, _context)
    _invocations += 1
    return Invocation(function, result, _invocations == 1, time.perf_counter() - started, os.getpid())


class WarmPool:
    def __init__(self, workers: int) -> None:
        threads = max(1, (os.cpu_count() or 1) // workers)
        self.workers = workers
        self._executor = ProcessPoolExecutor(
            workers,
            mp_context=multiprocessing.get_context("spawn"),
            initializer=_start_worker,
            initargs=(threads,),
        )

    def warm(self) -> None:
        """Start every worker now, so the first round does not pay for ``import torch``."""
        for future in [self._executor.submit(os.getpid) for _ in range(self.workers)]:
            future.result()

    def invoke(self, function: str, event: dict) -> Future[Invocation]:
        return self._executor.submit(_invoke, function, event)

    def close(self) -> None:
        self._executor.shutdown(cancel_futures=True)
