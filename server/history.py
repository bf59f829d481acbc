"""A federation's history as operators read it: one row of figures per round and per client, from the store's
metadata (``store.read_ledger``) alone, never from an update.

The same figures feed the admin API's overview (and so the dashboard) and ``fedge runs``, which reads a
server's ``--data`` directly. The server sees when each update arrived, not how long its client trained or
uploaded, so a round's time splits into what it can tell apart: waiting for the first update, the updates
arriving, and closing (the aggregation, after the last one).
"""

from __future__ import annotations

import contextlib
import datetime as dt
import sqlite3
import time
from collections import Counter, defaultdict
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Annotated

import typer
from pydantic import BaseModel, Field
from rich.table import Table

from fedge.console import UserError, console, user_errors
from fedge.pricing import EXAMPLE_PRICES, PriceError, Prices, Usage, cost, prices_from
from fedge.security.pki import CertificateInfo
from fedge.server.evaluation import SOURCE as SERVER
from fedge.server.federated_evaluation import SOURCE as FEDERATED
from fedge.server.store import Ledger, Store, StoreError, read_ledger

CLOSED = ("done", "failed")


class RoundFigures(BaseModel):
    round: int
    state: str = Field(description="open, done or failed")
    selected: int
    updates: int
    skipped: int
    offloaded: int = Field(description="updates an executor trained for their client")
    bytes: int = Field(description="update bytes received")
    opened_at: float
    closed_at: float | None
    deadline: float
    seconds: float = Field(description="open to close; so far, for the open round")
    waiting: float | None = Field(description="open to the first update")
    arriving: float | None = Field(description="first update to the last")
    closing: float | None = Field(description="last update to close: aggregation and the quorum's wait")
    skips: dict[str, str] = Field(description="client -> reason")
    stragglers: list[str] = Field(description="selected, closed without an update or a skip from them")
    accuracy: float | None = Field(None, description="the server's evaluation of the model it produced")
    loss: float | None = None
    federated_accuracy: float | None = Field(None, description="the asked clients', on their own data")
    federated_loss: float | None = None
    federated_examples: int = Field(0, description="examples the federated figures are over")
    cost: float = Field(0.0, description="what its updates' usage cost at the server's prices")
    usage: dict[str, float] = Field(
        default_factory=dict, description="what its bill is made of (fedge.pricing.Usage), summed"
    )


class ClientFigures(BaseModel):
    id: str
    last_seen: float | None = Field(description="Unix time of the last request or update seen from it")
    trained: int = Field(description="rounds it sent an update in")
    skipped: int
    last_skip: str | None = Field(description="the reason it gave last time it skipped")
    missed: int = Field(description="closed rounds it was selected for and said nothing in")
    placements: dict[str, int] = Field(description="where its updates were computed: device, offload, ...")
    raw_bytes_offloaded: int | None = Field(None, description="raw data that left it (known to a simulation)")
    certificate_expires: dt.datetime | None = None
    certificate_status: str | None = None


def round_figures(ledger: Ledger, now: float, prices: Prices = EXAMPLE_PRICES) -> list[RoundFigures]:
    """``prices``: what the rounds' usage is billed at (the server's ``--prices``)."""
    by_round: dict[int, list[float]] = {}
    sizes: dict[int, int] = {}
    offloaded: dict[int, int] = {}
    for u in ledger.updates:
        by_round.setdefault(u.round, []).append(u.received_at)
        sizes[u.round] = sizes.get(u.round, 0) + u.bytes
        offloaded[u.round] = offloaded.get(u.round, 0) + bool(u.computed_by)
    skips: dict[int, dict[str, str]] = {}
    for s in ledger.skips:
        skips.setdefault(s.round, {})[s.client] = s.reason
    reported = _reported(ledger)
    scored = {e.round: e for e in ledger.evaluations if e.source == SERVER}
    federated = {e.round: e for e in ledger.evaluations if e.source == FEDERATED}
    figures = []
    for r in ledger.rounds:
        arrivals = sorted(by_round.get(r.round, []))
        end = r.closed_at if r.closed_at is not None else now
        first, last = (arrivals[0], arrivals[-1]) if arrivals else (None, None)
        figures.append(
            RoundFigures(
                round=r.round, state=r.state, selected=len(r.selected), updates=len(arrivals),
                skipped=len(skips.get(r.round, {})), offloaded=offloaded.get(r.round, 0),
                bytes=sizes.get(r.round, 0), opened_at=r.opened_at, closed_at=r.closed_at,
                deadline=r.deadline, seconds=end - r.opened_at,
                waiting=None if first is None else first - r.opened_at,
                arriving=None if first is None or last is None else last - first,
                closing=None if last is None or r.closed_at is None else r.closed_at - last,
                skips=skips.get(r.round, {}),
                stragglers=[c for c in r.selected if r.state in CLOSED and (r.round, c) not in reported],
                accuracy=scored[r.round].accuracy if r.round in scored else None,
                loss=scored[r.round].loss if r.round in scored else None,
                federated_accuracy=f.accuracy if (f := federated.get(r.round)) else None,
                federated_loss=f.loss if f else None, federated_examples=f.examples if f else 0,
                cost=cost(used := ledger.usage.get(r.round, Usage()), prices).total, usage=used.as_dict(),
            )
        )  # fmt: skip
    return figures


def client_figures(
    ledger: Ledger, certificates: Sequence[CertificateInfo], statuses: Mapping[str, str],
    sightings: Mapping[str, float],
) -> list[ClientFigures]:  # fmt: skip
    """Every client the PKI issued a certificate to or the store heard from, sorted by id; ``statuses``:
    each certificate's valid / expired / revoked, ``sightings``: when the server last saw each client.
    Counted in plain dicts and made into models once (a dashboard asks every second)."""
    certs = {c.id: c for c in certificates}
    heard: dict[str, float] = dict(sightings)
    trained: Counter[str] = Counter()
    skipped: Counter[str] = Counter()
    missed: Counter[str] = Counter()
    placements: defaultdict[str, Counter[str]] = defaultdict(Counter)
    last_skip: dict[str, str] = {}
    for u in ledger.updates:
        trained[u.client] += 1
        placements[u.client]["offload" if u.computed_by else "device"] += 1
        heard[u.client] = max(heard.get(u.client, u.received_at), u.received_at)
    for s in ledger.skips:
        skipped[s.client] += 1
        last_skip[s.client] = s.reason
        heard[s.client] = max(heard.get(s.client, s.received_at), s.received_at)
    reported = _reported(ledger)
    for r in ledger.rounds:
        if r.state in CLOSED:
            missed.update(c for c in r.selected if (r.round, c) not in reported)
    ids = set(certs) | set(trained) | set(skipped)
    return [
        ClientFigures(
            id=c, last_seen=heard.get(c), trained=trained[c], skipped=skipped[c], last_skip=last_skip.get(c),
            missed=missed[c], placements=dict(placements.get(c, ())), certificate_status=statuses.get(c),
            certificate_expires=certs[c].not_after if c in certs else None,
        )
        for c in sorted(ids)
    ]  # fmt: skip


def _reported(ledger: Ledger) -> set[tuple[int, str]]:
    return {(u.round, u.client) for u in ledger.updates} | {(s.round, s.client) for s in ledger.skips}


def open_ledger(data: Path, store: str | None = None) -> Ledger:
    """The ledger of a server's ``--data`` (or its PostgreSQL ``store``), read without touching a model."""
    if store is None:
        _check_sqlite(data)
    try:
        opened = Store(data, store)
    except StoreError as exc:
        raise UserError(str(exc)) from None
    except sqlite3.Error as exc:  # a file that is not a database, a locked one
        raise UserError(f"cannot read the store in {data}: {exc}") from None
    try:
        return read_ledger(opened)
    except sqlite3.Error as exc:
        raise UserError(f"cannot read the store in {data}: {exc}") from None
    finally:
        opened.close()


def _check_sqlite(data: Path) -> None:
    """Refuse a directory that holds no server's store before ``Store`` would lay one out in it."""
    path = data / "state.db"
    if not path.is_file():
        raise UserError(f"{data} is not a server's --data directory: it holds no state.db")
    try:
        with contextlib.closing(sqlite3.connect(f"{path.resolve().as_uri()}?mode=ro", uri=True)) as db:
            db.execute("SELECT round FROM rounds LIMIT 1").fetchall()
    except sqlite3.Error as exc:
        raise UserError(f"{path} is not a server's store: {exc}") from None


def runs(
    data: Annotated[Path, typer.Option(help="the server's --data directory")],
    store: Annotated[str | None, typer.Option(help="its PostgreSQL store, when it has one")] = None,
    prices: Annotated[
        Path | None, typer.Option(help="price table (TOML) to bill the rounds at; default: example rates")
    ] = None,
) -> None:
    """List a server's rounds, finished and running, with their figures and cost, from its store."""
    with user_errors(OSError, PriceError):
        priced = prices_from(prices)  # a bad table is said before the store is opened
        figures = round_figures(open_ledger(data, store), time.time(), priced)
    table = Table(title=f"rounds in {data}", caption=f"cost of the run: {sum(f.cost for f in figures):.6f}")
    for column in ("round", "state", "selected", "updates", "skipped", "stragglers", "offloaded", "MB",
                   "seconds", "waiting", "arriving", "closing", "accuracy", "loss", "fed. accuracy",
                   "fed. loss", "cost"):  # fmt: skip
        table.add_column(column, justify="right")
    for f in figures:
        table.add_row(
            str(f.round), f.state, str(f.selected), str(f.updates), str(f.skipped), str(len(f.stragglers)),
            str(f.offloaded), f"{f.bytes / 1e6:.2f}", f"{f.seconds:.2f}", _seconds(f.waiting),
            _seconds(f.arriving), _seconds(f.closing), _figure(f.accuracy), _figure(f.loss),
            _figure(f.federated_accuracy), _figure(f.federated_loss), f"{f.cost:.6f}",
        )  # fmt: skip
    console.print(table if figures else f"no rounds in {data} yet")


def _seconds(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}"


def _figure(value: float | None) -> str:
    return "-" if value is None else f"{value:.4f}"
