"""Sending a round to a cloud executor: check its key, seal the shard to it, grant it the round, post the job;
and, before the first such decision, asking it to time a calibration.

Called only when the placement policy chose an executor, which it never does under ``--offload never``:
the raw shard leaves the device only then, only encrypted, and only readable by the executor the grant
names. ``raw_bytes`` is what left, for the run's accounting.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass

import httpx
import numpy as np
from pydantic import BaseModel, Field, ValidationError

from fedge.client.predictor import Run
from fedge.security import offload
from fedge.security.pki import Credentials
from fedge.security.tls import client_context
from fedge.transport import FedgeClient, raise_for_error
from fedge.wire import TrainConfig


class JobDone(BaseModel):
    """The executor's answer to a job: its own seconds and bytes per component, for the predictor."""

    client: str
    round: int
    device: str
    num_examples: int
    bytes_down: int = Field(ge=0)
    download_seconds: float = Field(ge=0)
    compute_seconds: float = Field(ge=0)
    bytes_up: int = Field(ge=0)
    upload_seconds: float = Field(ge=0)
    seconds: float = Field(ge=0)


@dataclass(frozen=True)
class Offloaded:
    """``result`` is the executor's answer (its own seconds per component); ``key_s`` the device's wait for
    the executor's key (its start-up, seen from here); ``job_bytes`` and ``post_s`` the job sent and the wall
    time of that request, whose part beyond the executor's own ``seconds`` is the shard's upload."""

    executor: str
    result: JobDone
    raw_bytes: int
    job_bytes: int = 0
    key_s: float = 0.0
    post_s: float = 0.0

    @property
    def upload_s(self) -> float:
        return max(0.0, self.post_s - self.result.seconds)

    def run(self, steps: int) -> Run:
        """What the round took on the executor, per component, as the predictor records it."""
        r = self.result
        return Run(
            steps, r.compute_seconds, self.key_s, r.bytes_down, r.download_seconds, r.bytes_up,
            r.upload_seconds, self.job_bytes, self.upload_s,
        )  # fmt: skip


def shard_bytes(data: tuple[np.ndarray, np.ndarray]) -> int:
    """Bytes an offload of ``data`` uploads: the sealed shard, as it goes on the wire."""
    x, y = data
    return offload.sealed_size(len(offload.encode_shard(x, y)))


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
        started = time.perf_counter()
        response = http.get("/v1/key")
        key_s = time.perf_counter() - started
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
        body = json.dumps(job).encode()
        started = time.perf_counter()
        response = http.post("/v1/jobs", content=body, headers={"content-type": "application/json"})
        post_s = time.perf_counter() - started
        raise_for_error(response)
    try:
        result = JobDone.model_validate_json(response.content)
    except ValidationError:  # a remote party's answer: never trusted to be well formed
        raise offload.OffloadError(
            f"executor {executor_id!r} answered the job with {response.text[:200]!r}"
        ) from None
    return Offloaded(executor_id, result, len(shard), len(body), key_s, post_s)


def calibrate_executor(
    creds: Credentials,
    executor: tuple[str, str],
    task: str,
    config: TrainConfig,
    data: tuple[np.ndarray, np.ndarray],
    timeout: float,
) -> tuple[tuple[int, float], tuple[int, float]]:
    """Two timed runs on ``executor`` (id, URL), on synthetic inputs shaped like ``data``: the line its
    first placement rests on. Only the shape of one example and the number of classes are sent."""
    executor_id, url = executor
    x, y = data
    request = {
        "task": task,
        "config": config.model_dump(),
        "shape": list(x.shape[1:]),
        "classes": int(y.max()) + 1,
    }
    with httpx.Client(base_url=url, verify=client_context(creds), timeout=timeout) as http:
        response = http.post("/v1/calibrate", json=request)
        raise_for_error(response)
    answer = response.json()
    if answer.get("executor") != executor_id:
        raise offload.OffloadError(f"{url} is executor {answer.get('executor')!r}, not {executor_id!r}")
    (small_steps, small_s), (large_steps, large_s) = answer["points"]
    return (int(small_steps), float(small_s)), (int(large_steps), float(large_s))
