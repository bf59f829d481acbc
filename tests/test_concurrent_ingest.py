"""Updates are written outside the round lock: the races that opens, made deterministic with threads and
events. A real store whose blob write for one client waits on a gate holds that update mid-write while
the test does what a second request would do at that moment."""

from __future__ import annotations

import threading
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from conftest import submit, toy_model, update_body

from fedge.codec import encode, sha256
from fedge.server.errors import Rejected
from fedge.server.rounds import Federation, FederationSettings
from fedge.server.store import Store
from fedge.transport import ServerError
from fedge.wire import RoundState

CLIENTS = ["alice", "bob"]


class GatedStore(Store):
    """A real store whose first blob write for ``client`` waits until ``proceed`` is set (and fails, when
    ``fail`` is set, as a full disk would); ``writes`` counts that client's blob writes."""

    def __init__(self, data: Path, client: str, fail: bool = False) -> None:
        super().__init__(data)
        self.client, self.fail = client, fail
        self.writing, self.proceed = threading.Event(), threading.Event()
        self.writes = 0

    def write_update(self, round_: int, client: str, body: bytes, restored: bytes | None = None) -> str:
        if client == self.client:
            self.writes += 1
            if self.writes == 1:
                self.writing.set()
                assert self.proceed.wait(10)
                if self.fail:
                    raise OSError(28, "No space left on device")
        return super().write_update(round_, client, body, restored)


class Outcome:
    """An update submitted on its own thread: its receipt or its refusal."""

    def __init__(self, call: Callable[[], object]) -> None:
        self.result: object = None
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, args=(call,), daemon=True)
        self.thread.start()

    def _run(self, call: Callable[[], object]) -> None:
        try:
            self.result = call()
        except BaseException as exc:  # handed to the test thread
            self.error = exc

    def join(self) -> Outcome:
        self.thread.join(10)
        assert not self.thread.is_alive()
        return self


def code_of(outcome: Outcome) -> str:
    """The refusal's code; the test fails if the call was not refused."""
    assert isinstance(outcome.error, Rejected), outcome.error
    return outcome.error.code


def federation(store: Store, **settings: object) -> Federation:
    fed = Federation(
        store,
        FederationSettings(federation="test", task="toy", rounds=3, **settings),  # type: ignore[arg-type]
        registered_clients=lambda: CLIENTS,
        initial_model=encode(toy_model(0.0)),
    )
    fed.tick()
    return fed


def blobs(store: Store, round_: int, client: str) -> list[Path]:
    """The client's update files in the round, recorded or not (each upload names its own)."""
    return sorted((store.dir / "updates" / str(round_)).glob(f"{client}.*"))


@pytest.mark.parametrize("first_fails", [False, True])
def test_two_uploads_from_one_client_at_once_store_exactly_one(tmp_path: Path, first_fails: bool) -> None:
    store = GatedStore(tmp_path, "alice", fail=first_fails)
    fed = federation(store)
    first_body, second_body = update_body(1.0), update_body(2.0)
    first = Outcome(lambda: submit(fed, 1, "alice", first_body))
    assert store.writing.wait(10)
    second = Outcome(lambda: submit(fed, 1, "alice", second_body))
    second.thread.join(0.3)
    assert second.thread.is_alive(), "the second upload waits for the first: it may yet fail"
    assert store.writes == 1, "nobody writes into a slot that is being written"
    store.proceed.set()
    first.join(), second.join()
    if first_fails:  # the disk refused the first: the second, not a duplicate after all, is taken
        assert isinstance(first.error, OSError)
        assert second.error is None
        kept = second_body
    else:
        assert first.error is None
        assert code_of(second) == "duplicate_update"
        kept = first_body
    assert [u.client for u in store.updates(1)] == ["alice"]
    assert [path.read_bytes() for path in blobs(store, 1, "alice")] == [kept], "the refused one's is gone"


def test_an_update_written_while_its_round_closes_is_refused_and_leaves_no_trace(tmp_path: Path) -> None:
    store = GatedStore(tmp_path, "alice")
    fed = federation(store, min_updates=1)
    late = Outcome(lambda: submit(fed, 1, "alice", update_body(9.0)))
    assert store.writing.wait(10)
    submit(fed, 1, "bob", update_body(2.0))
    fed.tick(now=fed.round_info().deadline)  # the deadline passes: round 1 closes with bob's update
    assert fed.round_info().round == 2
    store.proceed.set()
    late.join()
    assert code_of(late) == "round_closed"
    assert [u.client for u in store.updates(1)] == ["bob"]
    assert blobs(store, 1, "alice") == [], "an orphaned blob is removed, never counted"
    assert not list((store.dir / "updates" / "1").glob("*.tmp"))
    for name, tensor in toy_model(2.0).items():  # the new model is bob's update alone
        np.testing.assert_array_equal(fed.model.tensors[name], tensor)
    assert [h.reported for h in fed.history()] == [["bob"], []]  # nothing leaked into round 2


def test_an_asynchronous_update_overtaken_by_a_new_version_joins_the_next_one(tmp_path: Path) -> None:
    store = GatedStore(tmp_path, "alice")
    fed = federation(store, buffer=1)
    overtaken = Outcome(lambda: submit(fed, 1, "alice", update_body(4.0)))
    assert store.writing.wait(10)
    submit(fed, 1, "bob", update_body(2.0))  # version 1 is bob's; version 2 opens
    store.proceed.set()
    receipt = overtaken.join().result
    assert overtaken.error is None
    assert (receipt.round, receipt.staleness) == (2, 1)  # type: ignore[attr-defined]
    assert store.writes == 2, "written again for the version it joins"
    assert blobs(store, 1, "alice") == []
    assert [u.client for u in store.updates(2)] == ["alice"]


def test_a_skip_sent_while_the_update_is_written_is_answered_as_a_second_report(tmp_path: Path) -> None:
    store = GatedStore(tmp_path, "alice")
    fed = federation(store)
    update = Outcome(lambda: submit(fed, 1, "alice", update_body(1.0)))
    assert store.writing.wait(10)
    skip = Outcome(lambda: fed.skip(1, "alice", "out of memory"))
    skip.thread.join(0.3)
    assert skip.thread.is_alive(), "the skip waits for the update being written"
    store.proceed.set()
    update.join(), skip.join()
    assert update.error is None
    assert code_of(skip) == "duplicate_update"
    assert fed.open_skips() == {}


def test_a_server_killed_amid_concurrent_uploads_keeps_every_acknowledged_one_whole(
    start_server, connect, tmp_path: Path
) -> None:
    data = tmp_path / "killed"
    server = start_server("--rounds", "1", data=data)
    clients = {name: connect(server, name) for name in ("alice", "bob", "carol")}
    bodies = {name: update_body(float(i + 1), 10) for i, name in enumerate(clients)}
    first_ack = threading.Lock()
    acknowledged: dict[str, str] = {}

    def upload(name: str) -> None:
        receipt = clients[name].post_update(1, bodies[name])
        acknowledged[name] = receipt.sha256
        if first_ack.acquire(blocking=False):
            server.process.kill()  # at the first 202, while the others may be mid-write

    for api in clients.values():
        api.current_round()  # connected before the race starts
    uploads = [Outcome(lambda name=name: upload(name)) for name in clients]
    for outcome in uploads:
        outcome.join()
    server.process.wait()
    assert acknowledged, "at least the first upload was acknowledged before the kill"

    store = Store(data)
    recorded = {u.client: u for u in store.updates(1)}
    store.close()
    assert acknowledged.items() <= {name: u.sha256 for name, u in recorded.items()}.items()
    for name, update in recorded.items():  # every recorded update is whole on disk, as its client sent it
        assert sha256(update.path.read_bytes()) == update.sha256 == sha256(bodies[name])

    server = start_server("--rounds", "1", data=data)
    for name in clients.keys() - acknowledged.keys():  # they send again, as after a lost answer
        if name in recorded:  # recorded before the kill, its answer lost with the connection
            with pytest.raises(ServerError, match="duplicate_update"):
                connect(server, name).post_update(1, bodies[name])
        else:
            assert connect(server, name).post_update(1, bodies[name]).client == name
    final = connect(server, "alice").current_round()
    assert (final.round, final.state) == (1, RoundState.FINISHED)
