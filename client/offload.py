"""Sending a round to a cloud executor: check its key, seal the shard to it, grant it the round, post the job.

Called only when the placement policy chose an executor, which it never does under ``--offload never``:
the raw shard leaves the device only then, only encrypted, and only readable by the executor the grant
names. ``raw_bytes`` is what left, for the run's accounting.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import httpx
import numpy as np

from fedge.security import offload
from fedge.security.pki import Credentials
from fedge.security.tls import client_context
from fedge.transport import FedgeClient, raise_for_error
from fedge.wire import TrainConfig


@dataclass(frozen=True)
class Offloaded:
    executor: str
    result: dict[str, Any]
    raw_bytes: int


def offload_round(
    api: FedgeClient,
    creds: Credentials,
    executor: tuple[str, str],
    task: str,
    round_: int,
    config: TrainConfig,
    data: tuple[np.ndarray, np.ndarray],
    weight: float = 1.0,
    timeout: float = 600.0,
) -> Offloaded:
    """Have ``executor`` (id, URL) train ``round_`` on ``data`` and submit it in our slot."""
    executor_id, url = executor
    me = api.identity
    with httpx.Client(base_url=url, verify=client_context(creds), timeout=timeout) as http:
        response = http.get("/v1/key")
        raise_for_error(response)
        public = offload.verify_executor_key(
            creds.ca.read_bytes(), me.federation, executor_id, response.json()
        )
        shard = offload.encode_shard(*data)
        context = offload.shard_context(me.federation, round_, me.id, executor_id)
        job = {
            "task": task,
            "round": round_,
            "config": config.model_dump(),
            "shard": offload.seal(public, shard, context),
            "grant": api.grant(round_, executor_id, ttl=timeout),
            "weight": weight,
        }
        response = http.post("/v1/jobs", json=job)
        raise_for_error(response)
    return Offloaded(executor_id, response.json(), len(shard))
