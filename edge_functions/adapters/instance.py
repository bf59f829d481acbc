"""One warm function instance inside a platform's process (a Lambda sandbox, a Knative pod).

The platform keeps the process; the instance keeps the ``Context`` (model cached by sha256) between
invocations and records, like the agent's warm pool, whether an invocation was cold and what it cost.
"""

from __future__ import annotations

import os
import threading
import time
from typing import Any

from fedge.edge_functions.runtime import Invocation


class UnknownFunction(LookupError):
    pass


class Instance:
    def __init__(self) -> None:
        self._lock = threading.Lock()  # one invocation at a time, as a FaaS instance with concurrency 1
        self._context: Any = None
        self._functions: dict[str, Any] = {}

    def _start(self) -> float:
        """Import the functions (torch) on first use: that is this instance's cold start."""
        started = time.perf_counter()
        from fedge.edge_functions.functions import FUNCTIONS, Context

        self._functions = FUNCTIONS
        self._context = Context()
        return time.perf_counter() - started

    def invoke(self, function: str, event: dict) -> Invocation:
        with self._lock:
            startup = self._start() if self._context is None else 0.0
            if function not in self._functions:
                raise UnknownFunction(f"no function {function!r}: choose from {', '.join(self._functions)}")
            started = time.perf_counter()
            result = self._functions[function](event, self._context)
            seconds = time.perf_counter() - started
        return Invocation(function, result, startup > 0, startup, seconds, os.getpid())
