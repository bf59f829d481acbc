"""``fedge simulate``: a whole federation on one machine, with the same parts a deployment uses.

A throwaway PKI, the aggregation service in its own process behind mutual TLS, and each simulated client
an invocation of the edge ``train`` function on a warm worker pool, with its own certificate and its own
share of real data. This process only orchestrates: it imports neither torch nor the server.
"""

from __future__ import annotations

import json
import math
import tempfile
import time
from collections.abc import Callable
from concurrent.futures import FIRST_COMPLETED, Future, as_completed, wait
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from fedge import compression
from fedge.codec import decode
from fedge.console import UserError
from fedge.edge_functions import attacks, datasets, partition
from fedge.edge_functions.runtime import Invocation, WarmPool
from fedge.security import pki
from fedge.server.launcher import ServerProcess, launch
from fedge.settings import SimulationSettings
from fedge.transport import FedgeClient, ServerError
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
    stale_updates: int = 0  # asynchronous mode: updates folded from an older version


@dataclass
class Report:
    settings: dict
    rounds: list[RoundMetrics] = field(default_factory=list)
    seconds: float = 0.0
    cold_invocations: int = 0
    warm_invocations: int = 0
    attackers: list[str] = field(default_factory=list)
    stragglers: list[str] = field(default_factory=list)
    refused: dict[str, int] = field(default_factory=dict)  # updates the server refused, by error code
    model_metadata: dict[str, str] = field(default_factory=dict)  # e.g. the privacy spent (dp-fedavg)

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
    if settings.attack is not None and settings.attack not in attacks.KINDS:
        raise UserError(f"unknown attack {settings.attack!r}: choose from {', '.join(attacks.KINDS)}")
    if settings.compression not in compression.KINDS:
        raise UserError(
            f"unknown compression {settings.compression!r}: choose from {', '.join(compression.KINDS)}"
        )
    if settings.attackers > 0 and settings.attack is None:
        raise UserError("--attackers needs --attack sign-flip|scale|noise")
    started = time.perf_counter()
    report = Report(settings=settings.model_dump(mode="json"))
    report.attackers = pick_clients(settings.clients, settings.attackers, settings.seed)
    report.stragglers = pick_clients(settings.clients, settings.stragglers, settings.seed + 1)
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
                    driver = _run_async if settings.buffer else _run_rounds
                    driver(_Run(api, server.url, pool, work / "pki", observer, settings, report, on_round))
                    final = api.model()
                assert final is not None
                report.model_metadata = decode(final.body)[1]
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


def pick_clients(clients: int, fraction: float, seed: int) -> list[str]:
    """Which clients attack, or lag: ``round(fraction * clients)`` of them, drawn by the seed."""
    chosen = np.random.default_rng(seed).permutation(clients)[: round(fraction * clients)]
    return [client_id(int(i)) for i in sorted(chosen)]


def _start_server(work: Path, settings: SimulationSettings) -> ServerProcess:
    args = [
        "--pki", str(work / "pki"), "--host", "127.0.0.1", "--port", "0",
        "--task", settings.dataset, "--init-model", str(work / "initial.safetensors"),
        "--rounds", str(settings.rounds), "--min-clients", str(settings.clients),
        "--min-updates", str(math.ceil(settings.fraction * settings.clients)),
        "--round-timeout", str(settings.round_timeout), "--local-epochs", str(settings.local_epochs),
        "--batch-size", str(settings.batch_size), "--lr", str(settings.lr), "--seed", str(settings.seed),
        *settings.aggregation_flags(),
    ]  # fmt: skip
    return launch(args, work / "server", work / "server.log")


@dataclass
class _Run:
    """What a driver needs: the server's API and URL, the pool that runs client functions, who is who."""

    api: FedgeClient
    url: str
    pool: WarmPool
    pki_dir: Path
    observer: pki.Credentials
    settings: SimulationSettings
    report: Report
    on_round: Callable[[RoundMetrics], None]

    def train(self, info: RoundInfo, client: str) -> Future[Invocation]:
        return self.pool.invoke("train", _train_event(self, info, client))

    def outcome(self, future: Future[Invocation]) -> Invocation | None:
        """A finished training invocation, or None when the server refused its update (a late straggler,
        a client that already sent one to this version): the refusal is counted, the simulation goes on."""
        try:
            return future.result()
        except ServerError as exc:
            self.report.refused[exc.code] = self.report.refused.get(exc.code, 0) + 1
            return None

    def wait_until_open(self, info: RoundInfo | None = None) -> RoundInfo:
        info = info or self.api.current_round()
        while info.state is RoundState.WAITING:
            info = self.api.current_round(wait=5, etag=info.etag)
        return info

    def record(self, round_: int | None, results: list[Invocation], since: float) -> int:
        """Evaluate the current model and add a row for it (labelled ``round_``, else the version
        evaluated, which in asynchronous mode may be newer than the one that prompted it)."""
        seconds = time.perf_counter() - since
        evaluation = self.pool.invoke("evaluate", _evaluate_event(self.url, self.observer, self.settings))
        evaluated = evaluation.result()
        round_ = evaluated.result["round"] if round_ is None else round_
        for invocation in [*results, evaluated]:
            self.report.cold_invocations += invocation.cold
            self.report.warm_invocations += not invocation.cold
        metrics = RoundMetrics(
            round=round_,
            accuracy=evaluated.result["accuracy"],
            loss=evaluated.result["loss"],
            updates=len(results),
            seconds=seconds,
            bytes_up=sum(r.result["bytes_up"] for r in results),
            bytes_down=sum(r.result["bytes_down"] for r in results),
            stale_updates=sum(r.result["staleness"] > 0 for r in results),
            ended=time.time(),
        )
        self.report.rounds.append(metrics)
        self.on_round(metrics)
        return round_


def _run_rounds(run: _Run) -> None:
    """Synchronous rounds: invoke every selected client, then wait for the server to close the round."""
    info = run.wait_until_open()
    while info.state is not RoundState.FINISHED:
        opened = time.perf_counter()
        invocations = [run.train(info, client) for client in info.selected]
        results = [r for r in map(run.outcome, as_completed(invocations)) if r is not None]
        next_info = run.api.current_round()
        while next_info.etag == info.etag:
            next_info = run.api.current_round(wait=30, etag=info.etag)
        run.record(info.round, results, opened)
        info = run.wait_until_open(next_info)


def _run_async(run: _Run) -> None:
    """Asynchronous (FedBuff): each client trains again as soon as it is done, from whatever version is
    current; the server makes a version every ``--buffer`` updates, and stragglers' updates arrive stale."""
    info = run.wait_until_open()
    running: dict[Future[Invocation], str] = {}
    idle = list(info.selected)
    results: list[Invocation] = []
    since = time.perf_counter()
    recorded = 0
    while info.state is not RoundState.FINISHED:
        for client in idle:
            running[run.train(info, client)] = client
        done, _ = wait(running, timeout=1.0, return_when=FIRST_COMPLETED)
        idle = [running.pop(future) for future in done]
        results += [r for r in map(run.outcome, done) if r is not None]
        info = run.api.current_round()
        if run.api.model_meta().round > recorded:
            recorded = run.record(None, results, since)
            results, since = [], time.perf_counter()
    for future in running:  # stragglers still training when the federation finished: refused, counted
        run.outcome(future)


def _credentials_event(creds: pki.Credentials) -> dict:
    return {"ca": str(creds.ca), "cert": str(creds.cert), "key": str(creds.key)}


def _train_event(run: _Run, info: RoundInfo, client: str) -> dict:
    settings, report = run.settings, run.report
    return {
        "server": run.url,
        "credentials": _credentials_event(pki.credentials(run.pki_dir, pki.Role.CLIENT, client)),
        "task": info.task,
        "round": info.round,
        "config": info.config.model_dump(),
        "data": {
            "num_clients": settings.clients,
            "index": int(client.removeprefix("client-")),
            "partition": settings.partition,
            "seed": settings.seed,
        },
        "attack": {"kind": settings.attack, "scale": settings.attack_scale}
        if client in report.attackers
        else None,
        "delay": settings.straggler_delay if client in report.stragglers else 0.0,
        "compression": settings.compression,
        "model_sha256": info.model_sha256,
    }


def _evaluate_event(url: str, observer: pki.Credentials, settings: SimulationSettings) -> dict:
    return {"server": url, "credentials": _credentials_event(observer), "task": settings.dataset}


def _write_atomically(path: Path, body: bytes) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(body)
    tmp.replace(path)
