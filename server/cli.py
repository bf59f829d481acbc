"""``fedge server``: run the aggregation function over mutual TLS."""

from __future__ import annotations

import datetime as dt
import inspect
import threading
import time
from collections.abc import Callable
from dataclasses import fields
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, TypeVar

import typer

from fedge import descriptors, pricing
from fedge.console import UserError, user_errors, warn
from fedge.files import made_dir
from fedge.security import pki
from fedge.server import lock
from fedge.server.strategies import Strategy, StrategyError, registry
from fedge.settings import ServerSettings, TrainingSettings

if TYPE_CHECKING:
    from fedge.mqtt import BrokerAddress
    from fedge.server.announce import Announcer
    from fedge.server.rounds import Federation, FederationSettings
    from fedge.server.trust import Trust

# Selection and mode, shared with ``fedge simulate`` (the strategies' own options come from the registry).
Fraction = Annotated[float | None, typer.Option(help="share of clients selected per round [1.0]")]
FractionEvaluate = Annotated[
    float | None,
    typer.Option(help="share of clients asked to score each new model on their own held-out data [0]"),
]
EvaluateEvery = Annotated[
    int | None, typer.Option(help="federated evaluation every K rounds, and the last [1]")
]
Buffer = Annotated[
    int | None, typer.Option(help="asynchronous (FedBuff): a version every K updates; 0 = rounds [0]")
]
MaxStaleness = Annotated[int | None, typer.Option(help="asynchronous: versions an update may lag [5]")]
StalenessExponent = Annotated[
    float | None, typer.Option(help="asynchronous: weight (1 + staleness) ** -exponent [0.5]")
]

Command = TypeVar("Command", bound=Callable[..., None])


def strategy_options(command: Command) -> Command:
    """Give a command ``--strategy`` and one option per parameter of the registered strategies, with the
    type and help their declarations give; the command takes them as ``**knobs``. Each defaults to None
    (not given), so that ``FEDGE_*`` and ``fedge.toml`` apply."""
    keyword = inspect.Parameter.KEYWORD_ONLY
    choices = f"{', '.join(registry.STRATEGIES)} [{TrainingSettings.model_fields['strategy'].default}]"
    added = [
        inspect.Parameter(
            "strategy", keyword, default=None, annotation=Annotated[str | None, typer.Option(help=choices)]
        )
    ]
    for option in registry.options().values():
        kind = Annotated[option.flag_type | None, typer.Option(help=option.help_text)]
        added.append(inspect.Parameter(option.name, keyword, default=None, annotation=kind))
    signature = inspect.signature(command, eval_str=True)
    kept = [p for p in signature.parameters.values() if p.kind is not inspect.Parameter.VAR_KEYWORD]
    command.__signature__ = signature.replace(parameters=[*kept, *added])  # type: ignore[attr-defined]
    return command


def strategy_of(settings: TrainingSettings) -> Strategy:
    """The configured strategy; a bad name or parameter is a ``UserError``."""
    try:
        return registry.pick(
            settings.strategy, settings.model_dump(include=set(settings.knobs)), settings.seed
        )
    except StrategyError as exc:
        raise UserError(str(exc)) from None


def federation_settings(
    settings: ServerSettings, federation: str, prices: pricing.Prices
) -> FederationSettings:
    """The round control's settings: every field they share with the server's, copied by name, and the
    price table its ``--prices`` file holds."""
    from fedge.server.rounds import FederationSettings
    from fedge.wire import TrainConfig

    shared = {
        f.name: getattr(settings, f.name)
        for f in fields(FederationSettings)
        if f.name in ServerSettings.model_fields and f.name != "prices"  # a file there, its table here
    }
    train = TrainConfig(
        local_epochs=settings.local_epochs, batch_size=settings.batch_size, learning_rate=settings.lr
    )
    return FederationSettings(federation=federation, train=train, prices=prices, **shared)


@strategy_options
def server(
    pki_dir: Annotated[
        Path | None, typer.Option("--pki", file_okay=False, help="PKI directory (fedge pki init)")
    ] = None,
    data: Annotated[Path | None, typer.Option(help="where models, updates and round state are kept")] = None,
    store: Annotated[
        str | None, typer.Option(help="round state in PostgreSQL (postgresql://...) [SQLite in --data]")
    ] = None,
    blobs: Annotated[
        Path | None,
        typer.Option(
            file_okay=False, help="models and updates here, shared by replicas on one --store [in --data]"
        ),
    ] = None,
    host: Annotated[str | None, typer.Option(help="address to listen on [127.0.0.1]")] = None,
    port: Annotated[int | None, typer.Option(help="port; 0 picks a free one [8443]")] = None,
    task: Annotated[str | None, typer.Option(help="task the federation trains [mnist]")] = None,
    init_model: Annotated[Path | None, typer.Option(help="initial global model (safetensors)")] = None,
    rounds: Annotated[int | None, typer.Option(help="rounds to run [10]")] = None,
    min_clients: Annotated[
        int | None, typer.Option(help="live clients (seen within --presence-window) a round needs [1]")
    ] = None,
    min_updates: Annotated[int | None, typer.Option(help="updates a round needs to aggregate [1]")] = None,
    round_timeout: Annotated[float | None, typer.Option(help="seconds a round stays open [600]")] = None,
    max_update_norm: Annotated[
        float | None, typer.Option(help="refuse updates farther than this L2 distance from the model [off]")
    ] = None,
    local_epochs: Annotated[int | None, typer.Option(help="local epochs per round [1]")] = None,
    batch_size: Annotated[int | None, typer.Option(help="client batch size [32]")] = None,
    lr: Annotated[float | None, typer.Option(help="client learning rate [0.05]")] = None,
    seed: Annotated[
        int | None, typer.Option(help="seed of the initial model, selection and noise [0]")
    ] = None,
    fraction: Fraction = None,
    fraction_evaluate: FractionEvaluate = None,
    evaluate_every: EvaluateEvery = None,
    buffer: Buffer = None,
    max_staleness: MaxStaleness = None,
    staleness_exponent: StalenessExponent = None,
    mqtt: Annotated[str | None, typer.Option(help="announce rounds on this MQTT broker, HOST:PORT")] = None,
    manual_start: Annotated[
        bool | None, typer.Option("--manual-start", help="hold round 1 until an admin starts the federation")
    ] = None,
    presence_window: Annotated[
        float | None,
        typer.Option(
            help="seconds since a client was last seen for it to be selected; 0: every enrolled [180]"
        ),
    ] = None,
    eval_data: Annotated[
        Path | None,
        typer.Option(dir_okay=False, help="score each new global model on this .npz (x, y) [off]"),
    ] = None,
    log_format: Annotated[
        str | None,
        typer.Option(help="the round log: text (a line per event) or json (an object each) [text]"),
    ] = None,
    serve_after_finish: Annotated[
        bool | None,
        typer.Option("--serve-after-finish", help="keep serving once the last round closed [exit 0]"),
    ] = None,
    enrolled_days: Annotated[
        int | None,
        typer.Option(min=1, max=365, help="lifetime of the certificates enrollment and renewal issue [7]"),
    ] = None,
    prices: Annotated[
        Path | None,
        typer.Option(dir_okay=False, help="price table (TOML) rounds are billed at [example rates]"),
    ] = None,
    **knobs: Any,
) -> None:
    """Serve the global model read-only and aggregate each selected client's update, round after round;
    exit once the last round has closed."""
    from fedge.server.store import Store, StoreError

    with user_errors(pki.PKIError, ValueError, OSError, StoreError, pricing.PriceError):
        settings = ServerSettings.with_knobs(registry.settings_fields()).from_flags(
            pki=pki_dir, data=data, store=store, blobs=blobs, host=host, port=port, task=task,
            init_model=init_model, rounds=rounds, min_clients=min_clients, min_updates=min_updates,
            round_timeout=round_timeout, max_update_norm=max_update_norm,
            local_epochs=local_epochs, batch_size=batch_size, lr=lr, seed=seed, fraction=fraction,
            fraction_evaluate=fraction_evaluate, evaluate_every=evaluate_every, buffer=buffer,
            max_staleness=max_staleness, staleness_exponent=staleness_exponent, mqtt=mqtt,
            manual_start=manual_start, presence_window=presence_window, eval_data=eval_data,
            log_format=log_format, serve_after_finish=serve_after_finish, enrolled_days=enrolled_days,
            prices=prices, **knobs,
        )  # fmt: skip
        priced = pricing.prices_from(settings.prices)
        chosen = strategy_of(settings)
        from fedge.server import metrics, roundlog, service
        from fedge.server.app import create_app
        from fedge.server.evaluation import ServerEvaluation
        from fedge.server.presence import PresenceExchange
        from fedge.server.rounds import Federation
        from fedge.server.trust import Trust

        creds = pki.credentials(settings.pki, pki.Role.SERVER, "server")
        trust = Trust.load(settings.pki, enrolled_lifetime=dt.timedelta(days=settings.enrolled_days))
        clients = max(settings.min_clients, len(pki.issued(settings.pki, pki.Role.CLIENT)))
        descriptors.ensure(descriptors.needed_for(clients), f"a server of {clients} clients")
        sock = service.bind(settings.host, settings.port)
        if settings.init_model is None:
            _check_task(settings.task)
        broker = _broker(settings.mqtt)
        evaluation = (
            None if settings.eval_data is None else ServerEvaluation.load(settings.task, settings.eval_data)
        )
        finished = threading.Event()
        log = roundlog.RoundLog(roundlog.LineWriter(settings.log_format), metrics.record)
        log.listen(lambda event: finished.set() if event.event is roundlog.Event.FINISHED else None)
        # Everything a user can get wrong is checked above; --data is made (or taken) only now, and removed
        # again if it was made here and the service still cannot start.
        with made_dir(settings.data):
            held = lock.hold(settings.data)
            store = Store(settings.data, settings.store, settings.blobs)
            store.claim_blobs()
            federation = Federation(
                store,
                federation_settings(settings, pki.federation_of(settings.pki), priced),
                registered_clients=lambda: trust.eligible(settings.presence_window),
                initial_model=_initial_model(settings) if store.get_meta("global_sha256") is None else None,
                strategy=chosen,
                log=log,
            )
            exchange = None  # replicas may share the store: whom each saw is shared through it
            if settings.store is not None:
                own = Store(settings.data, settings.store, settings.blobs)
                exchange = PresenceExchange(trust.presence, own)
        announcer = None if broker is None else _announcer(federation, broker, creds, trust)
        metrics.start(federation.round_info())
        metrics.price_with(priced)
        metrics.watch(creds.cert.read_bytes(), trust.ca_pem, settings.pki / "crl.pem", trust.presence)
        log.emit(roundlog.serving(f"https://{settings.host}:{sock.getsockname()[1]}", time.time()))
        if evaluation is not None:
            model = federation.model
            own = Store(settings.data, settings.store, settings.blobs)  # it writes from its own thread
            evaluation.start(own, log, model.round, model.sha256)
    try:
        service.serve(
            create_app(federation, trust, exchange), creds, sock, settings.data / "endpoint.json",
            until=None if settings.serve_after_finish else finished,
        )  # fmt: skip
    finally:
        if evaluation is not None:
            evaluation.close()
        if announcer is not None:
            announcer.close()
        held.close()


def _check_task(name: str) -> None:
    """A task the server is to build the initial model of is refused, if unknown, before anything is made.
    (With --init-model the server only sees named tensors, and the task is the clients' business.)"""
    try:
        from fedge.edge_functions import tasks
    except ImportError:
        return
    try:
        tasks.get(name)
    except tasks.UnknownTask as exc:
        raise UserError(str(exc)) from None


def _broker(address: str | None) -> BrokerAddress | None:
    """The broker to announce on; a host that does not resolve now is said once (paho then retries it,
    with backoff, without a word)."""
    if address is None:
        return None
    from fedge.mqtt import BrokerAddress, unresolved

    broker = BrokerAddress.parse(address)
    if (why := unresolved(broker)) is not None:
        warn(f"{why}; retrying with backoff")
    return broker


def _announcer(
    federation: Federation, broker: BrokerAddress, creds: pki.Credentials, trust: Trust
) -> Announcer:
    from fedge.server.announce import Announcer

    return Announcer(federation, broker, creds, trust.presence)


def _initial_model(settings: ServerSettings) -> bytes:
    if settings.init_model is not None:
        if not settings.init_model.is_file():
            raise UserError(f"initial model {settings.init_model} does not exist")
        return settings.init_model.read_bytes()
    try:
        from fedge.edge_functions.events import InitialModelEvent
        from fedge.edge_functions.functions import initial_model
    except ImportError:
        raise UserError(
            "no --init-model given, and torch is not installed to build one from the task"
        ) from None
    event = InitialModelEvent(task=settings.task, seed=settings.seed)
    return initial_model(event.model_dump(mode="json"), None)  # type: ignore[arg-type]
