"""``fedge simulate``: a whole federation on one machine, with the same parts a deployment uses.

A throwaway PKI, the aggregation service in its own process behind mutual TLS, and each simulated client
an invocation of the edge ``train`` function on a warm worker pool, with its own certificate and its own
share of real data. This process only orchestrates: it imports neither torch nor the server.
"""

from __future__ import annotations

import json
import tempfile
import time
from collections.abc import Callable
from concurrent.futures import as_completed
from dataclasses import asdict, dataclass, field
from pathlib import Path

from fedge.console import UserError
from fedge.edge_functions import datasets, partition
from fedge.edge_functions.runtime import WarmPool
from fedge.security import pki
from fedge.server.launcher import ServerProcess, launch
from fedge.settings import SimulationSettings
from fedge.transport import FedgeClient
from fedge.wire import RoundInfo, RoundState


@dataclass
class RoundMetrics:
    round: int
    accuracy: float
    loss: float
    updates: int
    seconds: float
    bytes_up: int
    bytes_down: int
    ended: float  # Unix time when the round's evaluation finished


@dataclass
class Report:
    settings: dict
    rounds: list[RoundMetrics] = field(default_factory=list)
    seconds: float = 0.0
    cold_invocations: int = 0
    warm_invocations: int = 0

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2, default=str)


def simulate(
    settings: SimulationSettings, on_round: Callable[[RoundMetrics], None] = lambda _: None
) -> Report:
    if settings.dataset not in datasets.NAMES:
        raise UserError(f"unknown data set {settings.dataset!r}: choose from {', '.join(datasets.NAMES)}")
    try:
        partition.parse(settings.partition)
    except partition.PartitionError as exc:
        raise UserError(str(exc)) from None
    started = time.perf_counter()
    report = Report(settings=settings.model_dump(mode="json"))
    with tempfile.TemporaryDirectory(prefix="fedge-sim-") as tmp:
        work = Path(tmp)
        observer = _make_pki(work / "pki", settings.clients)
        pool = WarmPool(settings.workers)
        try:
            pool.warm()
            initial = pool.invoke("initial_model", {"task": settings.dataset, "seed": settings.seed}).result()
            (work / "initial.safetensors").write_bytes(initial.result)
            server = _start_server(work, settings)
            try:
                with FedgeClient(server.url, observer) as api:
                    _run_rounds(api, server.url, pool, work / "pki", observer, settings, report, on_round)
                    final = api.model()
                assert final is not None
                settings.out.mkdir(parents=True, exist_ok=True)
                _write_atomically(settings.out / "model.safetensors", final.body)
            finally:
                server.stop()
        finally:
            pool.close()
    report.seconds = time.perf_counter() - started
    _write_atomically(settings.out / "metrics.json", report.to_json().encode())
    return report


def _make_pki(pki_dir: Path, clients: int) -> pki.Credentials:
    pki.init_ca(pki_dir, "simulation")
    pki.issue(pki_dir, pki.Role.SERVER, "server", hosts=("127.0.0.1", "localhost"))
    for index in range(clients):
        pki.issue(pki_dir, pki.Role.CLIENT, client_id(index))
    return pki.issue(pki_dir, pki.Role.ADMIN, "simulator")


def client_id(index: int) -> str:
    return f"client-{index:04d}"


def _start_server(work: Path, settings: SimulationSettings) -> ServerProcess:
    args = [
        "--pki", str(work / "pki"), "--host", "127.0.0.1", "--port", "0",
        "--task", settings.dataset, "--init-model", str(work / "initial.safetensors"),
        "--rounds", str(settings.rounds), "--min-clients", str(settings.clients),
        "--min-updates", str(settings.clients), "--round-timeout", str(settings.round_timeout),
        "--local-epochs", str(settings.local_epochs), "--batch-size", str(settings.batch_size),
        "--lr", str(settings.lr),
    ]  # fmt: skip
    return launch(args, work / "server", work / "server.log")


def _run_rounds(
    api: FedgeClient,
    url: str,
    pool: WarmPool,
    pki_dir: Path,
    observer: pki.Credentials,
    settings: SimulationSettings,
    report: Report,
    on_round: Callable[[RoundMetrics], None],
) -> None:
    info = api.current_round()
    while info.state is not RoundState.FINISHED:
        if info.state is RoundState.WAITING:
            info = api.current_round(wait=5, etag=info.etag)
            continue
        opened = time.perf_counter()
        invocations = [
            pool.invoke("train", _train_event(url, pki_dir, settings, info, c)) for c in info.selected
        ]
        results = [future.result() for future in as_completed(invocations)]
        next_info = api.current_round()
        while next_info.etag == info.etag:
            next_info = api.current_round(wait=30, etag=info.etag)
        seconds = time.perf_counter() - opened
        evaluation = pool.invoke("evaluate", _evaluate_event(url, observer, settings)).result()
        for invocation in [*results, evaluation]:
            report.cold_invocations += invocation.cold
            report.warm_invocations += not invocation.cold
        metrics = RoundMetrics(
            round=info.round,
            accuracy=evaluation.result["accuracy"],
            loss=evaluation.result["loss"],
            updates=len(results),
            seconds=seconds,
            bytes_up=sum(r.result["bytes_up"] for r in results),
            bytes_down=sum(r.result["bytes_down"] for r in results),
            ended=time.time(),
        )
        report.rounds.append(metrics)
        on_round(metrics)
        info = next_info


def _credentials_event(creds: pki.Credentials) -> dict:
    return {"ca": str(creds.ca), "cert": str(creds.cert), "key": str(creds.key)}


def _train_event(url: str, pki_dir: Path, settings: SimulationSettings, info: RoundInfo, client: str) -> dict:
    return {
        "server": url,
        "credentials": _credentials_event(pki.credentials(pki_dir, pki.Role.CLIENT, client)),
        "task": info.task,
        "round": info.round,
        "config": info.config.model_dump(),
        "data": {
            "num_clients": settings.clients,
            "index": int(client.removeprefix("client-")),
            "partition": settings.partition,
            "seed": settings.seed,
        },
    }


def _evaluate_event(url: str, observer: pki.Credentials, settings: SimulationSettings) -> dict:
    return {"server": url, "credentials": _credentials_event(observer), "task": settings.dataset}


def _write_atomically(path: Path, body: bytes) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(body)
    tmp.replace(path)
