"""``fedge server``: run the aggregation function over mutual TLS."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from fedge.console import UserError, console, user_errors
from fedge.security import pki
from fedge.settings import STRATEGY_PARAMS, ServerSettings, TrainingSettings

if TYPE_CHECKING:
    from fedge.server.announce import Announcer
    from fedge.server.rounds import Federation
    from fedge.server.strategies import Strategy

# The strategy's options, shared with ``fedge simulate``.
StrategyName = Annotated[
    str | None,
    typer.Option(
        help="fedavg, fedprox, fedadam, fedyogi, fedadagrad, dp-fedavg, fedmedian, trimmed-mean, krum or"
        " bulyan [fedavg]"
    ),
]
Fraction = Annotated[float | None, typer.Option(help="share of clients selected per round [1.0]")]
ProximalMu = Annotated[float | None, typer.Option(help="fedprox: proximal term weight mu [0]")]
ServerLr = Annotated[float | None, typer.Option(help="fedadam/fedyogi/fedadagrad: server step [Flower's]")]
Beta1 = Annotated[float | None, typer.Option(help="fedadam/fedyogi: first-moment decay [0.9]")]
Beta2 = Annotated[float | None, typer.Option(help="fedadam/fedyogi: second-moment decay [0.99]")]
Tau = Annotated[float | None, typer.Option(help="fedadam/fedyogi/fedadagrad: adaptivity [Flower's]")]
TrimFraction = Annotated[float | None, typer.Option(help="trimmed-mean: share cut at each end [0.2]")]
Malicious = Annotated[int | None, typer.Option(help="krum/bulyan: malicious clients tolerated [0]")]
Keep = Annotated[int | None, typer.Option(help="krum: average the KEEP best (Multi-Krum); 0 = Krum [0]")]
ClipNorm = Annotated[float | None, typer.Option(help="dp-fedavg: L2 bound of each update's change [1.0]")]
NoiseMultiplier = Annotated[float | None, typer.Option(help="dp-fedavg: noise std / clip norm [1.0]")]
DpDelta = Annotated[float | None, typer.Option(help="dp-fedavg: delta of the privacy spent [1e-5]")]
Buffer = Annotated[
    int | None, typer.Option(help="asynchronous (FedBuff): a version every K updates; 0 = rounds [0]")
]
MaxStaleness = Annotated[int | None, typer.Option(help="asynchronous: versions an update may lag [5]")]
StalenessExponent = Annotated[
    float | None, typer.Option(help="asynchronous: weight (1 + staleness) ** -exponent [0.5]")
]


def strategy_of(settings: TrainingSettings) -> Strategy:
    """The configured strategy; a bad name or parameter is a ``UserError``."""
    from fedge.server.strategies import StrategyError, StrategyParams, create

    params = {name: getattr(settings, name) for name in STRATEGY_PARAMS}
    try:
        return create(settings.strategy, StrategyParams(seed=settings.seed, **params))
    except StrategyError as exc:
        raise UserError(str(exc)) from None


def server(
    pki_dir: Annotated[Path | None, typer.Option("--pki", help="PKI directory (fedge pki init)")] = None,
    data: Annotated[Path | None, typer.Option(help="where models, updates and round state are kept")] = None,
    store: Annotated[
        str | None, typer.Option(help="round state in PostgreSQL (postgresql://...) [SQLite in --data]")
    ] = None,
    host: Annotated[str | None, typer.Option(help="address to listen on [127.0.0.1]")] = None,
    port: Annotated[int | None, typer.Option(help="port; 0 picks a free one [8443]")] = None,
    task: Annotated[str | None, typer.Option(help="task the federation trains [mnist]")] = None,
    init_model: Annotated[Path | None, typer.Option(help="initial global model (safetensors)")] = None,
    rounds: Annotated[int | None, typer.Option(help="rounds to run [10]")] = None,
    min_clients: Annotated[int | None, typer.Option(help="registered clients before round 1 [1]")] = None,
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
    strategy: StrategyName = None,
    proximal_mu: ProximalMu = None,
    server_lr: ServerLr = None,
    beta1: Beta1 = None,
    beta2: Beta2 = None,
    tau: Tau = None,
    trim_fraction: TrimFraction = None,
    malicious: Malicious = None,
    keep: Keep = None,
    clip_norm: ClipNorm = None,
    noise_multiplier: NoiseMultiplier = None,
    dp_delta: DpDelta = None,
    buffer: Buffer = None,
    max_staleness: MaxStaleness = None,
    staleness_exponent: StalenessExponent = None,
    mqtt: Annotated[str | None, typer.Option(help="announce rounds on this MQTT broker, HOST:PORT")] = None,
    manual_start: Annotated[
        bool | None, typer.Option("--manual-start", help="hold round 1 until an admin starts the federation")
    ] = None,
) -> None:
    """Serve the global model read-only and aggregate each selected client's update, round after round."""
    from fedge.server.store import Store, StoreError

    with user_errors(pki.PKIError, ValueError, OSError, StoreError):
        settings = ServerSettings.from_flags(
            pki=pki_dir, data=data, store=store, host=host, port=port, task=task, init_model=init_model,
            rounds=rounds, min_clients=min_clients, min_updates=min_updates, round_timeout=round_timeout,
            max_update_norm=max_update_norm,
            local_epochs=local_epochs, batch_size=batch_size, lr=lr, seed=seed, fraction=fraction,
            strategy=strategy, proximal_mu=proximal_mu, server_lr=server_lr, beta1=beta1, beta2=beta2,
            tau=tau, trim_fraction=trim_fraction, malicious=malicious, keep=keep, clip_norm=clip_norm,
            noise_multiplier=noise_multiplier, dp_delta=dp_delta, buffer=buffer, max_staleness=max_staleness,
            staleness_exponent=staleness_exponent, mqtt=mqtt, manual_start=manual_start,
        )  # fmt: skip
        chosen = strategy_of(settings)
        from fedge.server import service
        from fedge.server.app import create_app
        from fedge.server.rounds import Federation, FederationSettings
        from fedge.server.trust import Trust
        from fedge.wire import TrainConfig

        creds = pki.credentials(settings.pki, pki.Role.SERVER, "server")
        trust = Trust.load(settings.pki)
        fed_settings = FederationSettings(
            federation=pki.federation_of(settings.pki),
            task=settings.task,
            rounds=settings.rounds,
            min_clients=settings.min_clients,
            min_updates=settings.min_updates,
            round_timeout=settings.round_timeout,
            max_update_norm=settings.max_update_norm,
            fraction=settings.fraction,
            seed=settings.seed,
            buffer=settings.buffer,
            max_staleness=settings.max_staleness,
            staleness_exponent=settings.staleness_exponent,
            manual_start=settings.manual_start,
            train=TrainConfig(
                local_epochs=settings.local_epochs, batch_size=settings.batch_size, learning_rate=settings.lr
            ),
        )
        sock = service.bind(settings.host, settings.port)
        settings.data.mkdir(parents=True, exist_ok=True)
        store = Store(settings.data, settings.store)
        federation = Federation(
            store,
            fed_settings,
            registered_clients=lambda: pki.active(settings.pki, pki.Role.CLIENT),
            initial_model=_initial_model(settings) if store.get_meta("global_sha256") is None else None,
            strategy=chosen,
        )
        announcer = _announcer(federation, settings.mqtt, creds) if settings.mqtt else None
        console.print(f"fedge aggregation service on https://{settings.host}:{sock.getsockname()[1]}")
    try:
        service.serve(create_app(federation, trust), creds, sock, settings.data / "endpoint.json")
    finally:
        if announcer is not None:
            announcer.close()


def _announcer(federation: Federation, broker: str, creds: pki.Credentials) -> Announcer:
    from fedge.mqtt import BrokerAddress
    from fedge.server.announce import Announcer

    return Announcer(federation, BrokerAddress.parse(broker), creds)


def _initial_model(settings: ServerSettings) -> bytes:
    if settings.init_model is not None:
        if not settings.init_model.is_file():
            raise UserError(f"initial model {settings.init_model} does not exist")
        return settings.init_model.read_bytes()
    try:
        from fedge.edge_functions.functions import initial_model
    except ImportError:
        raise UserError(
            "no --init-model given, and torch is not installed to build one from the task"
        ) from None
    return initial_model({"task": settings.task, "seed": settings.seed}, None)  # type: ignore[arg-type]
