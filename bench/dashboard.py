"""The live dashboard's cost to the server and its delay: what watching a federation takes.

A real server (its own process, a toy task) with N clients; the dashboard (``server.dashboard``: the admin
overview fetched once a second, the round long-polled) and one page's event stream run in this process.

- Delay: rounds closed by the clients' last update; from the server's ``closed_at`` for the round to the
  event that carries it reaching the page's stream (both clocks are this machine's).
- CPU: the server process's CPU seconds over a window with the dashboard attached, against the same window
  with nothing attached (the idle server: its round clock ticks every 0.25 s), in interleaved pairs.
"""

from __future__ import annotations

import json
import socket
import statistics
import tempfile
import threading
import time
from pathlib import Path

import httpx
import numpy as np
import psutil

from bench import loopback_pki
from fedge.codec import encode
from fedge.security import pki
from fedge.server.dashboard import Watch, serving
from fedge.server.launcher import launch
from fedge.transport import FedgeClient
from fedge.wire import RoundState


def run(quick: bool) -> dict:
    clients, rounds, window, pairs = (5, 3, 3.0, 1) if quick else (50, 10, 20.0, 3)
    with tempfile.TemporaryDirectory(prefix="fedge-bench-") as tmp:
        work = Path(tmp)
        ids = [f"client-{i:03d}" for i in range(clients)]
        creds = loopback_pki.make(work / "pki", ids)
        admin = pki.issue(work / "pki", pki.Role.ADMIN, "ops")
        (work / "model.safetensors").write_bytes(encode(_model(0.0)))
        server = launch(
            ["--pki", str(work / "pki"), "--port", "0", "--task", "toy", "--rounds", str(rounds + 1),
             "--init-model", str(work / "model.safetensors"), "--presence-window", "0",
             "--min-clients", str(clients), "--min-updates", str(clients), "--round-timeout", "600"],
            work / "server", work / "server.log",
        )  # fmt: skip
        try:
            apis = [FedgeClient(server.url, c, timeout=60) for c in creds]
            delays = _delays(server.url, admin, apis, rounds, settle=0.3 if quick else 1.5)
            cpu = _cpu(server.url, admin, psutil.Process(server.process.pid), window, pairs)
            for api in apis:
                api.close()
        finally:
            server.stop()
    return {
        "clients": clients,
        "rounds": rounds,
        "window_s": window,
        "pairs": pairs,
        "delay_s": delays,
        **cpu,
    }


def _model(value: float) -> dict[str, np.ndarray]:
    return {
        "layer.weight": np.full((4, 3), value, dtype=np.float32),
        "layer.bias": np.full((3,), value, dtype=np.float32),
    }


def _delays(
    url: str, admin: pki.Credentials, apis: list[FedgeClient], rounds: int, settle: float
) -> list[float]:
    """Per round: the page's event stream hearing of the round closed, less the server's ``closed_at``;
    each round waits ``settle`` seconds open first, as a real one would while its clients train."""
    heard: dict[int, float] = {}
    closed: dict[int, float] = {}
    watch = Watch(url, admin, refresh=1.0)
    watch.check()
    with serving(watch, _free_port()) as page:
        listening = threading.Event()

        def listen() -> None:
            with httpx.stream("GET", f"{page}api/events", timeout=60) as events:
                listening.set()
                for line in events.iter_lines():
                    if not line.startswith("data: "):
                        continue
                    now = time.time()
                    for r in json.loads(line.removeprefix("data: "))["rounds"]:
                        if r["state"] == "done" and r["round"] not in heard:
                            heard[r["round"]], closed[r["round"]] = now, r["closed_at"]
                    if len(heard) >= rounds:
                        return

        listener = threading.Thread(target=listen, daemon=True)
        listener.start()
        listening.wait(30)
        body = encode(_model(1.0), {"num_examples": "10"})
        info = apis[0].current_round()
        for _ in range(rounds):
            while info.state is not RoundState.OPEN:
                info = apis[0].current_round(wait=10, etag=info.etag)
            time.sleep(settle)
            for api in apis:
                api.post_update(info.round, body)
            info = apis[0].current_round(wait=10, etag=info.etag)
        listener.join(60)
    return [round(heard[r] - closed[r], 4) for r in sorted(heard)]


def _cpu(url: str, admin: pki.Credentials, process: psutil.Process, window: float, pairs: int) -> dict:
    """Interleaved pairs of windows: the idle server, then the server with the dashboard and a page open."""
    idle, watched = [], []
    for _ in range(pairs):
        idle.append(_cpu_seconds(process, window) / window)
        watch = Watch(url, admin, refresh=1.0)
        watch.check()
        with serving(watch, _free_port()) as page:
            stop = threading.Event()

            def read(page: str = page, stop: threading.Event = stop) -> None:
                with httpx.stream("GET", f"{page}api/events", timeout=60) as events:
                    for _ in events.iter_lines():
                        if stop.is_set():
                            return

            reader = threading.Thread(target=read, daemon=True)
            reader.start()
            time.sleep(1.0)
            watched.append(_cpu_seconds(process, window) / window)
            stop.set()
            reader.join(5)
    extra = [(w - i) * 100 for w, i in zip(watched, idle, strict=True)]
    return {
        "idle_core_percent": [round(i * 100, 3) for i in idle],
        "watched_core_percent": [round(w * 100, 3) for w in watched],
        "dashboard_core_percent": [round(e, 3) for e in extra],
    }


def _cpu_seconds(process: psutil.Process, window: float) -> float:
    before = process.cpu_times()
    time.sleep(window)
    after = process.cpu_times()
    return (after.user + after.system) - (before.user + before.system)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def render(result: dict) -> str:
    delays = result["delay_s"]
    extra = result["dashboard_core_percent"]
    return (
        f"A server with {result['clients']} clients; the dashboard refreshes once a second and long-polls "
        f"the round; one page holds its event stream.\n\n"
        "| figure | min | median | max | goal |\n|---|---|---|---|---|\n"
        f"| round closed on the server → the page's event ({len(delays)} rounds) "
        f"| {min(delays) * 1000:.0f} ms | {statistics.median(delays) * 1000:.0f} ms "
        f"| {max(delays) * 1000:.0f} ms | < 1 s |\n"
        f"| server CPU for the dashboard, % of a core ({result['pairs']} pairs of {result['window_s']:.0f} s "
        f"windows, watched - idle) | {min(extra):.2f} | {statistics.median(extra):.2f} | {max(extra):.2f} "
        "| < 1 |\n"
        f"\nThe idle server itself used {statistics.median(result['idle_core_percent']):.2f} % of a core "
        "(median) in the same run.\n"
    )
