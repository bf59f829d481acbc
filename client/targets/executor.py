"""A cloud executor over HTTPS as a target: check its key, seal the shard to it, grant it the round, post
the job; and, before the first such decision, ask it to time a calibration.

Called only when the placement policy chose an executor, which it never does under ``--offload never``:
the raw shard leaves the device only then, only encrypted, and only readable by the executor the grant
names. ``raw_bytes`` is what left, for the run's accounting.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass

import httpx
import numpy as np
from pydantic import ValidationError

from fedge.client.planner import ExecutorTarget
from fedge.client.policy import Placement
from fedge.client.predictor import Run
from fedge.client.targets import Point, TargetFailed, Trained
from fedge.edge_functions.events import Calibrated, Calibration, Job, JobDone
from fedge.security import offload
from fedge.security.pki import Credentials
from fedge.security.tls import client_context
from fedge.transport import FedgeClient, ServerError, raise_for_error
from fedge.wire import RoundInfo, TrainConfig

UNBOUNDED_S = 600.0  # how long a job may take when nothing else bounds it (a round without a deadline)
_FAILURES = (httpx.HTTPError, ServerError, offload.OffloadError)


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
        job = Job(
            task=task,
            round=round_,
            config=config,
            shard=offload.seal(public, shard, context),
            grant=api.grant(round_, executor_id, ttl=timeout),
            weight=weight,
        )
        body = job.model_dump_json().encode()
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
    request = Calibration(task=task, config=config, shape=list(x.shape[1:]), classes=int(y.max()) + 1)
    with httpx.Client(base_url=url, verify=client_context(creds), timeout=timeout) as http:
        response = http.post(
            "/v1/calibrate", content=request.model_dump_json(), headers={"content-type": "application/json"}
        )
        raise_for_error(response)
    try:
        answer = Calibrated.model_validate_json(response.content)
    except ValidationError:  # a remote party's answer: never trusted to be well formed
        raise offload.OffloadError(f"{url} answered the calibration with {response.text[:200]!r}") from None
    if answer.executor != executor_id:
        raise offload.OffloadError(f"{url} is executor {answer.executor!r}, not {executor_id!r}")
    return answer.points


@dataclass(frozen=True)
class HttpsExecutor:
    """``spec``'s executor, trained for by the client ``api`` speaks for; ``shard`` reads the device's
    examples as an offload sends them (read when needed: a device's data may grow between rounds)."""

    spec: ExecutorTarget
    creds: Credentials
    api: FedgeClient
    shard: Callable[[], tuple[np.ndarray, np.ndarray]]
    calibrate_s: float = 60.0

    @property
    def id(self) -> str:
        return self.spec.id

    def calibrate(self, task: str, config: TrainConfig) -> tuple[Point, Point]:
        executor = (self.spec.id, self.spec.url)
        try:
            return calibrate_executor(self.creds, executor, task, config, self.shard(), self.calibrate_s)
        except _FAILURES as exc:
            raise _failed(exc) from exc

    def train(self, info: RoundInfo, placement: Placement) -> Trained:
        """Waits at most until the deadline, and no longer than ``placement.wait_s``."""
        left = info.seconds_left(time.time())
        timeout = max(1.0, min(left if math.isfinite(left) else UNBOUNDED_S, placement.wait_s))
        executor = (self.spec.id, self.spec.url)
        try:
            done = offload_round(
                self.api, self.creds, executor, info.task, info.round, info.config, self.shard(),
                placement.weight, timeout,
            )  # fmt: skip
        except _FAILURES as exc:
            raise _failed(exc) from exc
        return Trained(done.run(placement.steps), raw_bytes=done.raw_bytes, job_bytes=done.job_bytes)


def _failed(exc: Exception) -> TargetFailed:
    """Whatever went wrong out there, the executor did not train the round: the device takes over."""
    return TargetFailed(str(exc), exc if isinstance(exc, ServerError) else None)
