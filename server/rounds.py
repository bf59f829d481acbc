"""The round state machine: open a round, take each selected client's update once, close it, repeat.

Decisions are pure functions (``decide``); ``Federation`` is the thin shell that applies them to the store
and the running aggregate under one lock, and tells listeners (long polls, announcements) about changes.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from enum import Enum

from fedge.codec import Tensors, decode, encode, signature_of
from fedge.server import aggregation
from fedge.server.errors import Rejected
from fedge.server.store import DuplicateUpdate, Provenance, RoundRecord, Store
from fedge.server.validation import check_norm, validate_update
from fedge.wire import RoundInfo, RoundState, TrainConfig, UpdateReceipt


@dataclass(frozen=True)
class FederationSettings:
    federation: str
    task: str
    rounds: int = 10
    min_clients: int = 1
    min_updates: int = 1
    round_timeout: float = 600.0
    max_update_norm: float | None = None
    train: TrainConfig = field(default_factory=TrainConfig)


@dataclass(frozen=True)
class GlobalModel:
    body: bytes
    sha256: str
    round: int
    tensors: Tensors


class Action(Enum):
    WAIT = "wait"
    AGGREGATE = "aggregate"
    FAIL = "fail"


def decide(updates: int, selected: int, min_updates: int, now: float, deadline: float) -> Action:
    """Close a round as soon as every selected client has reported, or at the deadline with a quorum."""
    if updates >= selected:
        return Action.AGGREGATE
    if now < deadline:
        return Action.WAIT
    return Action.AGGREGATE if updates >= max(min_updates, 1) else Action.FAIL


class Federation:
    def __init__(
        self,
        store: Store,
        settings: FederationSettings,
        registered_clients: Callable[[], list[str]],
        initial_model: bytes | None = None,
    ) -> None:
        self.settings = settings
        self._store = store
        self._registered = registered_clients
        self._lock = threading.RLock()
        self._listeners: list[Callable[[], None]] = []
        self._open: RoundRecord | None = None
        self._sum: aggregation.RunningSum | None = None
        self._finished = False
        self._load(initial_model)

    def subscribe(self, listener: Callable[[], None]) -> None:
        self._listeners.append(listener)

    @property
    def model(self) -> GlobalModel:
        return self._model

    def round_info(self) -> RoundInfo:
        with self._lock:
            if self._open is not None:
                return RoundInfo(
                    round=self._open.round,
                    state=RoundState.OPEN,
                    deadline=self._open.deadline,
                    model_sha256=self._open.base_sha256,
                    task=self.settings.task,
                    selected=self._open.selected,
                    config=self._open.config,
                )
            last = self._store.last_round()
            return RoundInfo(
                round=last.round if last else 0,
                state=RoundState.FINISHED if self._finished else RoundState.WAITING,
                model_sha256=self._model.sha256,
                task=self.settings.task,
            )

    def history(self) -> list[tuple[RoundRecord, list[str]]]:
        """Every round with the clients that sent an update in it (never the updates themselves)."""
        with self._lock:
            return self._store.history()

    def tick(self, now: float | None = None) -> None:
        """Close an overdue round and open the next one when enough clients are registered."""
        with self._lock:
            changed = self._advance(time.time() if now is None else now)
        if changed:
            self._notify()

    def submit(
        self, round_: int, client: str, body: bytes, provenance: Provenance | None = None
    ) -> UpdateReceipt:
        """Authorize, validate, store durably, then fold; any refusal leaves store and aggregate untouched.

        ``provenance`` (signature, nonce: checked by the API before this call) is stored with the update."""
        with self._lock:
            current = self._open
            if current is None or current.round != round_:
                raise Rejected(409, "round_not_open", f"round {round_} is not open for updates")
            if time.time() >= current.deadline:
                raise Rejected(409, "round_not_open", f"round {round_} passed its deadline")
            if client not in current.selected:
                raise Rejected(403, "not_selected", f"client {client!r} was not selected for round {round_}")
            tensors, num_examples = validate_update(body, signature_of(self._model.tensors))
            if self.settings.max_update_norm is not None:
                check_norm(tensors, self._model.tensors, self.settings.max_update_norm)
            try:
                record = self._store.add_update(round_, client, body, num_examples, provenance)
            except DuplicateUpdate:
                raise Rejected(409, "duplicate_update", f"{client!r} already sent its update") from None
            assert self._sum is not None
            aggregation.fold(self._sum, tensors, float(num_examples))
            changed = self._advance(time.time())
        if changed:
            self._notify()
        return UpdateReceipt(round=round_, client=client, sha256=record.sha256, num_examples=num_examples)

    def _advance(self, now: float) -> bool:
        changed = False
        if self._open is not None:
            assert self._sum is not None
            action = decide(
                self._sum.count, len(self._open.selected), self.settings.min_updates, now, self._open.deadline
            )
            if action is Action.WAIT:
                return False
            self._close(self._open, aggregated=action is Action.AGGREGATE)
            changed = True
        if not self._finished:
            changed |= self._open_next(now)
        return changed

    def _close(self, record: RoundRecord, aggregated: bool) -> None:
        result = None
        if aggregated:
            assert self._sum is not None
            tensors = aggregation.average(self._sum, self._model.tensors)
            body = encode(tensors, {"round": str(record.round), "task": self.settings.task})
            result = self._store.put_model(body)
        self._store.close_round(record.round, result)
        if result is not None:
            self._model = GlobalModel(body, result, record.round, tensors)
        self._open = None
        self._sum = None
        self._finished = record.round >= self.settings.rounds

    def _open_next(self, now: float) -> bool:
        clients = self._registered()
        if len(clients) < self.settings.min_clients:
            return False
        last = self._store.last_round()
        self._open = self._store.open_round(
            (last.round if last else 0) + 1,
            self._model.sha256,
            clients,
            self.settings.train,
            now + self.settings.round_timeout,
        )
        self._sum = aggregation.start(self._model.tensors)
        return True

    def _load(self, initial_model: bytes | None) -> None:
        """Start from the stored global model, resuming an open round with every update already accepted."""
        sha = self._store.get_meta("global_sha256")
        if sha is None:
            if initial_model is None:
                raise ValueError("the store holds no global model and no initial model was given")
            sha = self._store.put_model(initial_model)
            self._store.set_meta("global_sha256", sha)
            self._store.set_meta("global_round", "0")
            self._store.set_meta("task", self.settings.task)
        elif self._store.get_meta("task") != self.settings.task:
            raise ValueError(
                f"the store belongs to task {self._store.get_meta('task')!r}, not {self.settings.task!r}"
            )
        body = self._store.model_path(sha).read_bytes()
        self._model = GlobalModel(body, sha, int(self._store.get_meta("global_round") or 0), decode(body)[0])
        last = self._store.last_round()
        if last is not None and last.state == "open":
            self._open = last
            self._sum = aggregation.start(self._model.tensors)
            for update in self._store.updates(last.round):
                aggregation.fold(self._sum, decode(update.path.read_bytes())[0], float(update.num_examples))
        self._finished = self._open is None and last is not None and last.round >= self.settings.rounds

    def _notify(self) -> None:
        for listener in self._listeners:
            listener()
