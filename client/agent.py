"""The edge agent: a long-lived process that trains for the federation whenever a round is announced.

It hears rounds on MQTT (the retained announcement also brings a round it missed while offline) or, when
the broker cannot be reached, by long-polling the server. Each round runs the stateless ``train`` function
in a warm worker, which leaves the trained update in ``<state>/outbox`` before the agent sends it: an
update, once trained, survives a crash, a SIGTERM or a lost network and is sent on the next start. The
server refuses a second update for the same round (``duplicate_update``), so resending never doubles it.
"""

from __future__ import annotations

import json
import logging
import queue
import threading
import time
from dataclasses import dataclass
from enum import Enum
from pathlib import Path

import httpx
import numpy as np
import paho.mqtt.client as paho

from fedge import mqtt
from fedge.client import capacity, status
from fedge.client.offload import calibrate_executor, offload_round, shard_bytes
from fedge.client.placement import Kind, OffloadSetting, Placement
from fedge.client.placer import ExecutorTarget, Placer
from fedge.client.predictor import Run
from fedge.client.status import AgentState, AgentStatus, LastInvocation, Transport
from fedge.edge_functions.runtime import WarmPool
from fedge.files import write_file
from fedge.security.broker import username
from fedge.security.offload import OffloadError
from fedge.security.pki import Credentials, Identity, Role
from fedge.security.tls import client_context
from fedge.transport import FedgeClient, ServerError
from fedge.wire import RoundInfo, RoundState

MQTT_GRACE_SECONDS = 5.0
RETRY_SECONDS = 5.0
CHECK_SECONDS = 60.0
CALIBRATE_SECONDS = 60.0


class Step(Enum):
    IGNORE = "ignore"
    SKIP = "skip"
    TRAIN = "train"


def plan(info: RoundInfo, me: str, done_round: int, now: float) -> tuple[Step, str]:
    """What to do about an announcement, and why: a pure function of the round and what is done."""
    if info.state is not RoundState.OPEN or info.round <= done_round:
        return Step.IGNORE, f"round {info.round} is {info.state}"
    if me not in info.selected:
        return Step.SKIP, f"not selected for round {info.round}"
    if info.deadline is not None and now >= info.deadline:
        return Step.SKIP, f"round {info.round} is past its deadline"
    return Step.TRAIN, f"training round {info.round}"


@dataclass(frozen=True)
class AgentConfig:
    state_dir: Path
    data: Path
    server: str
    broker: mqtt.BrokerAddress | None
    creds: Credentials
    identity: Identity
    keep_alive: float = 300.0
    poll_wait: float = 10.0
    offload: OffloadSetting = OffloadSetting.NEVER
    executors: tuple[ExecutorTarget, ...] = ()
    train_memory: int = 0  # bytes a training run needs on the device; less free: it cannot train here


class Agent:
    def __init__(self, config: AgentConfig) -> None:
        self.config = config
        self.pool = WarmPool(1, keep_alive=config.keep_alive)
        self.placer = Placer(config.offload, config.executors, config.train_memory)
        self._outbox = config.state_dir / "outbox"
        self._announcements: queue.Queue[RoundInfo] = queue.Queue()
        self._stop = threading.Event()
        self._connected = threading.Event()
        self._etag: str | None = None
        self._checked = time.monotonic()
        self._mqtt: paho.Client | None = None
        self._status_lock = threading.Lock()
        self._status = AgentStatus(
            client=config.identity.id, state=AgentState.IDLE, transport=self._transport()
        )

    def stop(self) -> None:
        """Ask the agent to stop after the step in flight: a training run finishes and its update is kept."""
        self._stop.set()

    def run(self) -> None:
        self.config.state_dir.mkdir(parents=True, exist_ok=True)
        if self.config.broker is not None:
            self._mqtt = mqtt.client(
                self.config.broker,
                self.config.creds,
                username(Role.CLIENT, self.config.identity.id),
                self._on_connect,
                lambda _: self._connected.clear(),
                self._on_message,
                self._on_subscribe,
            )
            self._connected.wait(MQTT_GRACE_SECONDS)
        self._report(AgentState.IDLE, detail="started")
        try:
            with FedgeClient(self.config.server, self.config.creds) as api:
                self._send_outbox(api)
                while not self._stop.is_set():
                    info = self._next_announcement(api)
                    if info is not None:
                        self._handle(api, info)
                    if any(self._outbox.glob("round-*.safetensors")) and not self._stop.is_set():
                        self._send_outbox(api)
        finally:
            self.pool.close()
            self._report(AgentState.STOPPED, detail="stopped")
            if self._mqtt is not None:
                self._mqtt.disconnect()
                self._mqtt.loop_stop()

    def _topic(self) -> str:
        return mqtt.rounds_topic(self.config.identity.federation)

    def _on_connect(self, client: paho.Client) -> None:
        client.subscribe(self._topic(), qos=1)

    def _on_subscribe(self, _client: paho.Client, reasons: list[paho.ReasonCode]) -> None:
        """Only a subscription the broker granted counts as reachable: else the agent long-polls."""
        if any(reason.is_failure for reason in reasons):
            self._connected.clear()
            self._report(AgentState.ERROR, detail=f"the broker refused {self._topic()}: is its ACL current?")
            return
        self._connected.set()
        self._report(self._status.state, self._status.round, self._status.detail)

    def _on_message(self, _client: paho.Client, _userdata: object, message: paho.MQTTMessage) -> None:
        try:
            self._announcements.put(RoundInfo.model_validate_json(message.payload))
        except ValueError:
            self._report(AgentState.ERROR, detail=f"ignored a malformed announcement on {message.topic}")

    def _next_announcement(self, api: FedgeClient) -> RoundInfo | None:
        """From MQTT while the broker is reachable, else by long-polling the server. Even with MQTT, the
        server is asked now and then, so that an announcement the broker never delivered is not missed."""
        if self._connected.is_set() or not self._announcements.empty():
            try:
                return self._announcements.get(timeout=1.0)
            except queue.Empty:
                if time.monotonic() - self._checked < CHECK_SECONDS:
                    return None
                return self._poll(api, wait=None)
        if self._status.transport is not Transport.LONG_POLL:
            self._report(self._status.state, self._status.round, self._status.detail)
        return self._poll(api, self.config.poll_wait if self._etag else None)

    def _poll(self, api: FedgeClient, wait: float | None) -> RoundInfo | None:
        self._checked = time.monotonic()
        try:
            info = api.current_round(wait=wait, etag=self._etag)
        except (httpx.TransportError, ServerError) as exc:
            self._report(AgentState.ERROR, detail=f"server unreachable: {exc}")
            self._stop.wait(RETRY_SECONDS)
            return None
        return None if info.etag == self._etag else info

    def _handle(self, api: FedgeClient, info: RoundInfo) -> None:
        self._etag = info.etag
        step, why = plan(info, self.config.identity.id, self._done_round(), time.time())
        if step is Step.IGNORE:
            # A skip stays shown with its reason until the next round (its notice may close this one at once).
            settled = self._status.state in (AgentState.IDLE, AgentState.SKIPPED)
            if not settled or self._status.round != info.round:
                self._report(AgentState.IDLE, info.round, why)
            return
        if step is Step.SKIP:
            self._finish(info.round, AgentState.SKIPPED, why)
            return
        self.pool.warm(wait=False)
        with np.load(self.config.data, allow_pickle=False) as arrays:
            examples = len(arrays["y"])
        if self.config.offload is not OffloadSetting.NEVER and not self.placer.predictor.knows(
            "edge", info.task
        ):
            self._calibrate(info)
        placement = self.placer.decide(info, examples, time.time(), capacity.probe().free_memory)
        self._count(placement)
        if placement.prewarm and placement.kind is not Kind.OFFLOAD:
            threading.Thread(target=self._prewarm, daemon=True).start()
        if placement.kind is Kind.SKIP:
            self._skip(api, info.round, placement.reason, f"round {info.round}: {placement.reason}")
        elif placement.kind is Kind.OFFLOAD:
            self._offload(api, info, placement)
        else:
            self._train(api, info, placement)

    def _skip(self, api: FedgeClient, round_: int, reason: str, detail: str) -> None:
        """Tell the server this round gets no update from here, so it need not wait for the deadline."""
        try:  # best effort: without the notice the round merely waits for its deadline
            api.skip(round_, reason)
            told = "the server was told"
        except (httpx.HTTPError, ServerError) as exc:
            told = f"the skip notice failed: {exc}"
        self._finish(round_, AgentState.SKIPPED, f"{detail}; {told}")

    def _count(self, placement: Placement) -> None:
        where = f"offload:{placement.target}" if placement.offloaded else str(placement.kind)
        counts = {**self._status.placements, where: self._status.placements.get(where, 0) + 1}
        self._status = self._status.model_copy(update={"placements": counts})

    def _calibrate(self, info: RoundInfo) -> None:
        """Two short timed runs here and on each executor the owner allows, before the first decision that
        could send data away, so it rests on lines measured rather than on optimism (an executor that cannot
        be reached stays unknown, and is tried). Without offload the first round itself is the measurement."""
        log = logging.getLogger("fedge.placement")
        data = self._shard()
        self.placer.shard_bytes = shard_bytes(data)
        event = {
            "task": info.task,
            "config": info.config.model_dump(),
            "data": {"path": str(self.config.data)},
        }
        try:
            small, large = self.pool.invoke("calibrate", event, CALIBRATE_SECONDS).result().result["points"]
            self.placer.calibrated("edge", info.task, tuple(small), tuple(large))
        except Exception as exc:  # a device too slow even for this: the first round decides without a line
            log.warning("calibration failed: %s", exc)
        for target in self.config.executors:
            executor = (target.id, target.url)
            try:
                small, large = calibrate_executor(
                    self.config.creds, executor, info.task, info.config, data, CALIBRATE_SECONDS
                )
            except (httpx.HTTPError, ServerError, OffloadError) as exc:
                log.warning("%s calibration failed (it stays unknown, so it is tried): %s", target.id, exc)
                continue
            self.placer.calibrated(target.id, info.task, small, large)

    def _shard(self) -> tuple[np.ndarray, np.ndarray]:
        """The device's examples as an offload sends them."""
        with np.load(self.config.data, allow_pickle=False) as arrays:
            return arrays["x"].astype(np.float32), arrays["y"].astype(np.int64)

    def _prewarm(self) -> None:
        """Offload looks likely next round: wake the executors now, so a cold start is not on its clock."""
        for target in self.config.executors:
            try:
                with httpx.Client(verify=client_context(self.config.creds), timeout=30) as http:
                    http.get(f"{target.url}/healthz")
            except httpx.HTTPError:
                pass  # a sleeping executor is the placement's problem next round, not this one's

    def _offload(self, api: FedgeClient, info: RoundInfo, placement: Placement) -> None:
        """Have the chosen executor train the round; only ever reached when the owner allowed offload."""
        self._report(AgentState.TRAINING, info.round, f"round {info.round} offloaded to {placement.target}")
        (target,) = (e for e in self.config.executors if e.id == placement.target)
        data = self._shard()
        left = info.deadline - time.time() if info.deadline is not None else 600.0
        timeout = max(1.0, min(left, placement.wait_s))
        try:
            done = offload_round(
                api, self.config.creds, (target.id, target.url), info.task, info.round, info.config, data,
                placement.weight, timeout,
            )  # fmt: skip
        except (httpx.HTTPError, ServerError, OffloadError) as exc:
            self._fall_back(api, info, placement, len(data[1]), exc)
            return
        self.placer.observe(target.id, info.task, done.run(placement.steps))
        self.placer.shard_bytes = done.job_bytes
        sent = self._status.raw_bytes_offloaded + done.raw_bytes
        self._status = self._status.model_copy(update={"raw_bytes_offloaded": sent})
        self._finish(info.round, AgentState.IDLE, f"round {info.round} trained by executor {target.id}")

    def _fall_back(
        self, api: FedgeClient, info: RoundInfo, failed: Placement, examples: int, exc: Exception
    ) -> None:
        """The executor did not train the round (unreachable, refused, failed, too slow): the device does
        what it still can before the deadline, and the round is counted where it actually ran."""
        assert failed.target is not None  # an offload placement always names its executor
        free = capacity.probe().free_memory
        placement = self.placer.fallback(failed.target, info, examples, time.time(), free)
        why = f"round {info.round}: offload to {failed.target} failed ({exc}); device: {placement.reason}"
        counts = dict(self._status.placements)
        offloaded = f"offload:{failed.target}"
        counts[offloaded] -= 1
        if not counts[offloaded]:
            del counts[offloaded]
        counts[f"fallback:{placement.kind}"] = counts.get(f"fallback:{placement.kind}", 0) + 1
        self._status = self._status.model_copy(update={"placements": counts, "fallback": why})
        if placement.kind is Kind.SKIP:
            self._skip(api, info.round, f"offload failed, then {placement.reason}", why)
        else:
            self._train(api, info, placement)

    def _train(self, api: FedgeClient, info: RoundInfo, placement: Placement) -> None:
        self._report(AgentState.TRAINING, info.round, f"training round {info.round}")
        event = {
            "server": self.config.server,
            "credentials": {
                "ca": str(self.config.creds.ca),
                "cert": str(self.config.creds.cert),
                "key": str(self.config.creds.key),
            },
            "task": info.task,
            "round": info.round,
            "config": info.config.model_dump(),
            "data": {"path": str(self.config.data)},
            "outbox": str(self._outbox),
            "model_sha256": info.model_sha256,
            "max_steps": placement.steps if placement.kind is Kind.FEWER_STEPS else None,
            "weight": placement.weight,
        }
        timeout = max(1.0, info.deadline - time.time()) if info.deadline is not None else None
        try:
            invocation = self.pool.invoke("train", event, timeout).result()
        except (
            Exception
        ) as exc:  # WorkerFailed (crash, hang), the server's refusal, bad data: all fail the round
            self._finish(info.round, AgentState.ERROR, f"round {info.round} failed: {exc}")
            return
        self._status.last_invocation = LastInvocation(
            cold=invocation.cold, startup_seconds=invocation.startup_seconds, seconds=invocation.seconds
        )
        done = invocation.result
        compute = invocation.seconds - done["download_seconds"]
        bytes_up, upload_s = self._send_outbox(api).get(info.round, (0, 0.0))
        run = Run(
            placement.steps, compute, invocation.startup_seconds,
            done["bytes_down"], done["download_seconds"], bytes_up, upload_s,
        )  # fmt: skip
        self.placer.observe("edge", info.task, run)

    def _send_outbox(self, api: FedgeClient) -> dict[int, tuple[int, float]]:
        """Send every kept update; one the server already holds, or can no longer take, is dropped. Returns
        (bytes, seconds) of each upload the server took, by round: the uplink the predictor learns."""
        sent: dict[int, tuple[int, float]] = {}
        for path in sorted(self._outbox.glob("round-*.safetensors")):
            round_ = int(path.stem.removeprefix("round-"))
            self._report(AgentState.UPLOADING, round_, f"sending the update of round {round_}")
            body = path.read_bytes()
            try:
                started = time.perf_counter()
                api.post_update(round_, body)
                sent[round_] = (len(body), time.perf_counter() - started)
                outcome, detail = AgentState.IDLE, f"sent the update of round {round_}"
            except ServerError as exc:
                if exc.code == "duplicate_update":
                    outcome, detail = (
                        AgentState.IDLE,
                        f"the server already holds the update of round {round_}",
                    )
                else:
                    outcome, detail = (
                        AgentState.ERROR,
                        f"round {round_}: the server refused the update: {exc}",
                    )
            except httpx.TransportError as exc:
                self._report(
                    AgentState.ERROR, round_, f"server unreachable, update of round {round_} kept: {exc}"
                )
                self._stop.wait(RETRY_SECONDS)
                return sent
            path.unlink()
            self._finish(round_, outcome, detail)
        return sent

    def _done_round(self) -> int:
        path = self.config.state_dir / "rounds.json"
        return json.loads(path.read_text())["done"] if path.exists() else 0

    def _finish(self, round_: int, state: AgentState, detail: str) -> None:
        """Mark the round as dealt with, so a repeated announcement of it is ignored."""
        done = max(round_, self._done_round())
        write_file(self.config.state_dir / "rounds.json", json.dumps({"done": done}).encode())
        self._report(state, round_, detail)

    def _transport(self) -> Transport:
        return Transport.MQTT if self._connected.is_set() else Transport.LONG_POLL

    def _report(self, state: AgentState, round_: int | None = None, detail: str = "") -> None:
        with self._status_lock:
            self._publish(state, round_, detail)

    def _publish(self, state: AgentState, round_: int | None, detail: str) -> None:
        self._status = self._status.model_copy(
            update={
                "state": state,
                "round": round_,
                "detail": detail,
                "transport": self._transport(),
                "updated": time.time(),
            }
        )
        status.write(self.config.state_dir, self._status)
        if self._mqtt is not None and self._connected.is_set():
            topic = mqtt.status_topic(self.config.identity.federation, self.config.identity.id)
            self._mqtt.publish(topic, self._status.model_dump_json(), qos=1, retain=True)
