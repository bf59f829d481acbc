"""Durable state of the aggregation function: round records in SQLite (WAL) or PostgreSQL, tensors as files.

Global models are immutable files named by their sha256. An update is written and fsynced under a name of
its own upload, then recorded in the same transaction that makes it count, before the server answers 202: a
crash after the answer loses nothing, and a crash before it leaves no half-accepted update.

SQLite (``<data>/state.db``) suits one server; PostgreSQL (``--store postgresql://...``) is for deployments,
and lets several servers (replicas) share one store: each critical section of the rounds holds the store
(``Store.exclusive``, an advisory lock), and the tensor files live in one blob directory they all mount
(``--blobs``, a ReadWriteMany volume in Kubernetes). Both take the same SQL: ``?`` placeholders are rewritten
for psycopg, and the schema uses only types and statements (``ON CONFLICT``, ``DOUBLE PRECISION``) that both
understand.
"""

from __future__ import annotations

import json
import secrets
import sqlite3
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, overload

from fedge.codec import Tensors, mapped, sha256
from fedge.files import write_file
from fedge.pricing import Usage
from fedge.wire import EvaluationAsk, EvaluationReport, TrainConfig

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS rounds (
    round INTEGER PRIMARY KEY,
    state TEXT NOT NULL,            -- open, done, failed
    base_sha256 TEXT NOT NULL,      -- the global model the round trains from
    result_sha256 TEXT,             -- the global model it produced
    selected TEXT NOT NULL,         -- JSON list of client ids
    config TEXT NOT NULL,           -- JSON TrainConfig
    opened_at DOUBLE PRECISION NOT NULL,
    deadline DOUBLE PRECISION NOT NULL,
    closed_at DOUBLE PRECISION
);
CREATE TABLE IF NOT EXISTS updates (
    round INTEGER NOT NULL REFERENCES rounds(round),
    client TEXT NOT NULL,
    sha256 TEXT NOT NULL,
    num_examples INTEGER NOT NULL,
    bytes INTEGER NOT NULL,
    received_at DOUBLE PRECISION NOT NULL,
    signature TEXT NOT NULL DEFAULT '',  -- the client's, over (federation, round, client, sha256, nonce)
    nonce TEXT NOT NULL DEFAULT '',
    computed_by TEXT NOT NULL DEFAULT '',  -- the executor that trained it for the client, or ''
    staleness INTEGER NOT NULL DEFAULT 0,  -- asynchronous mode: versions behind the round it joins
    restored INTEGER NOT NULL DEFAULT 0,   -- 1: a compressed body, restored beside it for aggregation
    blob TEXT NOT NULL DEFAULT '',         -- its files' name in updates/<round>/ ('': the client's id)
    PRIMARY KEY (round, client)
);
CREATE TABLE IF NOT EXISTS skips (
    round INTEGER NOT NULL REFERENCES rounds(round),
    client TEXT NOT NULL,
    reason TEXT NOT NULL,           -- the client's, e.g. out of memory
    received_at DOUBLE PRECISION NOT NULL,
    PRIMARY KEY (round, client)
);
CREATE TABLE IF NOT EXISTS evaluations (
    round INTEGER NOT NULL,         -- the round whose model was evaluated (0: the initial model)
    source TEXT NOT NULL,           -- server: fedge server --eval-data, federated: the clients asked
    loss DOUBLE PRECISION NOT NULL,
    accuracy DOUBLE PRECISION,      -- none: the clients' app reports no accuracy
    examples INTEGER NOT NULL,
    evaluated_at DOUBLE PRECISION NOT NULL,
    PRIMARY KEY (round, source)
);
CREATE TABLE IF NOT EXISTS evaluation_asks (  -- federated evaluation: whom each round's model was sent to
    round INTEGER PRIMARY KEY,      -- the round whose model is evaluated
    model_sha256 TEXT NOT NULL,
    clients TEXT NOT NULL,          -- JSON list of client ids
    deadline DOUBLE PRECISION NOT NULL
);
CREATE TABLE IF NOT EXISTS client_evaluations (  -- what each asked client reported, signed
    round INTEGER NOT NULL,
    client TEXT NOT NULL,
    loss DOUBLE PRECISION NOT NULL,
    num_examples BIGINT NOT NULL,
    metrics TEXT NOT NULL,          -- JSON object of name -> number
    signature TEXT NOT NULL,        -- the client's, over (federation, round, client, sha256, nonce)
    nonce TEXT NOT NULL,
    received_at DOUBLE PRECISION NOT NULL,
    PRIMARY KEY (round, client)
);
CREATE TABLE IF NOT EXISTS sightings (  -- replicas' presence: when each client was last seen, by any of them
    client TEXT PRIMARY KEY,
    seen_at DOUBLE PRECISION NOT NULL,
    stamp BIGINT NOT NULL           -- rises with each sighting shared: what a replica has heard up to
);
CREATE TABLE IF NOT EXISTS usage (  -- what each update's run consumed (fedge.pricing.Usage), for the bill
    round INTEGER NOT NULL,
    client TEXT NOT NULL,
    device_seconds DOUBLE PRECISION NOT NULL,
    device_gb_seconds DOUBLE PRECISION NOT NULL,
    device_invocations BIGINT NOT NULL,
    executor_seconds DOUBLE PRECISION NOT NULL,
    executor_gb_seconds DOUBLE PRECISION NOT NULL,
    executor_invocations BIGINT NOT NULL,
    gpu_seconds DOUBLE PRECISION NOT NULL,
    bytes_up BIGINT NOT NULL,           -- the update body the server received
    bytes_down BIGINT NOT NULL,         -- the global model its producer fetched
    PRIMARY KEY (round, client)
);
"""
# The advisory lock replicas of one federation take around each change of its rounds (any 64-bit number
# that no other user of the database takes; this one spells "fedge").
_LOCK_KEY = 0x6665646765
_SIGHTINGS_KEY = _LOCK_KEY + 1  # the presence exchange's, apart: sharing sightings changes no round
_USAGE_KINDS = [int if f.type in ("int", int) else float for f in fields(Usage)]  # SUM gives Decimal on PG


class StoreError(Exception):
    """The store cannot be opened (bad URL, unreachable database)."""


class DuplicateUpdate(Exception):
    """The client already has an update in this round."""


class AlreadySkipped(Exception):
    """The client already told the server it skips this round."""


class DuplicateEvaluation(Exception):
    """The client already reported its evaluation of this round's model."""


@dataclass(frozen=True)
class RoundRecord:
    round: int
    state: str
    base_sha256: str
    result_sha256: str | None
    selected: list[str]
    config: TrainConfig
    opened_at: float
    deadline: float


@dataclass(frozen=True)
class Provenance:
    """Who vouches for an update: the signature and nonce the API verified, the body's sha256 it computed
    for that (so it is not hashed twice), and the executor that trained it for the client, if any."""

    signature: str = ""
    nonce: str = ""
    body_sha256: str = ""
    computed_by: str = ""


@dataclass(frozen=True)
class UpdateRecord:
    client: str
    sha256: str
    num_examples: int
    path: Path  # the full update that aggregation reads (restored, when the client sent it compressed)
    staleness: int = 0


class MappedUpdates(Sequence[tuple[Tensors, int]]):
    """Stored updates as (tensors, num_examples), each memory-mapped when read: a strategy that only counts
    them (DP's noise) maps no file, and one that reads them all holds no copy."""

    def __init__(self, records: list[UpdateRecord]) -> None:
        self._records = records

    def __len__(self) -> int:
        return len(self._records)

    @overload
    def __getitem__(self, index: int) -> tuple[Tensors, int]: ...
    @overload
    def __getitem__(self, index: slice) -> list[tuple[Tensors, int]]: ...
    def __getitem__(self, index: int | slice) -> tuple[Tensors, int] | list[tuple[Tensors, int]]:
        if isinstance(index, slice):
            return [(mapped(u.path), u.num_examples) for u in self._records[index]]
        record = self._records[index]
        return mapped(record.path), record.num_examples


@dataclass(frozen=True)
class Evaluation:
    round: int
    source: str
    loss: float
    accuracy: float | None  # None: the clients' app reports no accuracy (federated evaluation)
    examples: int


@dataclass(frozen=True)
class RoundHistory:
    """A round as operators see it: who sent an update, and who skipped it and why."""

    record: RoundRecord
    reported: list[str]
    skipped: dict[str, str]  # client -> reason


class Store:
    """Not thread-safe by itself: the round state machine serializes every call but ``write_update``,
    which touches only files and runs outside its lock."""

    def __init__(self, data_dir: Path, url: str | None = None, blobs: Path | None = None) -> None:
        """``blobs``: where models, updates and strategy states are kept, when not in ``data_dir`` (replicas
        share one; each keeps its own ``data_dir``)."""
        self.dir = blobs or data_dir
        (self.dir / "models").mkdir(parents=True, exist_ok=True)
        (self.dir / "updates").mkdir(exist_ok=True)
        (self.dir / "strategy").mkdir(exist_ok=True)
        self._postgres = url is not None
        self.revision = 0  # rises with every statement that may write: what a cache of the ledger keys on
        self._shared: int | None = None  # the store-wide revision as this server last left it (exclusive)
        self._db: Any = _postgres(url) if url is not None else _sqlite(data_dir / "state.db")
        with self._transaction():
            if self._postgres:  # replicas starting together would race to create the same tables
                self._execute("SELECT pg_advisory_xact_lock(?)", (_LOCK_KEY,))
            for statement in filter(str.strip, _SCHEMA.split(";")):
                self._execute(statement)
            self._allow_unscored()
            self._name_blobs()

    def _allow_unscored(self) -> None:
        """A store made before federated evaluation required every evaluation to have an accuracy; a
        clients' app may report none, so the column takes NULL from now on (caller holds a transaction)."""
        if self._postgres:
            self._execute("ALTER TABLE evaluations ALTER COLUMN accuracy DROP NOT NULL")
            return
        (made,) = self._execute("SELECT sql FROM sqlite_master WHERE name = 'evaluations'").fetchone()
        required = "accuracy DOUBLE PRECISION NOT NULL"
        if required in made:  # SQLite changes a column's constraints only by copying the table
            self._execute("ALTER TABLE evaluations RENAME TO evaluations_required")
            self._execute(made.replace(required, "accuracy DOUBLE PRECISION"))
            self._execute("INSERT INTO evaluations SELECT * FROM evaluations_required")
            self._execute("DROP TABLE evaluations_required")

    def _name_blobs(self) -> None:
        """A store made before uploads had blob names of their own has no ``blob`` column: its rows get
        '' (the client's id, as their files are named). Caller holds a transaction."""
        if self._postgres:
            self._execute("ALTER TABLE updates ADD COLUMN IF NOT EXISTS blob TEXT NOT NULL DEFAULT ''")
            return
        columns = {row[0] for row in self._execute("SELECT name FROM pragma_table_info('updates')")}
        if "blob" not in columns:
            self._execute("ALTER TABLE updates ADD COLUMN blob TEXT NOT NULL DEFAULT ''")

    def claim_blobs(self) -> None:
        """One store, one blob directory: a server given another replica's database but a blob directory
        of its own would find no model there. The first server to open the store marks its blob directory
        with the store's id (or takes the mark it finds: a store made again over its old blobs); a
        directory without that mark is refused in one line."""
        marker = self.dir / "store-id"
        with self.exclusive():
            found = marker.read_text().strip() if marker.is_file() else None
            known = self.get_meta("store_id")
            if known is None:
                known = found or secrets.token_hex(16)
                if found is None:
                    write_file(marker, known.encode())
                    found = known
                self.set_meta("store_id", known)
        if found != known:
            raise StoreError(
                f"{self.dir} is not the blob directory of this store (its models are elsewhere): every "
                "replica on one --store shares one --blobs"
            )

    def close(self) -> None:
        self._db.close()

    @contextmanager
    def exclusive(self) -> Iterator[bool]:
        """Hold the store against the other servers on it for one critical section of the rounds; yields
        whether any of them wrote since this one last held it, so that the caller reads its view of the
        rounds again first. SQLite belongs to one server (``server.lock``): there this says False. In
        PostgreSQL it is an advisory lock, which the database lets go of when the holder's connection ends
        (a replica killed holding it blocks nobody), and a revision row that each section that wrote raises.
        Not re-entrant: the rounds' own lock is taken first, once."""
        if not self._postgres:
            yield False
            return
        self._execute("SELECT pg_advisory_lock(?)", (_LOCK_KEY,))
        try:
            seen = int(self.get_meta("revision") or 0)
            moved = seen != self._shared
            if moved:
                self.revision += 1  # another server's rows: a cached ledger is out of date too
            before = self.revision
            try:
                yield moved
            finally:
                if self.revision != before:
                    seen += 1
                    self.set_meta("revision", str(seen))
                self._shared = seen
        finally:
            self._execute("SELECT pg_advisory_unlock(?)", (_LOCK_KEY,))

    def _execute(self, sql: str, args: Sequence[object] = ()) -> Any:
        if not sql.startswith("SELECT"):
            self.revision += 1
        return self._db.execute(self._dialect(sql), args)

    def _execute_many(self, sql: str, rows: Sequence[Sequence[object]]) -> None:
        """One statement for many rows: one round trip to PostgreSQL, not one per row."""
        if not rows:
            return
        self.revision += 1
        self._db.cursor().executemany(self._dialect(sql), rows)

    def _dialect(self, sql: str) -> str:
        return sql.replace("?", "%s") if self._postgres else sql

    def get_meta(self, key: str) -> str | None:
        row = self._execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
        return row[0] if row else None

    def set_meta(self, key: str, value: str) -> None:
        self._execute(
            "INSERT INTO meta (key, value) VALUES (?, ?)"
            " ON CONFLICT (key) DO UPDATE SET value = excluded.value",
            (key, value),
        )

    def put_model(self, body: bytes) -> str:
        return self._put_blob(body, self.model_path)

    def model_path(self, digest: str) -> Path:
        return self.dir / "models" / f"{digest}.safetensors"

    def put_strategy_state(self, body: bytes) -> str:
        """What a strategy carries between rounds (a server optimizer's moments), content-addressed."""
        return self._put_blob(body, self.strategy_state_path)

    def strategy_state_path(self, digest: str) -> Path:
        return self.dir / "strategy" / f"{digest}.safetensors"

    def _put_blob(self, body: bytes, path_of: Callable[[str], Path]) -> str:
        """Immutable and named by its sha256: written once, durably, and never again."""
        digest = sha256(body)
        path = path_of(digest)
        if not path.exists():
            write_file(path, body)
        return digest

    def open_round(
        self, round_: int, base_sha256: str, selected: list[str], config: TrainConfig, deadline: float
    ) -> RoundRecord:
        self._execute(
            "INSERT INTO rounds (round, state, base_sha256, selected, config, opened_at, deadline)"
            " VALUES (?, 'open', ?, ?, ?, ?, ?)",
            (round_, base_sha256, json.dumps(selected), config.model_dump_json(), time.time(), deadline),
        )
        record = self.round(round_)
        assert record is not None
        return record

    def close_round(self, round_: int, result_sha256: str | None, strategy_state: str | None = None) -> None:
        """Record the round's outcome and, in the same transaction, make its result the global model and
        its strategy state current: a crash leaves either the old round open or the new model in force."""
        with self._transaction():
            self._execute(
                "UPDATE rounds SET state = ?, result_sha256 = ?, closed_at = ? WHERE round = ?",
                ("done" if result_sha256 else "failed", result_sha256, time.time(), round_),
            )
            if result_sha256:
                self.set_meta("global_sha256", result_sha256)
                self.set_meta("global_round", str(round_))
            if strategy_state:
                self.set_meta("strategy_state", strategy_state)

    def round(self, round_: int) -> RoundRecord | None:
        row = self._execute(
            "SELECT round, state, base_sha256, result_sha256, selected, config, opened_at, deadline"
            " FROM rounds WHERE round = ?",
            (round_,),
        ).fetchone()
        if row is None:
            return None
        return RoundRecord(
            round=row[0],
            state=row[1],
            base_sha256=row[2],
            result_sha256=row[3],
            selected=json.loads(row[4]),
            config=TrainConfig.model_validate_json(row[5]),
            opened_at=row[6],
            deadline=row[7],
        )

    def last_round(self) -> RoundRecord | None:
        row = self._execute("SELECT MAX(round) FROM rounds").fetchone()
        return self.round(row[0]) if row[0] is not None else None

    def add_update(
        self,
        round_: int,
        client: str,
        body: bytes,
        num_examples: int,
        provenance: Provenance | None = None,
        staleness: int = 0,
        restored: bytes | None = None,
    ) -> UpdateRecord:
        """Write an update's blobs, then record it: what ``Federation.submit`` does in two steps, the first
        outside its lock, for callers that need no concurrency (restores, tests)."""
        self.check_unreported(round_, client)
        blob = self.write_update(round_, client, body, restored)
        proof = provenance or Provenance()
        return self.record_update(
            round_, client, proof.body_sha256 or sha256(body), len(body), num_examples, proof, staleness,
            restored is not None, blob,
        )  # fmt: skip

    def write_update(self, round_: int, client: str, body: bytes, restored: bytes | None = None) -> str:
        """Durably write the body as sent (what its signature covers) and, for a compressed one, the full
        update it stands for (``restored``), which is what aggregation reads; returns the blobs' name.
        Touches no database, so it is the one store call that may run concurrently: the name is this
        upload's own, so a second upload of the same client (to this server or to another replica) never
        writes over it. Until ``record_update`` commits its row the blobs count for nothing."""
        blob = f"{client}.{secrets.token_hex(8)}"
        path = self._blob_path(round_, blob)
        path.parent.mkdir(exist_ok=True)
        write_file(path, body)
        if restored is not None:
            write_file(_restored_path(path), restored)
        return blob

    def record_update(
        self,
        round_: int,
        client: str,
        digest: str,
        size: int,
        num_examples: int,
        provenance: Provenance,
        staleness: int,
        restored: bool,
        blob: str,
    ) -> UpdateRecord:
        """Make the written update (``write_update``, which named its ``blob``) count: one durable row,
        refused if the client already reported in this round. The 202 follows this, so an acknowledged
        update survives a crash."""
        self.check_unreported(round_, client)
        self._execute(
            "INSERT INTO updates (round, client, sha256, num_examples, bytes, received_at, signature, nonce,"
            " computed_by, staleness, restored, blob) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (round_, client, digest, num_examples, size, time.time(), provenance.signature, provenance.nonce,
             provenance.computed_by, staleness, int(restored), blob),
        )  # fmt: skip
        path = self._blob_path(round_, blob)
        return UpdateRecord(
            client, digest, num_examples, _restored_path(path) if restored else path, staleness
        )

    def discard_update(self, round_: int, blob: str) -> None:
        """Remove the blobs of a written update that will never be recorded (refused after it was written);
        their name is that upload's own, so nothing recorded goes with them."""
        path = self._blob_path(round_, blob)
        for written in (path, _restored_path(path)):
            written.unlink(missing_ok=True)

    def _blob_path(self, round_: int, blob: str) -> Path:
        return self.dir / "updates" / str(round_) / f"{blob}.safetensors"

    def add_skip(self, round_: int, client: str, reason: str) -> None:
        """Record that ``client`` sends no update in ``round_``: each client reports once, update or skip."""
        self.check_unreported(round_, client)
        self._execute(
            "INSERT INTO skips (round, client, reason, received_at) VALUES (?, ?, ?, ?)",
            (round_, client, reason, time.time()),
        )

    def skips(self, round_: int) -> dict[str, str]:
        """The round's skip notices, client -> reason, in the order they came."""
        rows = self._execute(
            "SELECT client, reason FROM skips WHERE round = ? ORDER BY received_at, client", (round_,)
        ).fetchall()
        return dict(rows)

    def check_unreported(self, round_: int, client: str) -> None:
        """Refuse a second report from ``client`` in ``round_``: each client sends an update or a skip."""
        if self.has_update(round_, client):
            raise DuplicateUpdate(client)
        if self._execute("SELECT 1 FROM skips WHERE round = ? AND client = ?", (round_, client)).fetchone():
            raise AlreadySkipped(client)

    def has_update(self, round_: int, client: str) -> bool:
        return bool(
            self._execute("SELECT 1 FROM updates WHERE round = ? AND client = ?", (round_, client)).fetchone()
        )

    def add_evaluation(self, evaluation: Evaluation) -> None:
        """Record how a round's model scored; evaluated again (a restart), the newer figures stand."""
        self._execute(
            "INSERT INTO evaluations (round, source, loss, accuracy, examples, evaluated_at)"
            " VALUES (?, ?, ?, ?, ?, ?) ON CONFLICT (round, source) DO UPDATE SET"
            " loss = excluded.loss, accuracy = excluded.accuracy, examples = excluded.examples,"
            " evaluated_at = excluded.evaluated_at",
            (evaluation.round, evaluation.source, evaluation.loss, evaluation.accuracy, evaluation.examples,
             time.time()),
        )  # fmt: skip

    def ask_evaluation(self, ask: EvaluationAsk) -> None:
        self._execute(
            "INSERT INTO evaluation_asks (round, model_sha256, clients, deadline) VALUES (?, ?, ?, ?)",
            (ask.round, ask.model_sha256, json.dumps(ask.clients), ask.deadline),
        )

    def last_ask(self) -> EvaluationAsk | None:
        row = self._execute(
            "SELECT round, model_sha256, clients, deadline FROM evaluation_asks ORDER BY round DESC LIMIT 1"
        ).fetchone()
        if row is None:
            return None
        return EvaluationAsk(round=row[0], model_sha256=row[1], clients=json.loads(row[2]), deadline=row[3])

    def add_client_evaluation(
        self, round_: int, client: str, report: EvaluationReport, signature: str, nonce: str
    ) -> None:
        """Record an asked client's evaluation; each client reports once per round."""
        if self._execute(
            "SELECT 1 FROM client_evaluations WHERE round = ? AND client = ?", (round_, client)
        ).fetchone():
            raise DuplicateEvaluation(client)
        self._execute(
            "INSERT INTO client_evaluations (round, client, loss, num_examples, metrics, signature, nonce,"
            " received_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
            (round_, client, report.loss, report.num_examples, json.dumps(report.metrics), signature, nonce,
             time.time()),
        )  # fmt: skip

    def client_evaluations(self, round_: int) -> dict[str, tuple[float, int, dict[str, float]]]:
        """The round's client evaluations, client -> (loss, examples, metrics), in the order they came."""
        rows = self._execute(
            "SELECT client, loss, num_examples, metrics FROM client_evaluations WHERE round = ?"
            " ORDER BY received_at, client",
            (round_,),
        ).fetchall()
        return {client: (loss, int(n), json.loads(metrics)) for client, loss, n, metrics in rows}

    def record_usage(self, round_: int, client: str, usage: Usage) -> None:
        """What computing ``client``'s update of ``round_`` consumed; recorded once, with the update."""
        u = usage
        self._execute(
            "INSERT INTO usage (round, client, device_seconds, device_gb_seconds, device_invocations,"
            " executor_seconds, executor_gb_seconds, executor_invocations, gpu_seconds, bytes_up, bytes_down)"
            " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?) ON CONFLICT (round, client) DO NOTHING",
            (round_, client, u.device_seconds, u.device_gb_seconds, u.device_invocations, u.executor_seconds,
             u.executor_gb_seconds, u.executor_invocations, u.gpu_seconds, u.bytes_up, u.bytes_down),
        )  # fmt: skip

    def share_sightings(self, fresh: dict[str, float], heard: int) -> tuple[list[tuple[str, float]], int]:
        """Publish this server's ``fresh`` sightings (client -> when) and read every sighting shared since
        stamp ``heard``, its own included; returns them with the stamp heard up to. Stamps are given under
        a lock of the exchange's own, so none is read before a lower one is written."""
        with self._transaction():
            if self._postgres:
                self._execute("SELECT pg_advisory_xact_lock(?)", (_SIGHTINGS_KEY,))
            (stamp,) = self._execute("SELECT COALESCE(MAX(stamp), 0) FROM sightings").fetchone()
            self._execute_many(
                "INSERT INTO sightings (client, seen_at, stamp) VALUES (?, ?, ?) ON CONFLICT (client)"
                " DO UPDATE SET stamp = excluded.stamp, seen_at = CASE WHEN excluded.seen_at >"
                " sightings.seen_at THEN excluded.seen_at ELSE sightings.seen_at END",
                [(client, at, stamp + i) for i, (client, at) in enumerate(fresh.items(), 1)],
            )
            rows = self._execute(
                "SELECT client, seen_at, stamp FROM sightings WHERE stamp > ? ORDER BY stamp", (heard,)
            ).fetchall()
        return [(client, at) for client, at, _ in rows], max([heard, *(row[2] for row in rows)])

    def usage_by_round(self) -> dict[int, Usage]:
        """Each round's usage, summed over its updates: what its bill is made of."""
        rows = self._execute(
            "SELECT round, SUM(device_seconds), SUM(device_gb_seconds), SUM(device_invocations),"
            " SUM(executor_seconds), SUM(executor_gb_seconds), SUM(executor_invocations), SUM(gpu_seconds),"
            " SUM(bytes_up), SUM(bytes_down) FROM usage GROUP BY round ORDER BY round"
        ).fetchall()
        return {  # PostgreSQL sums integers as numeric: each figure is made the type Usage holds
            row[0]: Usage(*(kind(v) for kind, v in zip(_USAGE_KINDS, row[1:], strict=True))) for row in rows
        }

    def evaluations(self) -> list[Evaluation]:
        """Every stored evaluation, by round then source."""
        rows = self._execute(
            "SELECT round, source, loss, accuracy, examples FROM evaluations ORDER BY round, source"
        ).fetchall()
        return [Evaluation(*row) for row in rows]

    def history(self) -> list[RoundHistory]:
        """Every round, oldest first, with the clients whose updates it stored and those that skipped it."""
        rounds = self._execute("SELECT round FROM rounds ORDER BY round").fetchall()
        return [
            RoundHistory(record, [u.client for u in self.updates(r)], self.skips(r))
            for (r,) in rounds
            if (record := self.round(r))
        ]

    def updates(self, round_: int) -> list[UpdateRecord]:
        rows = self._execute(
            "SELECT client, sha256, num_examples, staleness, restored, blob FROM updates WHERE round = ?"
            " ORDER BY received_at, client",
            (round_,),
        ).fetchall()
        updates = []
        for client, digest, num_examples, staleness, restored, blob in rows:
            path = self._blob_path(round_, blob or client)
            updates.append(
                UpdateRecord(
                    client, digest, num_examples, _restored_path(path) if restored else path, staleness
                )
            )
        return updates

    def update_tensors(self, round_: int) -> MappedUpdates:
        """The round's full updates with their examples, memory-mapped: strategies that need every update
        at once read them slice by slice from the page cache, not from RAM."""
        return MappedUpdates(self.updates(round_))

    @contextmanager
    def _transaction(self) -> Iterator[None]:
        if self._postgres:
            with self._db.transaction():
                yield
            return
        self._execute("BEGIN IMMEDIATE")
        try:
            yield
        except BaseException:
            self._execute("ROLLBACK")
            raise
        self._execute("COMMIT")


def _sqlite(path: Path) -> sqlite3.Connection:
    db = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
    db.execute("PRAGMA journal_mode=WAL")
    db.execute("PRAGMA synchronous=FULL")
    return db


def _postgres(url: str) -> Any:
    """Autocommit, so every statement outside a transaction is durable when it returns (PostgreSQL's
    ``synchronous_commit`` is on by default); psycopg is imported only for deployments that use it."""
    if not url.startswith(("postgresql://", "postgres://")):
        raise StoreError(f"unsupported store {url!r}: give a postgresql:// URL, or none for SQLite")
    try:
        import psycopg
    except ImportError:
        raise StoreError("a PostgreSQL store needs psycopg: pip install 'fedge[server]'") from None
    try:
        return psycopg.connect(url, autocommit=True)
    except psycopg.Error as exc:
        raise StoreError(f"cannot open the PostgreSQL store: {str(exc).strip().splitlines()[0]}") from None


def _restored_path(path: Path) -> Path:
    return path.with_name(path.name.replace(".safetensors", ".restored.safetensors"))


# Read queries for operators (the dashboard's admin route, ``fedge runs``): metadata only, three queries
# however many rounds there are, so a page refreshed every second costs the store almost nothing.


@dataclass(frozen=True)
class RoundRow:
    round: int
    state: str
    selected: list[str]
    opened_at: float
    deadline: float
    closed_at: float | None
    result_sha256: str | None


@dataclass(frozen=True)
class UpdateRow:
    round: int
    client: str
    bytes: int
    received_at: float
    computed_by: str  # the executor that trained it for the client, or '' when the client did


@dataclass(frozen=True)
class SkipRow:
    round: int
    client: str
    reason: str
    received_at: float


@dataclass(frozen=True)
class Ledger:
    """Every round, update and skip the store holds, as rows, oldest first."""

    rounds: list[RoundRow]
    updates: list[UpdateRow]
    skips: list[SkipRow]
    evaluations: list[Evaluation]
    usage: dict[int, Usage] = field(default_factory=dict)  # round -> what its updates consumed


def read_ledger(store: Store) -> Ledger:
    rounds = store._execute(
        "SELECT round, state, selected, opened_at, deadline, closed_at, result_sha256 FROM rounds"
        " ORDER BY round"
    ).fetchall()
    updates = store._execute(
        "SELECT round, client, bytes, received_at, computed_by FROM updates ORDER BY round, received_at"
    ).fetchall()
    skips = store._execute(
        "SELECT round, client, reason, received_at FROM skips ORDER BY round, received_at"
    ).fetchall()
    return Ledger(
        rounds=[RoundRow(r[0], r[1], json.loads(r[2]), r[3], r[4], r[5], r[6]) for r in rounds],
        updates=[UpdateRow(*u) for u in updates],
        skips=[SkipRow(*s) for s in skips],
        evaluations=store.evaluations(),
        usage=store.usage_by_round(),
    )
