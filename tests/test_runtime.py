"""The warm runtime: cold and warm invocations, pre-warming, keep-alive, and workers that crash or hang."""

from __future__ import annotations

import os
import signal
from pathlib import Path

import psutil
import pytest
from conftest import wait_for

from fedge.codec import decode
from fedge.edge_functions.runtime import WarmPool, WorkerFailed
from fedge.security import pki

INITIAL = {"task": "digits", "seed": 0}


def train_event(server: str, pki_dir: Path) -> dict:
    creds = pki.credentials(pki_dir, pki.Role.CLIENT, "alice")
    return {
        "server": server,
        "credentials": {"ca": str(creds.ca), "cert": str(creds.cert), "key": str(creds.key)},
        "task": "digits",
        "round": 1,
        "config": {},
        "data": {"num_clients": 2, "index": 0},
    }


def alive(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def test_the_first_invocation_pays_the_start_up_and_the_next_one_is_warm() -> None:
    pool = WarmPool(1)
    try:
        first = pool.invoke("initial_model", INITIAL).result()
        second = pool.invoke("initial_model", INITIAL).result()
    finally:
        pool.close()
    assert first.cold
    assert first.startup_seconds > 0
    assert not second.cold
    assert second.startup_seconds == 0
    assert second.pid == first.pid
    assert decode(second.result)[0].keys() == decode(first.result)[0].keys()


def test_a_pre_warmed_pool_serves_its_first_invocation_warm() -> None:
    pool = WarmPool(1)
    try:
        pool.warm()
        invocation = pool.invoke("initial_model", INITIAL).result()
    finally:
        pool.close()
    assert not invocation.cold


def test_an_idle_worker_retires_after_its_keep_alive_and_the_next_invocation_is_cold() -> None:
    pool = WarmPool(1, keep_alive=1.0)
    try:
        first = pool.invoke("initial_model", INITIAL).result()
        wait_for(lambda: pool.live_workers() == 0, 30, "the idle worker to retire")
        wait_for(lambda: not alive(first.pid), 30, "the retired worker to exit")
        again = pool.invoke("initial_model", INITIAL).result()
    finally:
        pool.close()
    assert again.cold
    assert again.pid != first.pid


def test_a_worker_hung_past_the_deadline_is_replaced_and_the_invocation_fails(
    silent_server: str, pki_dir: Path
) -> None:
    pool = WarmPool(1)
    try:
        pool.warm()
        hung = pool.invoke("train", train_event(silent_server, pki_dir), timeout=3)
        with pytest.raises(WorkerFailed, match="hung"):
            hung.result()
        assert pool.live_workers() == 0
        after = pool.invoke("initial_model", INITIAL).result()
    finally:
        pool.close()
    assert after.cold


def test_a_worker_that_crashes_is_replaced_and_the_invocation_fails(
    silent_server: str, pki_dir: Path
) -> None:
    pool = WarmPool(1)
    try:
        pool.warm()
        (worker,) = [c for c in psutil.Process().children() if "spawn_main" in " ".join(c.cmdline())]
        running = pool.invoke("train", train_event(silent_server, pki_dir))
        wait_for(lambda: any(c.status == "ESTABLISHED" for c in worker.net_connections()), 30, "the call")
        os.kill(worker.pid, signal.SIGKILL)
        with pytest.raises(WorkerFailed, match="crashed"):
            running.result()
        after = pool.invoke("initial_model", INITIAL).result()
    finally:
        pool.close()
    assert after.pid != worker.pid


def test_a_warm_instance_keeps_one_connection_per_party_until_its_certificate_changes(pki_dir: Path) -> None:
    from fedge.edge_functions.functions import Context

    context = Context()
    alice = pki.credentials(pki_dir, pki.Role.CLIENT, "alice")
    first = context.api("https://127.0.0.1:1", alice)
    assert context.api("https://127.0.0.1:1", alice) is first
    assert context.api("https://127.0.0.1:1", pki.credentials(pki_dir, pki.Role.CLIENT, "bob")) is not first
    stat = alice.cert.stat()
    os.utime(alice.cert, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000))
    assert context.api("https://127.0.0.1:1", alice) is not first
