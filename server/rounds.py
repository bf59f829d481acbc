"""The round state machine: open a round, take each selected client's update once, close it, repeat.

Decisions are pure functions (server.schedule); ``Federation`` is the thin shell that applies them to the
store and the running aggregate under one lock, and tells listeners (long polls, announcements) about
changes. Updates reach it checked (server.intake): here they are only authorized for the round, written
durably (outside the lock, concurrently) and then, under the lock again, authorized once more, recorded and
folded: the serialized part of an update is one small critical section.

Several servers (replicas) may share one PostgreSQL store: each critical section then also holds the store
(``Store.exclusive``), and first reads in what the others changed since (``_follow``): a round opened or
closed elsewhere is read as a restart reads it (``_load``), updates taken elsewhere are folded in. So any
replica takes updates, a round closes exactly once (whoever holds the store when it is due), and the closing
replica's sum holds every stored update of the round.
"""

from __future__ import annotations

import contextlib
import json
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import asdict, dataclass, field

from fedge.codec import Tensors, decode, encode, mapped
from fedge.pricing import EXAMPLE_PRICES, Prices
from fedge.server import aggregation, federated_evaluation
from fedge.server.errors import Rejected
from fedge.server.intake import CheckedUpdate
from fedge.server.roundlog import RoundLog
from fedge.server.schedule import Action, decide, select
from fedge.server.store import (
    AlreadySkipped,
    DuplicateEvaluation,
    DuplicateUpdate,
    Evaluation,
    Ledger,
    RoundHistory,
    RoundRecord,
    Store,
    read_ledger,
)
from fedge.server.strategies import Strategy, StrategyError, create, pick
from fedge.server.strategies.fedavg import FedAvg
from fedge.wire import (
    EvaluationAsk,
    EvaluationReceipt,
    EvaluationReport,
    RoundInfo,
    RoundState,
    SkipReceipt,
    TrainConfig,
    UpdateReceipt,
)


@dataclass(frozen=True)
class FederationSettings:
    federation: str
    task: str
    rounds: int = 10
    min_clients: int = 1
    min_updates: int = 1
    round_timeout: float = 600.0
    max_update_norm: float | None = None
    fraction: float = 1.0  # share of live clients selected each round (at least the quorum)
    fraction_evaluate: float = 0.0  # share asked to score each new model on their own data (federated)
    evaluate_every: int = 1  # ...every this many rounds, and the last
    seed: int = 0
    # Asynchronous mode (FedBuff) when > 0: a new version every ``buffer`` updates, late updates welcome.
    buffer: int = 0
    max_staleness: int = 5
    staleness_exponent: float = 0.5
    manual_start: bool = False  # round 1 waits for an admin's POST /v1/admin/start
    train: TrainConfig = field(default_factory=TrainConfig)
    prices: Prices = EXAMPLE_PRICES  # what a round's usage costs (``--prices``; fedge.pricing)


@dataclass(frozen=True)
class GlobalModel:
    body: bytes
    sha256: str
    round: int
    tensors: Tensors


class Federation:
    def __init__(
        self,
        store: Store,
        settings: FederationSettings,
        registered_clients: Callable[[], list[str]],  # who may be selected now: the live (server.trust)
        initial_model: bytes | None = None,
        strategy: Strategy | None = None,
        log: RoundLog | None = None,
    ) -> None:
        self.settings = settings
        self.log = log or RoundLog()  # each transition, as one event (server.roundlog)
        self.strategy = strategy or FedAvg()
        if settings.buffer and not self.strategy.streaming:
            raise ValueError(f"asynchronous mode needs a streaming strategy; {self.strategy.name} is not one")
        self._store = store
        self._registered = registered_clients
        self._lock = threading.RLock()
        self._slot_freed = threading.Condition(self._lock)
        self._writing: set[tuple[int, str]] = set()  # (round, client) slots whose update is being written
        self._listeners: list[Callable[[], None]] = []
        self._open: RoundRecord | None = None
        self._sum: aggregation.RunningSum | None = None
        self._skipped = 0
        self._finished = False
        self._said_finished = False  # said by the first tick or report after the last model's evaluation
        self._ask: EvaluationAsk | None = None
        self._pending: Strategy | None = None
        self._ledger: tuple[int, Ledger] | None = None  # (the store's revision it was read at, the ledger)
        self._folded: set[str] = set()  # the clients whose updates the open round's sum holds
        self._followed = False  # _follow saw the round change: listeners are told once the lock is let go
        self._behind = False  # another replica's changes are not all read in yet
        with self._store.exclusive():
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
                    evaluate=self._asking(),
                )
            last = self._store.last_round()
            return RoundInfo(
                round=last.round if last else 0,
                state=RoundState.FINISHED if self._finished else RoundState.WAITING,
                model_sha256=self._model.sha256,
                task=self.settings.task,
                evaluate=self._asking(),
            )

    def _asking(self) -> EvaluationAsk | None:
        """The open request for federated evaluation, if any: its deadline has not passed."""
        ask = self._ask
        return ask if ask is not None and time.time() < ask.deadline else None

    def history(self) -> list[RoundHistory]:
        """Every round with the clients that sent an update in it (never the updates themselves) and those
        that skipped it."""
        with self._lock:
            return self._store.history()

    def ledger(self) -> Ledger:
        """Every round, update and skip as metadata rows (``store.read_ledger``), for operators' views; read
        again only when the store has written since (a dashboard asks every second, mostly for nothing new).
        The same object comes back while nothing changed, so a view of it may be cached on it too."""
        with self._lock:
            if self._ledger is None or self._ledger[0] != self._store.revision:
                self._ledger = (self._store.revision, read_ledger(self._store))
            return self._ledger[1]

    def open_skips(self) -> dict[str, str]:
        """The open round's skip notices, client -> reason (none when no round is open)."""
        with self._lock:
            return self._store.skips(self._open.round) if self._open is not None else {}

    @contextlib.contextmanager
    def _critical(self) -> Iterator[None]:
        """Every change of the rounds holds this: the process's lock, then the store against other replicas
        (a no-op on SQLite), having read in what they changed meanwhile. Never taken twice by one thread."""
        with self._lock, self._store.exclusive() as moved:
            if moved or self._behind:
                self._behind = True  # until the follow is through: one that failed is tried again next time
                self._follow()
                self._behind = False
            yield
        if self._followed:
            self._followed = False
            self._notify()

    def _follow(self) -> None:
        """Read in what another replica changed in the store: a round opened, closed or finished elsewhere
        is read as a restart reads it; the same round open, only its new updates and skips (and a strategy
        chosen for the next round, an evaluation asked) are. Caller holds the lock and the store."""
        last = self._store.last_round()
        before = self._view()
        if self._open is None or last is None or last.state != "open" or last.round != self._open.round:
            self._load(None)
        else:
            self._read_stored(last.round)
            self._ask = self._store.last_ask()
            self._read_pending()
        self._followed |= self._view() != before

    def _view(self) -> tuple[object, ...]:
        """What long polls and announcements tell of: the open round, the end, the model, the ask."""
        return (self._open.round if self._open else None, self._finished, self._model.sha256, self._ask)

    def tick(self, now: float | None = None) -> None:
        """Close an overdue round and open the next one when enough clients are live."""
        with self._critical():
            moment = time.time() if now is None else now
            changed = self._advance(moment)
            self._finish_if_evaluated(moment)
        if changed:
            self._notify()

    def evaluate(
        self, round_: int, client: str, report: EvaluationReport, signature: str, nonce: str
    ) -> EvaluationReceipt:
        """Record an asked client's signed evaluation of the model ``round_`` produced, and store what the
        reports so far add up to (``federated_evaluation.combine``). Only the clients asked, for the model
        they were asked about, before the request's deadline, once; a refusal stores nothing."""
        with self._critical():
            ask = self._ask
            if ask is None or ask.round != round_:
                raise Rejected("not_asked", f"no evaluation of round {round_} is asked for now")
            if client not in ask.clients:
                raise Rejected("not_asked", f"client {client!r} was not asked to evaluate round {round_}")
            if time.time() >= ask.deadline:
                raise Rejected("evaluation_closed", f"the evaluation of round {round_} passed its deadline")
            if report.model_sha256 != ask.model_sha256:
                raise Rejected(
                    "wrong_model", f"round {round_}'s model is {ask.model_sha256[:12]}, not the one evaluated"
                )
            try:
                self._store.add_client_evaluation(round_, client, report, signature, nonce)
            except DuplicateEvaluation:
                raise Rejected(
                    "duplicate_evaluation", f"{client!r} already sent its evaluation of round {round_}"
                ) from None
            reports = self._store.client_evaluations(round_)
            together = federated_evaluation.combine(reports)
            self._store.add_evaluation(
                Evaluation(round_, federated_evaluation.SOURCE, together.loss, together.accuracy,
                           together.examples)
            )  # fmt: skip
            self.log.evaluated(
                round_, federated_evaluation.SOURCE, together.loss, together.accuracy, together.examples,
                (len(reports), len(ask.clients)),
            )  # fmt: skip
            self._finish_if_evaluated(time.time())
        return EvaluationReceipt(round=round_, client=client, num_examples=report.num_examples)

    def _finish_if_evaluated(self, now: float) -> None:
        """Say the federation finished once its last round closed and the evaluation of its model, if one
        was asked, is in from everyone asked or past its deadline. Caller holds the lock."""
        if not self._finished or self._said_finished:
            return
        ask = self._ask
        last = self._store.last_round()
        assert last is not None
        waiting = ask is not None and ask.round == last.round and now < ask.deadline
        if waiting and len(self._store.client_evaluations(last.round)) < len(ask.clients):
            return
        self._said_finished = True
        self.log.finished(last.round)

    def base_for(self, round_: int, client: str, base_sha256: str | None) -> Tensors:
        """The model an update for ``round_`` trained from ``base_sha256`` (its metadata) starts from, for
        intake to restore and bound it against; read-only. Refuses, as ``submit`` would, an update that this
        round would not take now, so that who may send is answered before what was sent."""
        with self._critical():
            return self._base(self._authorize(round_, client, base_sha256))

    def submit(self, update: CheckedUpdate) -> UpdateReceipt:
        """Authorize a checked update (server.intake) for the round, store it durably, then fold it; any
        refusal leaves store and aggregate untouched.

        Only the authorization and the commit (record, fold, state change) hold the lock; the blob write
        and its fsync run concurrently between them, in a (round, client) slot that no other update or skip
        of that client can take meanwhile. An update whose round closed while it was written is refused at
        the commit and its blobs removed; in asynchronous mode, where it is welcome in the next version, it
        is written again for that one."""
        while True:
            round_ = self._reserve(update)
            receipt = blob = None
            try:
                blob = self._store.write_update(round_, update.client, update.body, update.restored)
                receipt = self._commit(update, round_, blob)
            finally:
                self._release(round_, update.client, None if receipt is not None else blob)
            if receipt is not None:
                return receipt

    def _reserve(self, update: CheckedUpdate) -> int:
        """The open round an update is to be written for, its slot now held by the caller."""
        with self._slot(update.round, update.client, update.meta.base_sha256) as (round_, _):
            with _once(update.client, round_):
                self._store.check_unreported(round_, update.client)
            self._writing.add((round_, update.client))
            return round_

    @contextlib.contextmanager
    def _slot(self, round_: int, client: str, base_sha256: str | None) -> Iterator[tuple[int, int]]:
        """A critical section with the open round and the staleness of a report from ``client`` for
        ``round_``, entered once no update of the client's is being written here for it: a second upload
        waits (holding neither lock) for the first, and learns that it is a duplicate only if the first was
        recorded."""
        while True:
            with self._critical():
                staleness = self._authorize(round_, client, base_sha256)
                assert self._open is not None
                slot = (self._open.round, client)
                if slot not in self._writing:
                    yield slot[0], staleness
                    return
            with self._slot_freed:
                while slot in self._writing:
                    self._slot_freed.wait()

    def _commit(self, update: CheckedUpdate, round_: int, blob: str) -> UpdateReceipt | None:
        """Record and fold an update written for ``round_`` (as ``blob``), or None when (asynchronous mode)
        the open version moved on while it was written; ``Rejected`` when the round no longer takes it."""
        client, examples = update.client, update.meta.num_examples
        with self._critical():
            staleness = self._authorize(update.round, client, update.meta.base_sha256)
            assert self._open is not None
            if self._open.round != round_:
                return None
            with _once(client, round_):
                record = self._store.record_update(
                    round_, client, update.sha256, len(update.body), examples, update.provenance, staleness,
                    update.restored is not None, blob,
                )  # fmt: skip
                self._store.record_usage(round_, client, update.meta.received(len(update.body)))
            self._fold(client, update.tensors, examples, staleness)
            self.log.update(round_, client, len(update.body), update.provenance.computed_by, update.meta)
            changed = self._advance(time.time())
        if changed:
            self._notify()
        return UpdateReceipt(
            round=round_, client=client, sha256=record.sha256, num_examples=examples, staleness=staleness
        )

    def _release(self, round_: int, client: str, unrecorded: str | None) -> None:
        """Free the slot; the blobs of an update written but not recorded (``unrecorded``, their name) are
        removed, so an orphan never lingers in the store."""
        with self._slot_freed:
            if unrecorded is not None:
                self._store.discard_update(round_, unrecorded)
            self._writing.discard((round_, client))
            self._slot_freed.notify_all()

    def _authorize(self, round_: int, client: str, base_sha256: str | None) -> int:
        """How stale an update from ``client`` for ``round_`` is, or why the open round refuses it."""
        current = self._open
        late = current is not None and round_ < current.round
        if not (late and self.settings.buffer):
            try:
                self._refuse_late(round_, current)
            except Rejected:
                self._refuse_reported(round_, client)
                raise
        if current is None or round_ > current.round:
            raise Rejected("round_not_open", f"round {round_} is not open for updates")
        if client not in current.selected:
            raise Rejected("not_selected", f"client {client!r} was not selected for round {round_}")
        return self._staleness(round_, current, base_sha256) if self.settings.buffer else 0

    def skip(self, round_: int, client: str, reason: str) -> SkipReceipt:
        """Record a selected client's early notice that it sends no update in the open round, and close the
        round at once if that leaves nobody to wait for. A refusal leaves the store untouched."""
        if self.settings.buffer:
            raise Rejected(
                "asynchronous_mode", "asynchronous rounds wait for no client: there is no round to skip"
            )
        with self._slot(round_, client, None) as (open_round, _):
            with _once(client, round_):
                self._store.add_skip(open_round, client, reason)
            self._skipped += 1
            self.log.skip(open_round, client, reason)
            changed = self._advance(time.time())
        if changed:
            self._notify()
        return SkipReceipt(round=open_round, client=client, reason=reason)

    def _staleness(self, round_: int, current: RoundRecord, base_sha: str | None) -> int:
        """How many versions behind the open round the update's base is: the round whose base model it
        names in its metadata (it may have fetched a newer model than the round it was asked to train
        for), else the round it was sent to. Too stale, or trained from no recent model: refused."""
        limit = self.settings.max_staleness
        oldest = current.round - limit
        if round_ < oldest:
            raise Rejected("too_stale", f"round {round_} is more than {limit} versions behind")
        if base_sha is None:
            return current.round - round_
        for candidate in range(current.round, max(oldest, 1) - 1, -1):
            record = self._store.round(candidate)
            if record is not None and record.base_sha256 == base_sha:
                return current.round - candidate
        raise Rejected("too_stale", f"model {base_sha[:12]} is not among the last {limit} versions")

    def _advance(self, now: float) -> bool:
        changed = False
        if self._open is not None:
            wanted = len(self._open.selected)
            if self.settings.buffer:
                wanted = min(self.settings.buffer, wanted)
            received = len(self._folded)
            action = decide(received, wanted, self._quorum(), now, self._open.deadline, self._skipped)
            if action is Action.WAIT:
                return False
            self._close(self._open, aggregated=action is Action.AGGREGATE)
            changed = True
        if not self._finished:
            changed |= self._open_next(now)
        return changed

    def _refuse_late(self, round_: int, current: RoundRecord | None) -> None:
        """An update for a round that has already closed (or passed its deadline) is late: say so."""
        last = self._store.last_round()
        if current is None:
            if last is not None and round_ <= last.round:
                raise Rejected("round_closed", f"round {round_} is closed; no round is open now")
            return
        if round_ < current.round:
            raise Rejected("round_closed", f"round {round_} is closed; round {current.round} is open")
        if round_ == current.round and time.time() >= current.deadline:
            raise Rejected("round_closed", f"round {round_} passed its deadline")

    def _refuse_reported(self, round_: int, client: str) -> None:
        """Duplication is answered before lateness: a client resending what a round already counted (its
        first answer was lost with the connection) learns it was delivered, not that the round closed.
        Asked only of refusals, so an accepted update pays for no extra lookup."""
        if any(update.client == client for update in self._store.updates(round_)):
            raise Rejected("duplicate_update", f"{client!r} already sent its update for round {round_}")
        if client in self._store.skips(round_):
            raise Rejected("already_skipped", f"{client!r} already skipped round {round_}")

    def _base(self, staleness: int) -> Tensors:
        """The model an update ``staleness`` versions behind the open round was trained from."""
        assert self._open is not None
        if staleness == 0:
            return self._model.tensors
        record = self._store.round(self._open.round - staleness)
        assert record is not None
        return mapped(self._store.model_path(record.base_sha256))

    def _quorum(self) -> int:
        return max(self.settings.min_updates, self.strategy.min_updates())

    def _fold(self, client: str, tensors: Tensors, num_examples: int, staleness: int = 0) -> None:
        if self.strategy.streaming:
            assert self._sum is not None
            assert self._open is not None
            if staleness:
                discount = aggregation.staleness_weight(staleness, self.settings.staleness_exponent)
                tensors = aggregation.rebase(tensors, self._base(staleness), self._model.tensors, discount)
            prepared = self.strategy.prepare(tensors, self._model.tensors)
            aggregation.fold(self._sum, prepared, float(num_examples))
        self._folded.add(client)

    def _read_stored(self, round_: int) -> None:
        """Fold the open round's stored updates that the sum does not hold yet (all of them after a restart,
        the other replicas' since the last look when following), and count its skips."""
        for update in self._store.updates(round_):
            if update.client not in self._folded:
                tensors = decode(update.path.read_bytes())[0]
                self._fold(update.client, tensors, update.num_examples, update.staleness)
        self._skipped = len(self._store.skips(round_))

    def _close(self, record: RoundRecord, aggregated: bool) -> None:
        started = time.perf_counter()
        tensors = self._aggregate(record.round) if aggregated else None
        result = state_sha = None
        if tensors is not None:
            metadata = {"round": str(record.round), "task": self.settings.task}
            body = encode(tensors, {**self.strategy.metadata(record.round), **metadata})
            result = self._store.put_model(body)
            if state := self.strategy.state():
                state_sha = self._store.put_strategy_state(encode(state))
        self._store.close_round(record.round, result, state_sha)
        if result is not None:
            assert tensors is not None
            self._model = GlobalModel(body, result, record.round, tensors)
        self._open = None
        self._sum = None
        self._finished = record.round >= self.settings.rounds
        counts = (len(self._folded), self._skipped, self._quorum())
        self.log.closed(record, counts, self.strategy.name, time.perf_counter() - started, result)
        if result is not None:
            self._ask_evaluation(record.round, result)
        self._finish_if_evaluated(time.time())

    def _ask_evaluation(self, round_: int, model_sha256: str) -> None:
        """Ask a share of the clients to score the model ``round_`` made, when that round is due; the ask
        rides on the announcements from now on, until its deadline (one round's timeout)."""
        s = self.settings
        if not federated_evaluation.due(round_, s.evaluate_every, s.rounds):
            return
        asked = federated_evaluation.evaluators(self._registered(), round_, s.fraction_evaluate, s.seed)
        if not asked:
            return
        self._ask = EvaluationAsk(
            round=round_, model_sha256=model_sha256, clients=asked, deadline=time.time() + s.round_timeout
        )
        self._store.ask_evaluation(self._ask)

    def _aggregate(self, round_: int) -> Tensors | None:
        """The round's new model, or None when the strategy cannot aggregate its updates (it fails)."""
        mean = None
        if self.strategy.streaming:
            assert self._sum is not None
            mean = aggregation.average(self._sum, self._model.tensors)
        try:
            updates = self._store.update_tensors(round_)
            return self.strategy.aggregate(round_, self._model.tensors, mean, updates)
        except StrategyError:
            return None

    def start(self) -> RoundInfo:
        """Let a federation held by ``manual_start`` run: round 1 opens as soon as enough clients are in."""
        with self._critical():
            if self._started:
                raise Rejected("already_started", "the federation is already running")
            self._store.set_meta("started", "1")
            self._started = True
            changed = self._advance(time.time())
        if changed:
            self._notify()
        return self.round_info()

    def choose_strategy(self, name: str, params: Mapping[str, object]) -> int:
        """Switch strategy from the next round on (an open round finishes with the one it began with); the
        choice is stored, so a restarted server keeps it. Returns the first round it applies to. ``params``
        are checked against the strategy's declaration."""
        try:
            strategy = create(name, params, self.settings.seed)
        except StrategyError as exc:
            raise Rejected("invalid_strategy", str(exc)) from None
        if self.settings.buffer and not strategy.streaming:
            raise Rejected("asynchronous_mode", f"asynchronous mode needs a streaming strategy, not {name}")
        with self._critical():
            self._store.set_meta(
                "strategy_next", json.dumps({"name": name, "params": asdict(strategy.params)})
            )
            self._pending = strategy
            if self._open is None:
                self._switch_strategy()
            last = self._store.last_round()
            return (last.round if last else 0) + 1

    def _switch_strategy(self) -> None:
        """Make the pending strategy the current one; the old one's optimizer state does not carry over."""
        if self._pending is None:
            return
        self.strategy, self._pending = self._pending, None
        self._store.set_meta("strategy", self._store.get_meta("strategy_next") or "")
        self._store.set_meta("strategy_next", "")
        self._store.set_meta("strategy_state", "")

    def _open_next(self, now: float) -> bool:
        if not self._started:
            return False
        self._switch_strategy()
        clients = self._registered()
        if len(clients) < max(self.settings.min_clients, self.strategy.min_updates()):
            return False
        last = self._store.last_round()
        round_ = (last.round if last else 0) + 1
        self._open = self._store.open_round(
            round_,
            self._model.sha256,
            select(clients, round_, self.settings.fraction, self._quorum(), self.settings.seed),
            self.strategy.configure(self.settings.train),
            now + self.settings.round_timeout,
        )
        self._begin()
        self.log.opened(self._open)
        return True

    def _begin(self) -> None:
        self._sum = aggregation.start(self._model.tensors) if self.strategy.streaming else None
        self._skipped = 0
        self._folded = set()

    def _load(self, initial_model: bytes | None) -> None:
        """Start from the stored global model, resuming an open round with every update already accepted
        (at start, and when another replica moved the rounds on)."""
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
        self._started = not self.settings.manual_start or self._store.get_meta("started") == "1"
        if chosen := self._store.get_meta("strategy"):
            self.strategy = _strategy_from(chosen, self.settings.seed)
        self._read_pending()
        if state_sha := self._store.get_meta("strategy_state"):
            self.strategy.load_state(decode(self._store.strategy_state_path(state_sha).read_bytes())[0])
        last = self._store.last_round()
        self._open = self._sum = None
        if last is not None and last.state == "open":
            self._open = last
            self._begin()
            self._read_stored(last.round)
        self._finished = self._open is None and last is not None and last.round >= self.settings.rounds
        self._ask = self._store.last_ask()

    def _read_pending(self) -> None:
        """The strategy chosen for the next round, if one is (here or on another replica)."""
        pending = self._store.get_meta("strategy_next")
        self._pending = _strategy_from(pending, self.settings.seed) if pending else None

    def _notify(self) -> None:
        for listener in self._listeners:
            listener()


@contextlib.contextmanager
def _once(client: str, round_: int) -> Iterator[None]:
    """A client reports once a round, an update or a skip: the store refuses a second, and so does the API."""
    try:
        yield
    except DuplicateUpdate:
        raise Rejected("duplicate_update", f"{client!r} already sent its update") from None
    except AlreadySkipped:
        raise Rejected("already_skipped", f"{client!r} already skipped round {round_}") from None


def _strategy_from(stored: str, seed: int) -> Strategy:
    """A stored choice; one stored before strategies declared their own parameters held every strategy's,
    so only the chosen one's are taken."""
    spec = json.loads(stored)
    return pick(spec["name"], spec["params"], seed)
