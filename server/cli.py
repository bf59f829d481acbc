"""``fedge server``: run the aggregation function over mutual TLS."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from fedge.console import UserError, console, user_errors
from fedge.security import pki
from fedge.settings import ServerSettings

if TYPE_CHECKING:
    from fedge.server.announce import Announcer
    from fedge.server.rounds import Federation


def server(
    pki_dir: Annotated[Path | None, typer.Option("--pki", help="PKI directory (fedge pki init)")] = None,
    data: Annotated[Path | None, typer.Option(help="where models, updates and round state are kept")] = None,
    host: Annotated[str | None, typer.Option(help="address to listen on [127.0.0.1]")] = None,
    port: Annotated[int | None, typer.Option(help="port; 0 picks a free one [8443]")] = None,
    task: Annotated[str | None, typer.Option(help="task the federation trains [mnist]")] = None,
    init_model: Annotated[Path | None, typer.Option(help="initial global model (safetensors)")] = None,
    rounds: Annotated[int | None, typer.Option(help="rounds to run [10]")] = None,
    min_clients: Annotated[int | None, typer.Option(help="registered clients before round 1 [1]")] = None,
    min_updates: Annotated[int | None, typer.Option(help="updates a round needs at its deadline [1]")] = None,
    round_timeout: Annotated[float | None, typer.Option(help="seconds a round stays open [600]")] = None,
    max_update_norm: Annotated[
        float | None, typer.Option(help="refuse updates farther than this L2 distance from the model [off]")
    ] = None,
    local_epochs: Annotated[int | None, typer.Option(help="local epochs per round [1]")] = None,
    batch_size: Annotated[int | None, typer.Option(help="client batch size [32]")] = None,
    lr: Annotated[float | None, typer.Option(help="client learning rate [0.05]")] = None,
    seed: Annotated[int | None, typer.Option(help="seed of the initial model [0]")] = None,
    mqtt: Annotated[str | None, typer.Option(help="announce rounds on this MQTT broker, HOST:PORT")] = None,
) -> None:
    """Serve the global model read-only and aggregate each selected client's update, round after round."""
    with user_errors(pki.PKIError, ValueError, OSError):
        settings = ServerSettings.from_flags(
            pki=pki_dir, data=data, host=host, port=port, task=task, init_model=init_model, rounds=rounds,
            min_clients=min_clients, min_updates=min_updates, round_timeout=round_timeout,
            max_update_norm=max_update_norm, mqtt=mqtt,
            local_epochs=local_epochs, batch_size=batch_size, lr=lr, seed=seed,
        )  # fmt: skip
        from fedge.server import service
        from fedge.server.app import create_app
        from fedge.server.rounds import Federation, FederationSettings
        from fedge.server.store import Store
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
            train=TrainConfig(
                local_epochs=settings.local_epochs, batch_size=settings.batch_size, learning_rate=settings.lr
            ),
        )
        sock = service.bind(settings.host, settings.port)
        settings.data.mkdir(parents=True, exist_ok=True)
        store = Store(settings.data)
        federation = Federation(
            store,
            fed_settings,
            registered_clients=lambda: pki.active(settings.pki, pki.Role.CLIENT),
            initial_model=_initial_model(settings) if store.get_meta("global_sha256") is None else None,
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
