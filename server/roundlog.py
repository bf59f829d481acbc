"""The round log: one event per step of a round's life, written as one line for people or one JSON object
for log collectors (``fedge server --log-format json``), and handed to whoever else listens (metrics, the
server-side evaluation).

The round state machine (server.rounds) calls ``RoundLog`` at each transition with what it already holds;
here those facts become events (the vocabulary below), and each event one line, so a federation is never
silent and every line of it is said in one place.
"""

from __future__ import annotations

import datetime as dt
import json
import math
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from enum import StrEnum
from typing import IO

from fedge.server.store import RoundRecord
from fedge.wire import UpdateMeta


class Event(StrEnum):
    SERVING = "serving"
    OPENED = "opened"
    UPDATE = "update"
    SKIP = "skip"
    CLOSED = "closed"
    FAILED = "failed"
    EVALUATED = "evaluated"
    FINISHED = "finished"


class Where(StrEnum):
    """Where an update was computed: on the device, on the device with fewer steps, or by an executor."""

    DEVICE = "device"
    FEWER_STEPS = "fewer-steps"
    OFFLOAD = "offload"


@dataclass(frozen=True)
class RoundEvent:
    """``fields`` hold what the event says, by name: each event's are listed by the function that makes it."""

    event: Event
    round: int
    at: float
    fields: dict[str, object] = field(default_factory=dict)


def serving(url: str, at: float) -> RoundEvent:
    return RoundEvent(Event.SERVING, 0, at, {"url": url})


def opened(record: RoundRecord) -> RoundEvent:
    return RoundEvent(
        Event.OPENED,
        record.round,
        record.opened_at,
        {"selected": len(record.selected), "deadline": record.deadline},
    )


def update(round_: int, client: str, size: int, computed_by: str, meta: UpdateMeta, at: float) -> RoundEvent:
    where = Where.OFFLOAD if computed_by else Where.FEWER_STEPS if meta.steps is not None else Where.DEVICE
    fields: dict[str, object] = {"client": client, "bytes": size, "where": str(where)}
    if computed_by:
        fields["executor"] = computed_by
    for name in ("steps", "raw_bytes"):
        if (value := getattr(meta, name)) is not None:
            fields[name] = value
    fields["usage"] = meta.received(size).as_dict()  # what the round's bill counts (fedge.pricing)
    return RoundEvent(Event.UPDATE, round_, at, fields)


def skip(round_: int, client: str, reason: str, at: float) -> RoundEvent:
    return RoundEvent(Event.SKIP, round_, at, {"client": client, "reason": reason})


def closed(
    record: RoundRecord,
    updates: int,
    skips: int,
    aggregation_seconds: float,
    model_sha256: str | None,
    why_failed: str,
    at: float,
) -> RoundEvent:
    """The round's end: ``closed`` with the new model, or ``failed`` with ``why_failed``."""
    fields: dict[str, object] = {"updates": updates, "skips": skips, "seconds": at - record.opened_at}
    if model_sha256 is None:
        return RoundEvent(Event.FAILED, record.round, at, {**fields, "why": why_failed})
    aggregation_ms = round(aggregation_seconds * 1000, 3)
    return RoundEvent(
        Event.CLOSED,
        record.round,
        at,
        {**fields, "aggregation_ms": aggregation_ms, "model_sha256": model_sha256},
    )


def evaluated(
    round_: int,
    source: str,
    loss: float,
    accuracy: float | None,
    examples: int,
    at: float,
    reported: tuple[int, int] | None = None,
) -> RoundEvent:
    """``reported``: federated evaluation's (clients that reported so far, clients asked)."""
    fields: dict[str, object] = {"source": source, "loss": loss, "accuracy": accuracy, "examples": examples}
    if reported is not None:
        fields["reported"], fields["asked"] = reported
    return RoundEvent(Event.EVALUATED, round_, at, fields)


def finished(last_round: int, at: float) -> RoundEvent:
    return RoundEvent(Event.FINISHED, last_round, at, {"rounds": last_round})


def why_failed(updates: int, skips: int, selected: int, quorum: int, strategy: str) -> str:
    """Why a round closed without a model, from what it counted."""
    if updates >= quorum:
        return f"strategy {strategy} could not aggregate the {updates} updates"
    if updates + skips >= selected:
        return f"{_count(skips, 'skip')} left {_count(updates, 'update')}, below the quorum of {quorum}"
    return f"the deadline passed with {_count(updates, 'update')}, below the quorum of {quorum}"


def human(event: RoundEvent) -> str:
    """One line a person reads: the time (UTC), then what happened. What clients said (ids, a skip's
    reason) is shown with control characters escaped, so that no client writes a line of its own."""
    f = {k: _plain(v) if isinstance(v, str) else v for k, v in event.fields.items()}
    r = event.round
    match event.event:
        case Event.SERVING:
            text = f"fedge aggregation service on {f['url']}"
        case Event.OPENED:
            deadline = float(f["deadline"])
            text = (
                f"round {r} opened: {f['selected']} selected, deadline {_clock(deadline)} "
                f"(in {deadline - event.at:.0f} s)"
            )
        case Event.UPDATE:
            text = f"round {r} update from {f['client']}: {_size(int(f['bytes']))}, {_where(f)}"
        case Event.SKIP:
            text = f"round {r} skip from {f['client']}: {f['reason']}"
        case Event.CLOSED:
            text = (
                f"round {r} closed: {_count(f['updates'], 'update')}, {_count(f['skips'], 'skip')}, "
                f"aggregated in {f['aggregation_ms']:.1f} ms, model {str(f['model_sha256'])[:12]}"
            )
        case Event.FAILED:
            text = (
                f"round {r} failed: {_count(f['updates'], 'update')}, {_count(f['skips'], 'skip')}: "
                f"{f['why']}"
            )
        case Event.EVALUATED:
            clients = f" by {f['reported']} of {_count(f['asked'], 'client')}" if "asked" in f else ""
            scored = "" if f["accuracy"] is None else f"accuracy {f['accuracy']:.4f}, "
            text = (
                f"round {r} evaluated ({f['source']}{clients}, {f['examples']} examples): "
                f"{scored}loss {f['loss']:.4f}"
            )
        case Event.FINISHED:
            text = f"federation finished: {_count(f['rounds'], 'round')} done"
    return f"{_clock(event.at)} {text}"


def json_line(event: RoundEvent) -> str:
    """One JSON object: ``time`` (ISO 8601, UTC), ``event``, ``round`` and the event's fields by name;
    times (``deadline``) as ISO 8601 too, and a number that is not finite (a diverged model's loss) as
    null, which JSON can carry."""
    fields = {
        k: None if isinstance(v, float) and not math.isfinite(v) else v for k, v in event.fields.items()
    }
    if "deadline" in fields:
        fields["deadline"] = _iso(float(fields["deadline"]))
    record = {"time": _iso(event.at), "event": str(event.event), "round": event.round, **fields}
    return json.dumps(record, separators=(",", ":"), allow_nan=False, default=str)


FORMATS: dict[str, Callable[[RoundEvent], str]] = {"text": human, "json": json_line}

Listener = Callable[[RoundEvent], None]


class RoundLog:
    """Hands every event to its listeners in order; the state machine's one-line hooks are its methods.
    Without listeners it says nothing (a federation in a test, a benchmark)."""

    def __init__(self, *listeners: Listener) -> None:
        self._listeners = list(listeners)
        self._lock = threading.Lock()

    def listen(self, listener: Listener) -> None:
        self._listeners.append(listener)

    def emit(self, event: RoundEvent) -> None:
        with self._lock:
            for listener in self._listeners:
                listener(event)

    def opened(self, record: RoundRecord) -> None:
        self.emit(opened(record))

    def update(self, round_: int, client: str, size: int, computed_by: str, meta: UpdateMeta) -> None:
        self.emit(update(round_, client, size, computed_by, meta, time.time()))

    def skip(self, round_: int, client: str, reason: str) -> None:
        self.emit(skip(round_, client, reason, time.time()))

    def closed(
        self,
        record: RoundRecord,
        counts: tuple[int, int, int],
        strategy: str,
        aggregation_seconds: float,
        model_sha256: str | None,
    ) -> None:
        """``counts``: (updates, skips, quorum) of the round."""
        updates, skips, quorum = counts
        why = "" if model_sha256 else why_failed(updates, skips, len(record.selected), quorum, strategy)
        self.emit(closed(record, updates, skips, aggregation_seconds, model_sha256, why, time.time()))

    def evaluated(
        self,
        round_: int,
        source: str,
        loss: float,
        accuracy: float | None,
        examples: int,
        reported: tuple[int, int],
    ) -> None:
        self.emit(evaluated(round_, source, loss, accuracy, examples, time.time(), reported))

    def finished(self, last_round: int) -> None:
        self.emit(finished(last_round, time.time()))


class LineWriter:
    """A listener that writes each event as one line in the chosen format, flushed at once (a log file
    someone tails, a collector reading a pipe)."""

    def __init__(self, log_format: str, stream: IO[str] | None = None) -> None:
        if log_format not in FORMATS:
            raise ValueError(f"unknown log format {log_format!r}: choose from {', '.join(FORMATS)}")
        self._format = FORMATS[log_format]
        self._stream = stream

    def __call__(self, event: RoundEvent) -> None:
        stream = self._stream or sys.stdout
        try:
            stream.write(self._format(event) + "\n")
            stream.flush()
        except OSError:
            pass  # the output is gone (a closed pipe): the round goes on, with nobody left to tell


def _where(fields: dict[str, object]) -> str:
    where = fields["where"]
    if where == Where.OFFLOAD:
        raw = f", {_size(int(fields['raw_bytes']))} raw data" if "raw_bytes" in fields else ""
        return f"offloaded to {fields['executor']}{raw}"
    if where == Where.FEWER_STEPS:
        return f"on the device, fewer steps ({fields['steps']})"
    return "on the device"


def _plain(text: str) -> str:
    return "".join(c if c.isprintable() else c.encode("unicode_escape").decode("ascii") for c in text)


def _count(n: object, noun: str) -> str:
    return f"{n} {noun}" if n == 1 else f"{n} {noun}s"


def _size(n: int) -> str:
    for unit, scale in (("MB", 1e6), ("kB", 1e3)):
        if n >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{n} B"


def _clock(at: float) -> str:
    return dt.datetime.fromtimestamp(at, dt.UTC).strftime("%Y-%m-%d %H:%M:%S")


def _iso(at: float) -> str:
    return dt.datetime.fromtimestamp(at, dt.UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")
