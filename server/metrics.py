"""Prometheus metrics of the aggregation function (``GET /metrics``, admin certificates only).

The round series are set from the round log's events (``record`` listens to server.roundlog), so every
step of a round is a log line and a series from the same facts; the certificate and presence gauges are
read when Prometheus scrapes. A labelled series appears once it has a value: accuracy and loss carry
``source`` ("server": ``fedge server --eval-data``), and a source that never reports exports nothing.
The usage and cost series are exported from the start (at 0), by place and component: an update's usage
(``fedge.pricing``) moves them, priced at the server's ``--prices``.
"""

from __future__ import annotations

import datetime as dt
import math
import time
from collections.abc import Callable
from pathlib import Path

from cryptography import x509
from prometheus_client import CollectorRegistry, Counter, Enum, Gauge, Histogram

from fedge.pricing import EXAMPLE_PRICES, Prices, Usage, cost
from fedge.server.presence import Presence
from fedge.server.roundlog import Event, RoundEvent, Where
from fedge.wire import RoundInfo, RoundState

registry = CollectorRegistry()
updates_accepted = Counter("fedge_updates_accepted", "Updates stored and folded", registry=registry)
updates_rejected = Counter("fedge_updates_rejected", "Updates refused", ["code"], registry=registry)
skips_accepted = Counter("fedge_skips_accepted", "Skip notices stored", registry=registry)
skips_rejected = Counter("fedge_skips_rejected", "Skip notices refused", ["code"], registry=registry)
evaluations_accepted = Counter(
    "fedge_evaluations_accepted", "Client evaluations stored (federated evaluation)", registry=registry
)
evaluations_rejected = Counter(
    "fedge_evaluations_rejected", "Client evaluations refused", ["code"], registry=registry
)
update_seconds = Histogram(
    "fedge_update_seconds", "Time to validate, store and fold one update", registry=registry
)
model_downloads = Counter(
    "fedge_model_downloads", "Global model bodies served", ["cached"], registry=registry
)

current_round = Gauge("fedge_round", "The open round, else the last one closed", registry=registry)
round_state = Enum(
    "fedge_round_state", "Whether a round is open", states=[str(s) for s in RoundState], registry=registry
)
selected = Gauge("fedge_round_selected", "Clients selected for the current round", registry=registry)
received = Gauge("fedge_round_updates", "Updates the current round has taken", registry=registry)
skipped = Gauge("fedge_round_skips", "Skip notices the current round has taken", registry=registry)
rounds_closed = Counter(
    "fedge_rounds", "Rounds closed, by outcome (done, failed)", ["outcome"], registry=registry
)
round_seconds = Histogram(
    "fedge_round_duration_seconds",
    "Seconds from a round's opening to its closing",
    buckets=(1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1800, 3600),
    registry=registry,
)
aggregation_seconds = Histogram(
    "fedge_aggregation_seconds",
    "Seconds to aggregate a round's updates and store the new model",
    buckets=(0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1, 5, 30),
    registry=registry,
)
update_bytes = Histogram(
    "fedge_update_bytes",
    "Size of each accepted update body, as sent",
    buckets=tuple(4.0**k for k in range(5, 16)),
    registry=registry,
)
bytes_received = Counter("fedge_received_bytes", "Bytes of update bodies accepted", registry=registry)
bytes_sent = Counter("fedge_sent_bytes", "Bytes of global model bodies served", registry=registry)
accuracy = Gauge("fedge_model_accuracy", "Accuracy of the latest global model", ["source"], registry=registry)
loss = Gauge("fedge_model_loss", "Loss of the latest global model", ["source"], registry=registry)
evaluated_round = Gauge(
    "fedge_model_evaluated_round", "Round of the model the accuracy is of", ["source"], registry=registry
)
placements = Counter(
    "fedge_placements",
    "Client rounds by where they ran: device, fewer-steps, offload (from updates) or skip (notices)",
    ["kind"],
    registry=registry,
)
raw_bytes_offloaded = Counter(
    "fedge_offloaded_raw_bytes",
    "Bytes of raw examples executors trained on, as they report",
    registry=registry,
)
certificate_expiry = Gauge(
    "fedge_certificate_expiry_seconds",
    "Seconds until each certificate the server holds expires (server, ca) and its CRL is due (crl)",
    ["certificate"],
    registry=registry,
)
agents_seen = Gauge(
    "fedge_agents_seen_last_minute",
    "Clients seen (a request, an MQTT status) in the last 60 s",
    registry=registry,
)
function_seconds = Counter(
    "fedge_function_seconds", "Function seconds the updates took, as their producers report",
    ["place"], registry=registry,
)  # fmt: skip
gb_seconds = Counter(
    "fedge_gb_seconds", "Memory-seconds (GB-s) the updates took, as their producers report",
    ["place"], registry=registry,
)  # fmt: skip
invocations = Counter(
    "fedge_invocations", "Function invocations behind the updates", ["place"], registry=registry
)
gpu_seconds = Counter("fedge_gpu_seconds", "GPU-seconds executors spent on updates", registry=registry)
transfer_bytes = Counter(
    "fedge_transfer_bytes", "Bytes billed as transferred: updates up, models down", ["direction"],
    registry=registry,
)  # fmt: skip
costs = Counter("fedge_cost", "What the updates cost at the server's prices, by component", ["component"],
                registry=registry)  # fmt: skip
round_cost = Gauge("fedge_round_cost", "What the current round has cost so far", registry=registry)
PLACES = ("device", "executor")
COMPONENTS = ("device", "executor", "gpu", "transfer")
for _place in PLACES:
    for _counter in (function_seconds, gb_seconds, invocations):
        _counter.labels(place=_place)
for _direction in ("up", "down"):
    transfer_bytes.labels(direction=_direction)
for _component in COMPONENTS:
    costs.labels(component=_component)
_prices = [EXAMPLE_PRICES]  # the server's --prices (``price_with``)
PRESENCE_WINDOW = 60.0
SKIP = "skip"


def record(event: RoundEvent) -> None:
    """A round log listener: each event moves the series it concerns."""
    fields = event.fields
    match event.event:
        case Event.OPENED:
            current_round.set(event.round)
            round_state.state(RoundState.OPEN)
            selected.set(float(fields["selected"]))
            received.set(0)
            skipped.set(0)
            round_cost.set(0)
        case Event.UPDATE:
            size = float(fields["bytes"])
            received.inc()
            update_bytes.observe(size)
            bytes_received.inc(size)
            placements.labels(kind=str(fields["where"])).inc()
            if fields["where"] == Where.OFFLOAD and "raw_bytes" in fields:
                raw_bytes_offloaded.inc(float(fields["raw_bytes"]))
            if isinstance(usage := fields.get("usage"), dict):
                charge(Usage(**usage))
        case Event.SKIP:
            skipped.inc()
            placements.labels(kind=SKIP).inc()
        case Event.CLOSED | Event.FAILED:
            round_state.state(RoundState.WAITING)
            round_seconds.observe(float(fields["seconds"]))
            if event.event is Event.CLOSED:
                aggregation_seconds.observe(float(fields["aggregation_ms"]) / 1000)
            rounds_closed.labels(outcome="done" if event.event is Event.CLOSED else "failed").inc()
        case Event.EVALUATED:
            source = str(fields["source"])
            if fields["accuracy"] is not None:  # a clients' app may report no accuracy
                accuracy.labels(source=source).set(float(fields["accuracy"]))
            loss.labels(source=source).set(float(fields["loss"]))
            evaluated_round.labels(source=source).set(event.round)
        case Event.FINISHED:
            round_state.state(RoundState.FINISHED)


def charge(usage: Usage) -> None:
    """Count one update's usage and what it cost."""
    u = usage
    for place, seconds, gbs, calls in (
        ("device", u.device_seconds, u.device_gb_seconds, u.device_invocations),
        ("executor", u.executor_seconds, u.executor_gb_seconds, u.executor_invocations),
    ):
        function_seconds.labels(place=place).inc(seconds)
        gb_seconds.labels(place=place).inc(gbs)
        invocations.labels(place=place).inc(calls)
    gpu_seconds.inc(u.gpu_seconds)
    transfer_bytes.labels(direction="up").inc(u.bytes_up)
    transfer_bytes.labels(direction="down").inc(u.bytes_down)
    bill = cost(u, _prices[0])
    for component in COMPONENTS:
        costs.labels(component=component).inc(getattr(bill, component))
    round_cost.inc(bill.total)


def price_with(prices: Prices) -> None:
    """Price usage at ``prices`` from now on (the server's ``--prices``)."""
    _prices[0] = prices


def start(info: RoundInfo) -> None:
    """Where the federation stands when the server starts (a restarted one resumes mid-way)."""
    current_round.set(info.round)
    round_state.state(info.state)
    if info.state is RoundState.OPEN:
        selected.set(len(info.selected))


def watch(server_cert: bytes, ca_pem: bytes, crl: Path, presence: Presence) -> None:
    """Gauges read at each scrape: the certificates the server loaded at start (the ones TLS presents),
    the CRL as it is now on disk (the file the revocation check re-reads), and who was seen lately."""
    for name, not_after in (("server", _not_after(server_cert)), ("ca", _not_after(ca_pem))):
        certificate_expiry.labels(certificate=name).set_function(_until(lambda at=not_after: at))
    certificate_expiry.labels(certificate="crl").set_function(_until(lambda: _crl_due(crl)))
    agents_seen.set_function(lambda: presence.seen_within(time.time(), PRESENCE_WINDOW))


def _until(when: Callable[[], float]) -> Callable[[], float]:
    return lambda: when() - time.time()


def _not_after(pem: bytes) -> float:
    return x509.load_pem_x509_certificate(pem).not_valid_after_utc.timestamp()


def _crl_due(path: Path) -> float:
    """When the CRL on disk is due to be replaced; NaN when it cannot be read (Prometheus shows a gap)."""
    try:
        due = x509.load_pem_x509_crl(path.read_bytes()).next_update_utc
    except (OSError, ValueError):
        return math.nan
    return math.nan if due is None else due.astimezone(dt.UTC).timestamp()
