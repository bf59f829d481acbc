"""Announcement-to-agent latency with N agents waiting for a round: MQTT against HTTP long-polling.

A real server (its own process, ``--mqtt``), a real mosquitto from ``fedge broker config``, N agents' MQTT
sessions (the agent's own recipe, each with its certificate) and N long polls of ``GET /v1/rounds/current``
(the fallback, measured as the baseline in the same run). The round opens when the last client the server
waits for gets its certificate; each latency runs from that moment to the agent holding the round, which is
when it starts training.
"""

from __future__ import annotations

import getpass
import statistics
import subprocess
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

from bench import loopback_pki
from fedge import mqtt
from fedge.codec import encode
from fedge.security import broker, pki
from fedge.server.launcher import launch
from fedge.transport import FedgeClient
from fedge.wire import RoundInfo, RoundState, rounds_topic


def _percentile(values: list[float], q: float) -> float:
    return float(np.percentile(np.array(values), q))


def run(quick: bool) -> dict:
    agents = 10 if quick else 100
    with tempfile.TemporaryDirectory(prefix="fedge-bench-") as tmp:
        work = Path(tmp)
        ids = [f"agent-{i:03d}" for i in range(agents)]
        creds = loopback_pki.make(work / "pki", ids)
        port = _free_port()
        files = broker.write_config(
            work / "pki", work / "broker", port, "127.0.0.1", run_as=getpass.getuser()
        )
        mosquitto = subprocess.Popen(
            ["mosquitto", "-c", str(files.conf)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
        (work / "model.safetensors").write_bytes(encode({"w": np.zeros((4, 3), dtype=np.float32)}))
        server = launch(
            ["--pki", str(work / "pki"), "--port", "0", "--task", "toy", "--rounds", "1",
             "--init-model", str(work / "model.safetensors"),
             "--presence-window", "0", "--min-clients", str(agents + 1),
             "--mqtt", f"127.0.0.1:{port}"],
            work / "server", work / "server.log",
        )  # fmt: skip
        try:
            result = _measure(server.url, port, ids, creds, work / "pki")
        finally:
            server.stop()
            mosquitto.terminate()
            mosquitto.wait()
    return {"agents": agents, **result}


def _measure(url: str, port: int, ids: list[str], creds: list[pki.Credentials], pki_dir: Path) -> dict:
    received: dict[str, float] = {}
    polled: dict[str, float] = {}
    subscribed = threading.Semaphore(0)
    lock = threading.Lock()
    sessions = []
    for id_, cred in zip(ids, creds, strict=True):

        def on_connect(client, id_=id_) -> None:
            client.subscribe(rounds_topic("bench"), qos=1)
            subscribed.release()

        def on_message(_c, _u, message, id_=id_) -> None:
            if RoundInfo.model_validate_json(message.payload).state is RoundState.OPEN:
                with lock:
                    received.setdefault(id_, time.perf_counter())

        session = mqtt.client(mqtt.BrokerAddress("127.0.0.1", port), cred, f"client:{id_}", on_connect)
        session.on_message = on_message
        sessions.append(session)
    for _ in ids:
        subscribed.acquire(timeout=120)

    def long_poll(id_: str, cred: pki.Credentials) -> None:
        with FedgeClient(url, cred, timeout=120) as api:
            info = api.current_round()
            while info.state is not RoundState.OPEN:
                info = api.current_round(wait=60, etag=info.etag)
            polled[id_] = time.perf_counter()

    pollers = [threading.Thread(target=long_poll, args=pair) for pair in zip(ids, creds, strict=True)]
    for poller in pollers:
        poller.start()
    time.sleep(3)  # every long poll is waiting, every session subscribed
    opened = time.perf_counter()
    pki.issue(pki_dir, pki.Role.CLIENT, "the-last-one")  # the server now has its quorum: round 1 opens
    for poller in pollers:
        poller.join(120)
    give_up = time.monotonic() + 60
    while len(received) < len(ids) and time.monotonic() < give_up:
        time.sleep(0.05)
    for session in sessions:
        session.disconnect()
        session.loop_stop()
    over_mqtt = [t - opened for t in received.values()]
    over_poll = [t - opened for t in polled.values()]
    return {
        "mqtt_received": len(over_mqtt),
        "poll_received": len(over_poll),
        "mqtt_median_s": statistics.median(over_mqtt),
        "mqtt_p99_s": _percentile(over_mqtt, 99),
        "poll_median_s": statistics.median(over_poll),
        "poll_p99_s": _percentile(over_poll, 99),
    }


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def render(result: dict) -> str:
    return (
        f"{result['agents']} agents wait for a round; the server opens it (its round clock ticks every "
        "0.25 s, which both paths include).\n\n"
        "| path | received | median | p99 |\n|---|---|---|---|\n"
        f"| MQTT announcement (retained, QoS 1) | {result['mqtt_received']} | "
        f"{result['mqtt_median_s'] * 1000:.0f} ms | {result['mqtt_p99_s'] * 1000:.0f} ms |\n"
        f"| long poll `GET /v1/rounds/current?wait=S` (baseline) | {result['poll_received']} | "
        f"{result['poll_median_s'] * 1000:.0f} ms | {result['poll_p99_s'] * 1000:.0f} ms |\n"
        f"\nMedian MQTT latency is **{result['mqtt_median_s'] / result['poll_median_s']:.2f}x** "
        "the long poll's.\n"
    )
