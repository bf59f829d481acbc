"""The cloud GPU executor: a stateless HTTPS function that trains one client's round for it, under its grant.

A client that runs short sends a job: the round, the training config, its shard sealed to this executor's
X25519 key (``security.offload``) and a grant it signed for exactly this executor and round. The executor
checks the grant, opens the shard in memory, trains (CUDA when present, CPU otherwise), submits the update
in the client's slot under the grant, and forgets: no file is written, the X25519 key lives only in this
process, and the shard goes out of scope with the request. The server records the update as computed by
this executor, so a run's accounting knows what ran off-device.

``GET /v1/key`` publishes the X25519 public key signed with the executor certificate's key;
``POST /v1/jobs`` runs a job; ``POST /v1/calibrate`` (any client of the federation) times two short runs on
synthetic inputs, so a client can weigh this executor before it ever sends it data. TLS asks every caller
for a certificate of the federation's CA, and a job is taken only from the very client its grant names: a
captured job replayed by another client, an admin or another executor is refused (``not_grant_holder``)
before anything runs, so nobody but the owner of the data can spend its grant.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field
from typing import Any

import httpx
import numpy as np
import torch
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
from pydantic import ValidationError

from fedge import pricing
from fedge.codec import decode, encode_hashed
from fedge.edge_functions import tasks
from fedge.edge_functions.adapters.http import Receive, Send, _error, _read, _respond
from fedge.edge_functions.app import AppContext, AppError, checked_train, numeric, run
from fedge.edge_functions.events import Calibrated, Calibration, Job, JobDone
from fedge.edge_functions.functions import app_config, load_app, peak_memory_gb, timed_fits
from fedge.jsonlimits import JSONError, loads
from fedge.security import offload, signing
from fedge.security.peer import peer_certificate
from fedge.security.pki import Credentials, Identity, Role
from fedge.security.revocation import NotStanding, Standing
from fedge.transport import FedgeClient, ServerError
from fedge.wire import UpdateMeta

MAX_JOB = 256 * 1024 * 1024


class JobRefused(Exception):
    def __init__(self, status: int, code: str, detail: str) -> None:
        super().__init__(detail)
        self.status, self.code, self.detail = status, code, detail


@dataclass
class Executor:
    id: str
    federation: str
    server: str
    creds: Credentials
    standing: Standing  # the federation's CRL and current certificates (the executor's --pki directory)
    memory_gb: float | None = None  # the function's memory size, as billed (``--memory-gb``); None: its peak
    key: X25519PrivateKey = field(default_factory=X25519PrivateKey.generate)

    def key_statement(self) -> dict[str, str]:
        public = offload.raw_public(self.key)
        private = signing.load_private_key(self.creds.key.read_bytes())
        message = offload.key_message(self.federation, self.id, public)
        return {
            "executor": self.id,
            "public_key": public,
            "signature": signing.sign(private, message),
            "certificate": signing.encode_certificate(self.creds.cert.read_bytes()),
        }

    def run(self, job: Job, caller: Identity) -> JobDone:
        """Train ``job`` for ``caller`` (as TLS verified it), who must be the client the grant names."""
        started = time.perf_counter()
        try:
            grant, signer = signing.read_grant(self.creds.ca.read_bytes(), job.grant, time.time())
            self.standing.check(signer)
        except signing.SignatureError as exc:
            raise JobRefused(403, "bad_grant", str(exc)) from None
        except NotStanding as exc:
            raise JobRefused(
                403, "bad_grant", f"the certificate that signed the grant: {exc.detail}"
            ) from None
        if (grant.federation, grant.executor, grant.round) != (self.federation, self.id, job.round):
            raise JobRefused(
                403, "bad_grant", f"the grant is not for executor {self.id!r} in round {job.round}"
            )
        if caller != Identity(self.federation, Role.CLIENT, grant.client):
            raise JobRefused(403, "not_grant_holder", f"the grant is {grant.client!r}'s, not {caller.uri}'s")
        try:
            context = offload.shard_context(grant.federation, grant.round, grant.client, self.id)
            x, y = offload.decode_shard(offload.open_sealed(self.key, job.shard, context))
            loaded = load_app(job.task)
        except (offload.OffloadError, AppError) as exc:
            raise JobRefused(400, "bad_job", str(exc)) from None
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        with FedgeClient(self.server, self.creds) as api:
            downloading = time.perf_counter()
            download = api.model()
            assert download is not None  # no ETag was sent
            computing = time.perf_counter()
            base = decode(download.body)[0]
            config = app_config(job.config, job.round)
            with torch.device(device):  # the app's model and tensors are made on the executor's device
                result = checked_train(
                    run(lambda: loaded.train(base, (x, y), config, AppContext()), "train"), base
                )
            assert result.params is not None  # checked_train refuses a result without them
            metrics = numeric(result.metrics)
            loss = metrics.get("train_loss", 0.0)
            examples = max(1, round(result.num_examples * job.weight))
            seconds = time.perf_counter() - started
            gb = self.memory_gb if self.memory_gb is not None else peak_memory_gb()
            usage = pricing.executor_round(seconds, gb, device.type == "cuda", len(download.body))
            meta = UpdateMeta(
                examples, loss, download.sha256, raw_bytes=x.nbytes + y.nbytes, metrics=metrics, usage=usage
            )
            body, digest = encode_hashed(result.params, meta.to_metadata())
            uploading = time.perf_counter()
            receipt = api.post_update(job.round, body, grant=job.grant, body_sha256=digest)
            done = time.perf_counter()
        # Seconds per component, so the client's predictor learns this executor's own link and compute.
        return JobDone(
            client=grant.client,
            round=job.round,
            device=device.type,
            num_examples=examples,
            loss=loss,
            staleness=receipt.staleness,
            bytes_down=len(download.body),
            download_seconds=computing - downloading,
            compute_seconds=uploading - computing,
            bytes_up=len(body),
            upload_seconds=done - uploading,
            seconds=done - started,
        )

    def calibrate(self, calibration: Calibration) -> Calibrated:
        """Time two short runs of ``calibration.task`` on this executor's device, so a client's first
        decision weighs this executor by a measured line and not by optimism."""
        try:
            task = tasks.get(calibration.task)
        except tasks.UnknownTask as exc:
            raise JobRefused(400, "bad_calibration", str(exc)) from None
        examples = calibration.config.batch_size * calibration.steps[1]
        x, y = synthetic(calibration.shape, calibration.classes, examples)
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        try:
            points = timed_fits(task, x, y, calibration.config, calibration.steps, device)
        except RuntimeError as exc:  # inputs of a shape the task's model does not take
            raise JobRefused(
                400, "bad_calibration", f"the task's model cannot train on them: {exc}"
            ) from None
        small, large = points
        return Calibrated(executor=self.id, device=device.type, points=(small, large))


def synthetic(shape: list[int], classes: int, examples: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Random inputs and labels: what a step costs depends on their shape, not on their values."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((examples, *shape), dtype=np.float32)
    return x, rng.integers(0, classes, examples, dtype=np.int64)


def make_app(executor: Executor) -> Any:
    """The executor as a plain ASGI app (uvicorn serves it with the executor certificate, lifespan off)."""

    async def app(scope: dict[str, Any], receive: Receive, send: Send) -> None:
        route = (scope["method"], scope["path"])
        if route == ("GET", "/healthz"):
            await _respond(send, 200, {"status": "ok"})
        elif route == ("GET", "/v1/key"):
            await _respond(send, 200, executor.key_statement())
        elif route == ("POST", "/v1/jobs"):
            caller = _client_of(scope, executor.standing, "not_grant_holder")
            if isinstance(caller, JobRefused):
                await _respond(send, caller.status, _error(caller.code, caller.detail))
                return
            body = await _read(receive, MAX_JOB)
            if body is None:
                await _respond(send, 413, _error("job_too_large", f"jobs are at most {MAX_JOB} bytes"))
                return
            status, payload = await asyncio.to_thread(_invoke, executor, body, caller)
            await _respond(send, status, payload)
        elif route == ("POST", "/v1/calibrate"):
            caller = _client_of(scope, executor.standing, "wrong_role")
            if isinstance(caller, JobRefused):
                await _respond(send, caller.status, _error(caller.code, caller.detail))
                return
            body = await _read(receive)
            if body is None:
                await _respond(send, 413, _error("calibration_too_large", "a calibration is a small JSON"))
                return
            status, payload = await asyncio.to_thread(_calibrate, executor, body)
            await _respond(send, status, payload)
        else:
            routes = "GET /v1/key, POST /v1/jobs or POST /v1/calibrate"
            await _respond(send, 404, _error("not_found", routes))

    return app


def _client_of(scope: dict[str, Any], standing: Standing, refusal: str) -> Identity | JobRefused:
    """The calling client of the federation, as TLS verified it, with a certificate that counts (the one
    rule the server applies too: current, unrevoked, unexpired); anyone else is refused (``refusal`` for
    another role) before the body is read (TLS already refused a certificate of another CA)."""
    peer = peer_certificate(scope)  # type: ignore[arg-type]
    if peer is None:
        return JobRefused(401, "no_client_certificate", "a client certificate is required")
    try:
        caller = standing.check(x509.load_der_x509_certificate(peer))
    except NotStanding as exc:
        return JobRefused(403 if exc.code == "wrong_federation" else 401, exc.code, exc.detail)
    if caller.role is not Role.CLIENT:
        return JobRefused(
            403, refusal, f"only a client of {standing.federation!r} may call this, not {caller.uri}"
        )
    return caller


def _calibrate(executor: Executor, body: bytes) -> tuple[int, Any]:
    try:
        return 200, executor.calibrate(Calibration.model_validate_json(body)).model_dump()
    except ValidationError as exc:
        first = exc.errors()[0]
        return 400, _error("bad_calibration", f"{'.'.join(map(str, first['loc']))}: {first['msg']}")
    except JobRefused as exc:
        return exc.status, _error(exc.code, exc.detail)


def _invoke(executor: Executor, body: bytes, caller: Identity) -> tuple[int, Any]:
    try:
        return 200, executor.run(Job.model_validate(loads(body, max_bytes=MAX_JOB)), caller).model_dump()
    except JSONError as exc:
        return 400, _error("bad_job", f"the job is not JSON: {exc}")
    except ValidationError as exc:
        first = exc.errors()[0]
        return 400, _error("bad_job", f"{'.'.join(map(str, first['loc']))}: {first['msg']}")
    except JobRefused as exc:
        return exc.status, _error(exc.code, exc.detail)
    except ServerError as exc:
        return 502, _error(exc.code, exc.detail)
    except httpx.HTTPError as exc:  # the aggregation server is out of reach from here: the client falls back
        return 502, _error("server_unreachable", f"{executor.server}: {exc}")
