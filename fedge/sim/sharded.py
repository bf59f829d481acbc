"""The local backend of ``fedge simulate``: one warm worker per shard, and each client always on its own.

A worker keeps what it learnt serving a client (its mutual-TLS connection, its share of the data). In one
pool where any worker takes any client, a client lands on another worker than last round (W-1)/W of the
time, and that worker opens a new connection (a full handshake on both sides) and keeps one more; routed
by its index, a client finds its connection warm every round, and each worker keeps only its own clients'.
The Ray backend routes to its actors the same way (``shard_of``).
"""

from __future__ import annotations

import itertools
import os
from collections.abc import Callable, Iterator
from concurrent.futures import Future

from pydantic import BaseModel

from fedge.edge_functions.runtime import Instance, Invocation, WarmPool


def payload_of(event: BaseModel | dict) -> dict:
    return event.model_dump(mode="json") if isinstance(event, BaseModel) else event


def shard_of(payload: dict, shards: int, spare: Iterator[int]) -> int:
    """The shard of the client an event is for (its data's index), or the next in turn for an event of
    no client (the initial model, an evaluation)."""
    data = payload.get("data")
    index = data.get("index") if isinstance(data, dict) else None
    return (next(spare) if index is None else int(index)) % shards


class ShardedPool:
    """The pool interface (``warm``, ``invoke``, ``close``) over ``workers`` one-worker warm pools, of
    worker processes or of the ``instances`` given (containers)."""

    def __init__(self, workers: int, instances: Callable[[int], Instance] | None = None) -> None:
        threads = max(1, (os.cpu_count() or 1) // workers)
        self._shards = [WarmPool(1, threads=threads, instances=instances) for _ in range(workers)]
        self._spare = itertools.count()

    def warm(self, wait: bool = True) -> None:
        for shard in self._shards:  # all start at once; then, if asked, wait for each
            shard.warm(wait=False)
        if wait:
            for shard in self._shards:
                shard.warm()

    def invoke(
        self, function: str, event: BaseModel | dict, timeout: float | None = None
    ) -> Future[Invocation]:
        payload = payload_of(event)
        return self._shards[shard_of(payload, len(self._shards), self._spare)].invoke(
            function, payload, timeout
        )

    def close(self) -> None:
        for shard in self._shards:
            shard.close()
