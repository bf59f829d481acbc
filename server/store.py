"""Durable state of the aggregation function: round records in SQLite (WAL), tensors as files.

Global models are immutable files named by their sha256. An update is written and fsynced, then recorded in
the same transaction that makes it count, before the server answers 202: a crash after the answer loses
nothing, and a crash before it leaves no half-accepted update.
"""

from __future__ import annotations

import json
import os
import sqlite3
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from fedge.codec import sha256
from fedge.wire import TrainConfig

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS rounds (
    round INTEGER PRIMARY KEY,
    state TEXT NOT NULL,            -- open, done, failed
    base_sha256 TEXT NOT NULL,      -- the global model the round trains from
    result_sha256 TEXT,             -- the global model it produced
    selected TEXT NOT NULL,         -- JSON list of client ids
    config TEXT NOT NULL,           -- JSON TrainConfig
    opened_at REAL NOT NULL,
    deadline REAL NOT NULL,
    closed_at REAL
);
CREATE TABLE IF NOT EXISTS updates (
    round INTEGER NOT NULL REFERENCES rounds(round),
    client TEXT NOT NULL,
    sha256 TEXT NOT NULL,
    num_examples INTEGER NOT NULL,
    bytes INTEGER NOT NULL,
    received_at REAL NOT NULL,
    signature TEXT NOT NULL DEFAULT '',  -- the client's, over (federation, round, client, sha256, nonce)
    nonce TEXT NOT NULL DEFAULT '',
    computed_by TEXT NOT NULL DEFAULT '',  -- the executor that trained it for the client, or ''
    PRIMARY KEY (round, client)
);
"""


class DuplicateUpdate(Exception):
    """The client already has an update in this round."""


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
    path: Path


class Store:
    """Not thread-safe by itself: the round state machine serializes every call."""

    def __init__(self, data_dir: Path) -> None:
        self.dir = data_dir
        (data_dir / "models").mkdir(parents=True, exist_ok=True)
        (data_dir / "updates").mkdir(exist_ok=True)
        self._db = sqlite3.connect(data_dir / "state.db", check_same_thread=False, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=FULL")
        self._db.executescript(_SCHEMA)

    def close(self) -> None:
        self._db.close()

    def get_meta(self, key: str) -> str | None:
        row = self._db.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
        return row[0] if row else None

    def set_meta(self, key: str, value: str) -> None:
        self._db.execute("INSERT OR REPLACE INTO meta (key, value) VALUES (?, ?)", (key, value))

    def put_model(self, body: bytes) -> str:
        digest = sha256(body)
        path = self.model_path(digest)
        if not path.exists():
            _write_durably(path, body)
        return digest

    def model_path(self, digest: str) -> Path:
        return self.dir / "models" / f"{digest}.safetensors"

    def open_round(
        self, round_: int, base_sha256: str, selected: list[str], config: TrainConfig, deadline: float
    ) -> RoundRecord:
        self._db.execute(
            "INSERT INTO rounds (round, state, base_sha256, selected, config, opened_at, deadline)"
            " VALUES (?, 'open', ?, ?, ?, ?, ?)",
            (round_, base_sha256, json.dumps(selected), config.model_dump_json(), time.time(), deadline),
        )
        record = self.round(round_)
        assert record is not None
        return record

    def close_round(self, round_: int, result_sha256: str | None) -> None:
        """Record the round's outcome and, in the same transaction, make its result the global model."""
        with self._transaction():
            self._db.execute(
                "UPDATE rounds SET state = ?, result_sha256 = ?, closed_at = ? WHERE round = ?",
                ("done" if result_sha256 else "failed", result_sha256, time.time(), round_),
            )
            if result_sha256:
                self.set_meta("global_sha256", result_sha256)
                self.set_meta("global_round", str(round_))

    def round(self, round_: int) -> RoundRecord | None:
        row = self._db.execute(
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
        row = self._db.execute("SELECT MAX(round) FROM rounds").fetchone()
        return self.round(row[0]) if row[0] is not None else None

    def add_update(
        self, round_: int, client: str, body: bytes, num_examples: int, provenance: Provenance | None = None
    ) -> UpdateRecord:
        if self._db.execute(
            "SELECT 1 FROM updates WHERE round = ? AND client = ?", (round_, client)
        ).fetchone():
            raise DuplicateUpdate(client)
        path = self.dir / "updates" / str(round_) / f"{client}.safetensors"
        path.parent.mkdir(exist_ok=True)
        _write_durably(path, body)
        proof = provenance or Provenance()
        digest = proof.body_sha256 or sha256(body)
        self._db.execute(
            "INSERT INTO updates"
            " (round, client, sha256, num_examples, bytes, received_at, signature, nonce, computed_by)"
            " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (round_, client, digest, num_examples, len(body), time.time(), proof.signature, proof.nonce,
             proof.computed_by),
        )  # fmt: skip
        return UpdateRecord(client, digest, num_examples, path)

    def history(self) -> list[tuple[RoundRecord, list[str]]]:
        """Every round, oldest first, with the clients whose updates it stored (for operators)."""
        rounds = self._db.execute("SELECT round FROM rounds ORDER BY round").fetchall()
        return [(record, [u.client for u in self.updates(r)]) for (r,) in rounds if (record := self.round(r))]

    def updates(self, round_: int) -> list[UpdateRecord]:
        rows = self._db.execute(
            "SELECT client, sha256, num_examples FROM updates WHERE round = ? ORDER BY received_at, client",
            (round_,),
        ).fetchall()
        return [
            UpdateRecord(c, s, n, self.dir / "updates" / str(round_) / f"{c}.safetensors") for c, s, n in rows
        ]

    @contextmanager
    def _transaction(self) -> Iterator[None]:
        self._db.execute("BEGIN IMMEDIATE")
        try:
            yield
        except BaseException:
            self._db.execute("ROLLBACK")
            raise
        self._db.execute("COMMIT")


def _write_durably(path: Path, body: bytes) -> None:
    """Write, fsync, rename, fsync the directory: the file is either whole on disk or absent."""
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        f.write(body)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    dir_fd = os.open(path.parent, os.O_DIRECTORY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)
