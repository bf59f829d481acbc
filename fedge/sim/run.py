"""``fedge simulate``: a whole federation on one machine, with the same parts a deployment uses.

A throwaway PKI, the aggregation service in its own process behind mutual TLS, and each simulated client
an invocation of the edge ``train`` function on a warm worker pool, with its own certificate and its own
share of real data. This process only orchestrates: it imports neither torch nor the server.

With ``--profile`` the clients become devices (``fedge.sim.fleet``): each has its own worker, slowed to its
profile, decides its placement every round as an agent does, and may have the executor process that
joins the run train for it. The report then says where every client-round ran, how many of the updates
asked for arrived before the deadline, and how many bytes of raw data left devices.
"""

from __future__ import annotations

import contextlib
import functools
import math
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, as_completed, wait
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from fedge import compression, descriptors, pricing
from fedge.client.planner import ExecutorTarget, Placer
from fedge.client.policy import Kind, OffloadSetting
from fedge.codec import decode
from fedge.console import UserError, console
from fedge.edge_functions import datasets, events, partition
from fedge.edge_functions.launcher import ExecutorProcess, launch_executor
from fedge.edge_functions.runtime import Invocation, WarmPool
from fedge.files import write_file
from fedge.security import pki
from fedge.server.launcher import ServerProcess, launch
from fedge.settings import SimulationSettings
from fedge.sim import apps, attacks, profiles
from fedge.sim.emulation import EMULATED_TRAIN, AttackSpec, EmulatedTrainEvent
from fedge.sim.fleet import Device, Fleet, Outcome, Pool, Rule
from fedge.sim.ray_pool import RayPool, require_ray
from fedge.sim.report import Report, RoundMetrics
from fedge.sim.sharded import ShardedPool
from fedge.transport import FedgeClient, ServerError
from fedge.wire import RoundInfo, RoundState, TrainConfig


def simulate(
    settings: SimulationSettings,
    on_round: Callable[[RoundMetrics], None] = lambda _: None,
    dashboard: int | None = None,
) -> Report:
    """``dashboard``: a port on 127.0.0.1 to serve the live page on while the federation runs."""
    _check(settings)
    devices = None
    if settings.profile is not None:
        if settings.buffer:
            raise UserError("--profile needs synchronous rounds: it cannot be combined with --buffer")
        try:
            devices = profiles.assign(profiles.load(settings.profile), settings.clients, settings.seed)
        except profiles.ProfileError as exc:
            raise UserError(str(exc)) from None
    workers = settings.workers if devices is None else settings.clients + 1
    descriptors.ensure(
        _descriptors_needed(settings.clients, workers), f"a simulation of {settings.clients} clients"
    )
    started = time.perf_counter()
    report = Report(settings=settings.model_dump(mode="json"))
    report.attackers = pick_clients(settings.clients, settings.attackers, settings.seed)
    report.stragglers = pick_clients(settings.clients, settings.stragglers, settings.seed + 1)
    with tempfile.TemporaryDirectory(prefix="fedge-sim-") as tmp:
        work = Path(tmp)
        observer = _make_pki(work / "pki", settings.clients)
        # With profiles, each device has its own worker: a slowed device waits, and must wait alone.
        pool = _pool(settings, workers)
        try:
            pool.warm()
            settings = apps.settle(pool, settings)
            report.settings = settings.model_dump(mode="json")
            event = events.InitialModelEvent(
                task=settings.dataset, seed=settings.seed, app=apps.spec(settings),
                run_config=apps.run_config(settings),
            )  # fmt: skip
            with apps.refused():
                initial = pool.invoke("initial_model", event).result()
            (work / "initial.safetensors").write_bytes(initial.result)
            server = _start_server(work, settings)
            try:
                with (
                    FedgeClient(server.url, observer) as api,
                    _dashboard(dashboard, server.url, observer, report),
                ):
                    run = _Run(api, server.url, pool, work / "pki", observer, settings, report, on_round)
                    if devices is not None:
                        _run_devices(run, devices, work)
                    elif settings.buffer:
                        _run_async(run)
                    else:
                        _run_rounds(run)
                    report.bill(api.overview()["rounds"])
                    final = api.model()
                assert final is not None
                report.model_metadata = decode(final.body)[1]
                settings.out.mkdir(parents=True, exist_ok=True)
                write_file(settings.out / "model.safetensors", final.body)
            finally:
                server.stop()
        finally:
            pool.close()
    if isinstance(pool, RayPool):
        report.nodes = dict(pool.nodes)
    report.seconds = time.perf_counter() - started
    write_file(settings.out / "metrics.json", report.to_json().encode())
    return report


@contextlib.contextmanager
def _dashboard(port: int | None, url: str, observer: pki.Credentials, report: Report) -> Iterator[None]:
    """The operator's page (``server.dashboard``) on ``port``, with the run's evaluations and placements."""
    if port is None:
        yield
        return
    from fedge.server.dashboard import Watch, serving

    watch = Watch(url, observer, local=report.live)
    watch.check()
    with serving(watch, port) as page:
        console.print(f"dashboard: {page}")
        yield


BACKENDS = ("local", "ray")


def _pool(settings: SimulationSettings, workers: int) -> Pool:
    """The local warm pool (of processes, or containers: ``--runtime container``), or Ray actors
    (``--backend ray``): the drivers see the same three calls."""
    if settings.backend == "ray":
        return RayPool(workers, settings.ray_address)
    instances = None
    if settings.runtime == "container":
        from fedge.edge_functions import containers

        try:  # a simulated client's data is its share of the data set, in the cache: no data mounts
            instances = containers.instances(
                containers.ContainerSettings(settings.image or containers.DEFAULT_IMAGE)
            )
        except containers.ContainerError as exc:
            raise UserError(str(exc)) from None
    if settings.profile is not None:  # a device per worker already: each device's own
        return WarmPool(workers, instances=instances)
    return ShardedPool(workers, instances)


def _descriptors_needed(clients: int, workers: int) -> int:
    """The server holds a connection per client whose worker keeps one open (each worker keeps at most
    ``CONNECTIONS_PER_WORKER``); the pool's pipes and the observer's connections are in the base."""
    return descriptors.needed_for(min(clients, workers * descriptors.CONNECTIONS_PER_WORKER) + workers)


def _check(settings: SimulationSettings) -> None:
    """Refuse settings no run can honour, with a one-line message, before anything starts."""
    if settings.app is not None and settings.flower_app is not None:
        raise UserError("--app and --flower-app name the clients' app twice: give one")
    if settings.profile is not None and (settings.app is not None or settings.flower_app is not None):
        raise UserError("--profile places rounds of the data set's own task: not of --app or --flower-app")
    if settings.flower_app is None and settings.dataset not in datasets.NAMES:
        raise UserError(f"unknown data set {settings.dataset!r}: choose from {', '.join(datasets.NAMES)}")
    try:
        partition.parse(settings.partition)
    except partition.PartitionError as exc:
        raise UserError(str(exc)) from None
    examples = len(datasets.load(settings.dataset).y_train)
    if settings.clients > examples:  # found here, not by every worker once the run has begun
        raise UserError(
            f"{settings.clients} clients but {settings.dataset} has {examples} training examples: "
            "use fewer clients or a larger data set (shakespeare)"
        )
    if settings.attack is not None and settings.attack not in attacks.KINDS:
        raise UserError(f"unknown attack {settings.attack!r}: choose from {', '.join(attacks.KINDS)}")
    if settings.compression not in compression.KINDS:
        raise UserError(
            f"unknown compression {settings.compression!r}: choose from {', '.join(compression.KINDS)}"
        )
    if settings.attackers > 0 and settings.attack is None:
        raise UserError("--attackers needs --attack sign-flip|scale|noise")
    if settings.backend not in BACKENDS:
        raise UserError(f"unknown backend {settings.backend!r}: choose from {', '.join(BACKENDS)}")
    if settings.ray_address is not None and settings.backend != "ray":
        raise UserError("--ray-address needs --backend ray")
    if settings.runtime == "container" and settings.backend == "ray":
        raise UserError("--runtime container hosts the local backend's clients: not with --backend ray")
    if settings.backend == "ray":
        if settings.profile is not None:
            raise UserError("--backend ray runs plain clients: it cannot be combined with --profile")
        require_ray()
    if settings.placement not in tuple(Rule):
        raise UserError(f"unknown placement {settings.placement!r}: choose from {', '.join(Rule)}")
    if settings.fraction_evaluate > 0 and (settings.buffer or settings.profile or settings.flower_app):
        raise UserError(
            "--fraction-evaluate asks clients after each synchronous round: not with --buffer or --profile,"
            " and a Flower app's share is its ServerApp's fraction_evaluate"
        )
    if settings.max_cost is not None and settings.profile is None:
        raise UserError("--max-cost is a device's budget: it needs --profile")
    try:
        pricing.prices_from(settings.prices)
    except pricing.PriceError as exc:
        raise UserError(str(exc)) from None


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
        "--min-updates", str(_quorum(settings)),
        "--round-timeout", str(settings.round_timeout), "--local-epochs", str(settings.local_epochs),
        "--batch-size", str(settings.batch_size), "--lr", str(settings.lr), "--seed", str(settings.seed),
        *settings.aggregation_flags(), *(["--manual-start"] if settings.profile is not None else []),
        "--presence-window", "0",  # the simulated clients speak only when a round asks them: all count
        *(["--prices", str(settings.prices)] if settings.prices is not None else []),
    ]  # fmt: skip
    return launch(args, work / "server", work / "server.log")


def _quorum(settings: SimulationSettings) -> int:
    """Every selected client, so a round waits for all; with profiles, whatever arrived by the deadline
    (a slow or vanished device is the point of those runs, not a reason to throw a round away)."""
    return 1 if settings.profile is not None else math.ceil(settings.fraction * settings.clients)


@dataclass
class _Run:
    """What a driver needs: the server's API and URL, the pool that runs client functions, who is who."""

    api: FedgeClient
    url: str
    pool: Pool
    pki_dir: Path
    observer: pki.Credentials
    settings: SimulationSettings
    report: Report
    on_round: Callable[[RoundMetrics], None]

    def train(self, info: RoundInfo, client: str) -> Future[Invocation]:
        return self.pool.invoke(EMULATED_TRAIN, _train_event(self, info, client))

    def outcome(self, future: Future[Invocation]) -> Invocation | None:
        """A finished training invocation, or None when the server refused its update (a late straggler,
        a client that already sent one to this version): the refusal is counted, the simulation goes on."""
        try:
            return future.result()
        except ServerError as exc:
            self.report.refused[exc.code] = self.report.refused.get(exc.code, 0) + 1
            return None

    def evaluate_asked(self, info: RoundInfo, round_: int) -> list[Invocation]:
        """Federated evaluation: each client the server asked about the model ``round_`` made scores it
        on its share of the held-out set and sends the figures, signed, as an agent does."""
        ask = info.evaluate
        if ask is None or ask.round != round_:
            return []
        settings = self.settings
        futures = [
            self.pool.invoke("evaluate", events.EvaluateEvent(
                server=self.url, credentials=events.CredentialPaths.of(
                    pki.credentials(self.pki_dir, pki.Role.CLIENT, client)),
                task=settings.dataset, app=apps.spec(settings), run_config=apps.run_config(settings),
                data=_data_event(settings, client).model_copy(update={"split": "test"}), asked=ask,
            ))
            for client in ask.clients
        ]  # fmt: skip
        return [future.result() for future in futures]

    def _federated(self, round_: int) -> dict[str, Any]:
        """The server's combined figures of the clients' evaluations of round ``round_``'s model."""
        figures = next(r for r in self.api.overview()["rounds"] if r["round"] == round_)
        return {
            "federated_accuracy": figures["federated_accuracy"], "federated_loss": figures["federated_loss"],
            "federated_examples": figures["federated_examples"],
        }  # fmt: skip

    def wait_until_open(self, info: RoundInfo | None = None) -> RoundInfo:
        info = info or self.api.current_round()
        while info.state is RoundState.WAITING:
            info = self.api.current_round(wait=5, etag=info.etag)
        return info

    def record(
        self,
        round_: int | None,
        results: list[Invocation],
        since: float,
        offloaded: int = 0,
        asked: list[Invocation] | None = None,
    ) -> int:
        """Evaluate the current model and add a row for it (labelled ``round_``, else the version
        evaluated, which in asynchronous mode may be newer than the one that prompted it). ``offloaded``:
        updates an executor trained, which ran on no worker of this pool; ``asked``: the clients' own
        evaluations (``evaluate_asked``), whose combined figures the row takes from the server."""
        seconds = time.perf_counter() - since
        trained = [events.TrainResult.model_validate(r.result) for r in results]
        evaluation = _evaluate_event(self.url, self.observer, self.settings)
        evaluated, score = apps.evaluate(self.pool, self.settings, evaluation, round_ or 0)
        round_ = score.round if round_ is None else round_
        for invocation in [*results, *evaluated, *(asked or [])]:
            self.report.cold_invocations += invocation.cold
            self.report.warm_invocations += not invocation.cold
        metrics = RoundMetrics(
            round=round_,
            accuracy=score.accuracy,
            loss=score.loss,
            train_metrics=apps.aggregate(
                self.pool, self.settings, "train", [(t.num_examples, t.metrics) for t in trained]
            ),
            evaluate_metrics=score.metrics,
            updates=len(results) + offloaded,
            seconds=seconds,
            bytes_up=sum(t.bytes_up for t in trained),
            bytes_down=sum(t.bytes_down for t in trained),
            stale_updates=sum((t.staleness or 0) > 0 for t in trained),
            ended=time.time(),
            **(self._federated(round_) if asked else {}),
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
        run.report.asked += len(invocations)
        run.report.arrived += len(results)
        run.report.placements[Kind.EDGE] = run.report.placements.get(Kind.EDGE, 0) + len(invocations)
        next_info = run.api.current_round()
        while next_info.etag == info.etag:
            next_info = run.api.current_round(wait=30, etag=info.etag)
        evaluated = run.evaluate_asked(next_info, info.round)
        run.record(info.round, results, opened, asked=evaluated)
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


def _run_devices(run: _Run, profiled: list[profiles.DeviceProfile], work: Path) -> None:
    """Synchronous rounds of profiled devices: each selected device plays its round in its own thread;
    the next round starts when the server closes this one, whoever is still busy (a late device is
    refused when it arrives, and starts its next round late)."""
    settings = run.settings
    rule = Rule(settings.placement)
    executor = None
    if any(rule.setting(p.offload) is not OffloadSetting.NEVER for p in profiled):
        process = _start_executor(work, run.url)
        executor = ExecutorTarget("executor-0", process.url)
    try:
        fleet = _fleet(run, profiled, rule, executor)
        config = TrainConfig(
            local_epochs=settings.local_epochs, batch_size=settings.batch_size, learning_rate=settings.lr
        )
        fleet.prepare(settings.dataset, config)
        run.api.start()  # the server held round 1 (--manual-start) until the devices were ready
        threads = ThreadPoolExecutor(settings.clients, thread_name_prefix="device")
        recorder = ThreadPoolExecutor(1, thread_name_prefix="record")
        playing: list[Future[Outcome]] = []
        recorded: list[Future[int]] = []
        info = run.wait_until_open()
        while info.state is not RoundState.FINISHED:
            opened = time.perf_counter()
            fleet.new_round()
            playing += [threads.submit(fleet.play, info, client) for client in info.selected]
            closed = run.api.current_round()
            while closed.etag == info.etag:
                closed = run.api.current_round(wait=30, etag=info.etag)
            finished = [f for f in playing if f.done()]
            playing = [f for f in playing if not f.done()]
            outcomes = [f.result() for f in finished]
            for outcome in outcomes:
                run.report.count(outcome)
            arrived = [o for o in outcomes if o.accepted]
            # Devices hear of the next round at once; this one's evaluation runs beside it, in order.
            recorded.append(
                recorder.submit(
                    run.record, info.round, [o.invocation for o in arrived if o.invocation is not None],
                    opened, sum(o.invocation is None for o in arrived),
                )
            )  # fmt: skip
            info = run.wait_until_open(closed)
        for outcome in map(Future.result, playing):  # still busy when the federation finished: late
            run.report.count(outcome)
        for future in recorded:
            future.result()
        threads.shutdown()
        recorder.shutdown()
    finally:
        if executor is not None:
            process.stop()


def _start_executor(work: Path, server: str) -> ExecutorProcess:
    pki.issue(work / "pki", pki.Role.EXECUTOR, "executor-0", hosts=("127.0.0.1", "localhost"))
    return launch_executor(work / "pki", "executor-0", server, work / "executor.log")


def _fleet(
    run: _Run, profiled: list[profiles.DeviceProfile], rule: Rule, executor: ExecutorTarget | None
) -> Fleet:
    settings = run.settings
    data = datasets.load(settings.dataset)
    parts = partition.split(
        data.y_train, settings.clients, settings.partition, settings.seed, data.groups_train
    )
    train_memory = int(settings.train_memory_mb * 1024 * 1024)
    prices = pricing.prices_from(settings.prices)
    max_cost = math.inf if settings.max_cost is None else settings.max_cost
    devices = []
    for index, profile in enumerate(profiled):
        client = client_id(index)
        setting = rule.setting(profile.offload)
        executors = (executor,) if executor is not None and setting is not OffloadSetting.NEVER else ()
        devices.append(
            Device(
                client, index, profile, pki.credentials(run.pki_dir, pki.Role.CLIENT, client),
                (data.x_train[parts[index]].astype(np.float32), data.y_train[parts[index]].astype(np.int64)),
                Placer(setting, executors, train_memory, rule.policy, prices, max_cost), threading.Lock(),
            )
        )  # fmt: skip
    return Fleet(
        devices, rule, run.pool, run.url, executor, functools.partial(_train_event, run),
        functools.partial(_data_event, settings), train_memory, settings.seed,
    )  # fmt: skip


def _train_event(run: _Run, info: RoundInfo, client: str) -> EmulatedTrainEvent:
    settings, report = run.settings, run.report
    attack = (
        AttackSpec(kind=settings.attack, scale=settings.attack_scale) if client in report.attackers else None
    )
    return EmulatedTrainEvent(
        server=run.url,
        credentials=events.CredentialPaths.of(pki.credentials(run.pki_dir, pki.Role.CLIENT, client)),
        task=info.task,
        round=info.round,
        config=info.config,
        data=apps.data(settings, _data_event(settings, client)),
        app=apps.spec(settings),
        run_config=apps.run_config(settings),
        attack=attack,
        delay=settings.straggler_delay if client in report.stragglers else 0.0,
        compression=settings.compression,
        model_sha256=info.model_sha256,
    )


def _data_event(settings: SimulationSettings, client: str) -> events.DataSpec:
    """Which share of the data set ``client`` holds."""
    return events.DataSpec(
        num_clients=settings.clients,
        index=int(client.removeprefix("client-")),
        partition=settings.partition,
        seed=settings.seed,
    )


def _evaluate_event(
    url: str, observer: pki.Credentials, settings: SimulationSettings
) -> events.EvaluateEvent:
    return events.EvaluateEvent(
        server=url, credentials=events.CredentialPaths.of(observer), task=settings.dataset,
        app=apps.spec(settings), run_config=apps.run_config(settings),
    )  # fmt: skip
