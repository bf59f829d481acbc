"""Ingestion: N clients upload signed updates of a 1 M-parameter model at once, over mutual TLS, to the
aggregation service in its own process. Every update is fsynced before its 202.

Reported: updates per second from the first request to the last 202, the latency of each upload (p50,
p99), and whether any acknowledged update was lost (the store must hold exactly N, and the round must close
with all of them). The baseline, in the same run and on the same disk: the same N bodies written and
fsynced one after another by a plain loop, the durability floor no server can beat.
"""

from __future__ import annotations

import os
import sqlite3
import statistics
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

FULL = {"clients": 200, "params": 1_000_000}
QUICK = {"clients": 4, "params": 10_000}


def run(quick: bool) -> dict:
    from fedge.codec import encode
    from fedge.security import pki
    from fedge.server.launcher import launch
    from fedge.transport import FedgeClient
    from fedge.wire import RoundState

    size = QUICK if quick else FULL
    n, params = size["clients"], size["params"]
    with tempfile.TemporaryDirectory(prefix="fedge-ingest-") as tmp:
        work = Path(tmp)
        pki.init_ca(work / "pki", "bench")
        pki.issue(work / "pki", pki.Role.SERVER, "server", hosts=("127.0.0.1",))
        ids = [f"device-{i:04d}" for i in range(n)]
        for client in ids:
            pki.issue(work / "pki", pki.Role.CLIENT, client)
        (work / "initial.safetensors").write_bytes(encode({"w": np.zeros(params, np.float32)}))
        bodies = [encode({"w": np.full(params, i, np.float32)}, {"num_examples": "1"}) for i in range(n)]
        floor = _fsync_floor(bodies, work / "floor")

        server = launch(
            ["--pki", str(work / "pki"), "--port", "0", "--task", "bench", "--rounds", "1",
             "--init-model", str(work / "initial.safetensors"),
             "--presence-window", "0", "--min-clients", str(n),
             "--min-updates", str(n), "--round-timeout", "3600"],
            work / "server", work / "server.log",
        )  # fmt: skip
        try:
            apis = [FedgeClient(server.url, pki.credentials(work / "pki", pki.Role.CLIENT, c)) for c in ids]
            info = apis[0].current_round()
            while info.state is not RoundState.OPEN:
                info = apis[0].current_round(wait=5, etag=info.etag)
            for api in apis:  # TLS handshakes first: this measures uploads, not connection set-up
                api.model_meta()

            def upload(i: int) -> float:
                started = time.perf_counter()
                apis[i].post_update(info.round, bodies[i])
                return time.perf_counter() - started

            started = time.perf_counter()
            with ThreadPoolExecutor(n) as pool:
                latencies = sorted(pool.map(upload, range(n)))
            seconds = time.perf_counter() - started
            closed = apis[0].current_round(wait=30, etag=info.etag)
            for api in apis:
                api.close()
        finally:
            server.stop()
        with sqlite3.connect(work / "server" / "state.db") as db:
            stored = db.execute("SELECT COUNT(*) FROM updates").fetchone()[0]
    return {
        "clients": n,
        "params": params,
        "body_mb": round(len(bodies[0]) / 1e6, 2),
        "updates_per_s": round(n / seconds, 1),
        "p50_ms": round(1000 * statistics.median(latencies), 1),
        "p99_ms": round(1000 * latencies[min(n - 1, int(0.99 * n))], 1),
        "lost": n - stored,
        "round_closed": closed.state is not RoundState.OPEN or closed.round > info.round,
        "fsync_floor_updates_per_s": round(n / floor, 1),
    }


def _fsync_floor(bodies: list[bytes], directory: Path) -> float:
    directory.mkdir()
    started = time.perf_counter()
    for i, body in enumerate(bodies):
        with open(directory / f"{i}.safetensors", "wb") as f:
            f.write(body)
            f.flush()
            os.fsync(f.fileno())
    return time.perf_counter() - started


def render(result: dict) -> str:
    ratio = result["updates_per_s"] / result["fsync_floor_updates_per_s"]
    return "\n".join(
        [
            f"{result['clients']} clients upload at once one signed update each ({result['params']:,} "
            f"parameters, {result['body_mb']} MB) over mutual TLS; each is fsynced before its 202. The floor",
            "is the same bodies written and fsynced by a plain loop on the same disk.",
            "",
            "| updates/s | p50 (ms) | p99 (ms) | lost | round closed | fsync floor (updates/s) "
            "| fedge / floor |",
            "|---:|---:|---:|---:|---|---:|---:|",
            f"| {result['updates_per_s']} | {result['p50_ms']:.0f} | {result['p99_ms']:.0f} "
            f"| {result['lost']} | {'yes' if result['round_closed'] else 'no'} "
            f"| {result['fsync_floor_updates_per_s']} | {ratio:.2f}x |",
        ]
    )
