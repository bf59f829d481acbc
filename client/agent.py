"""The edge agent: a long-lived process that trains for the federation whenever a round is announced.

It hears rounds on MQTT (the retained announcement also brings a round it missed while offline) or, when
the broker cannot be reached, by long-polling the server. Each round runs the stateless ``train`` function
in a warm worker, which leaves the trained update in ``<state>/outbox`` before the agent sends it: an
update, once trained, survives a crash, a SIGTERM or a lost network and is sent on the next start. The
server refuses a second update for the same round (``duplicate_update``), so resending never doubles it,
and that answer means the update was delivered. A transient failure of any request of a round (the model's
download, the upload, a skip notice) is tried again with backoff until the round's deadline
(``client.retry``); only a refusal, the deadline or a stop ends the round early.
"""

from __future__ import annotations

import datetime as dt
import functools
import json
import logging
import math
import queue
import threading
import time
from concurrent.futures import Future
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path
from typing import TYPE_CHECKING

import httpx
import numpy as np
import paho.mqtt.client as paho

from fedge import mqtt
from fedge.client import capacity, retry, status
from fedge.client.planner import ExecutorTarget, Placer
from fedge.client.policy import EDGE, Kind, OffloadSetting, Placement
from fedge.client.round import Played, Retrying, play
from fedge.client.status import AgentState, AgentStatus, LastInvocation, Transport
from fedge.client.targets import Target, TargetFailed
from fedge.client.targets.device import DeviceTarget
from fedge.client.targets.executor import HttpsExecutor, shard_bytes
from fedge.edge_functions import datafiles
from fedge.edge_functions.app import AppFailed
from fedge.edge_functions.datafiles import DataError
from fedge.edge_functions.events import (
    AppData,
    CalibrateEvent,
    CheckDataEvent,
    CheckDataResult,
    CredentialPaths,
    EvaluateEvent,
    EvaluateResult,
    LocalData,
    Scalar,
    TrainEvent,
)
from fedge.edge_functions.runtime import Invocation, WarmPool
from fedge.files import write_file
from fedge.pricing import EXAMPLE_PRICES, Prices
from fedge.security.broker import username
from fedge.security.pki import Credentials, Identity, Role
from fedge.security.tls import client_context
from fedge.transport import FedgeClient, ServerError
from fedge.wire import RoundInfo, RoundState, TrainConfig, rounds_topic, status_topic

if TYPE_CHECKING:
    from fedge.edge_functions.containers import ContainerSettings

rounds_log = logging.getLogger("fedge.agent")  # a line per step of a round, retries and failures, on stderr

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
    if info.seconds_left(now) <= 0:
        return Step.SKIP, f"round {info.round} is past its deadline"
    return Step.TRAIN, f"training round {info.round}"


@dataclass(frozen=True)
class AgentConfig:
    state_dir: Path
    data: Path | None  # None: the app loads its own (its load_data)
    server: str
    broker: mqtt.BrokerAddress | None
    creds: Credentials
    identity: Identity
    keep_alive: float = 300.0
    poll_wait: float = 10.0
    offload: OffloadSetting = OffloadSetting.NEVER
    executors: tuple[ExecutorTarget, ...] = ()
    train_memory: int = 0  # bytes a training run needs on the device; less free: it cannot train here
    prices: Prices = EXAMPLE_PRICES  # what each placement is predicted to cost (``--prices``)
    max_cost: float = math.inf  # the owner's budget per round (``--max-cost``)
    expires: dt.datetime | None = None  # when the client certificate stops being valid
    renew_at: dt.datetime | None = None  # when to renew the enrolled certificate (None: not the agent's job)
    app: str | None = None  # the owner's app (fedge.edge_functions.app); None: the round's task trains
    run_config: dict[str, Scalar] = field(default_factory=dict)  # the app's context.run_config
    label: str | None = None  # a CSV's label column
    eval_data: Path | None = None  # held-out examples for federated evaluation (None: ``data``)
    partition: tuple[int, int] = (0, 1)  # an app's partition-id of num-partitions (a Flower node_config)
    containers: ContainerSettings | None = None  # the function's instance in a container; None: a process


class Agent:
    def __init__(self, config: AgentConfig) -> None:
        self.config = config
        self.pool = self._pool()
        self.placer = Placer(
            config.offload, config.executors, config.train_memory, prices=config.prices,
            max_cost=config.max_cost,
        )  # fmt: skip
        self._outbox = config.state_dir / "outbox"
        self._announcements: queue.Queue[RoundInfo] = queue.Queue()
        self._stop = threading.Event()
        self._connected = threading.Event()
        self._etag: str | None = None
        self._checked = time.monotonic()
        self._counted = ""  # where this round's last attempt was counted
        self._attempt_started = time.perf_counter()  # when it was placed, for the log's "trained in"
        self._mqtt: paho.Client | None = None
        self.refused = ""  # why the server refuses this device's certificate, once it does: the agent stops
        self.renewed = False  # it renewed its certificate and stopped, for a fresh agent on the new files
        self._status_lock = threading.Lock()
        self._checks: dict[str, Future[Invocation]] = {}  # the data's check against each app's model
        self._fits: dict[str, int] = {}  # examples of the device's data, by the app they fit
        self._status = AgentStatus(
            client=config.identity.id, state=AgentState.IDLE, transport=self._transport()
        )

    def _pool(self) -> WarmPool:
        """The function's one warm instance: a worker process, or a container (``--runtime container``)."""
        if self.config.containers is None:
            return WarmPool(1, keep_alive=self.config.keep_alive)
        from fedge.edge_functions import containers

        return containers.pool(1, self.config.containers, keep_alive=self.config.keep_alive)

    def stop(self) -> None:
        """Ask the agent to stop after the step in flight: a training run finishes and its update is kept."""
        self._stop.set()

    @property
    def stopping(self) -> bool:
        return self._stop.is_set()

    def _renew_if_due(self) -> bool:
        """Renew the certificate once two thirds of its life have passed; True when it did, so the agent
        stops and a fresh one connects with the new key (the server supersedes the old certificate). A failed
        attempt is retried on the next turn of the loop, while the current certificate still serves."""
        due = self.config.renew_at
        if due is None or dt.datetime.now(dt.UTC) < due:
            return False
        from fedge.client.enrollment import EnrollmentError, renew

        try:
            renew(self.config.state_dir)
        except (EnrollmentError, OSError) as exc:
            self._report(AgentState.IDLE, detail=f"certificate renewal failed, retrying: {exc}")
            return False
        self.renewed = True
        return True

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
                self._check_data(self.config.app)  # a task's, once the first round names it
                self._send_outbox(api)
                while not self._stop.is_set() and not self._renew_if_due():
                    info = self._next_announcement(api)
                    if info is not None:
                        self._evaluate_if_asked(info)  # first: training may move the model on
                        self._handle(api, info)
                    if any(self._outbox.glob("round-*.safetensors")) and not self._stop.is_set():
                        self._send_outbox(api)
        finally:
            self.pool.close()
            why = self.refused or ("renewed its certificate" if self.renewed else "stopped")
            self._report(AgentState.STOPPED, detail=why)
            if self._mqtt is not None:
                self._mqtt.disconnect()
                self._mqtt.loop_stop()

    def _topic(self) -> str:
        return rounds_topic(self.config.identity.federation)

    def _on_connect(self, client: paho.Client) -> None:
        client.subscribe(self._topic(), qos=1)

    def _on_subscribe(self, _client: paho.Client, reasons: list[paho.ReasonCode]) -> None:
        """Only a subscription the broker granted counts as reachable: else the agent long-polls."""
        if any(reason.is_failure for reason in reasons):
            self._connected.clear()
            self._report(AgentState.ERROR, detail=f"the broker refused {self._topic()}: is its ACL current?")
            return
        self._connected.set()
        # Ask the server too: a broker that let this device read only after a reload (its ACL rewritten)
        # never re-sends the retained announcement to a subscription it already had.
        self._checked = float("-inf")
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
        except ServerError as exc:
            if exc.status in (401, 403):  # this certificate is refused (revoked, expired...): for good
                return self._refused(f"the server refuses this device's certificate: {exc}")
            self._report(AgentState.ERROR, detail=f"server unreachable: {exc}")
            self._stop.wait(RETRY_SECONDS)
            return None
        except httpx.TransportError as exc:
            expires = self.config.expires
            if expires is not None and dt.datetime.now(dt.UTC) > expires:  # the server just hangs up
                return self._refused(f"this device's certificate expired on {expires:%Y-%m-%d %H:%M} UTC")
            self._report(AgentState.ERROR, detail=f"server unreachable: {exc}")
            self._stop.wait(RETRY_SECONDS)
            return None
        return None if info.etag == self._etag else info

    def _refused(self, why: str) -> None:
        """No retry can help: say why and stop (the command exits with it)."""
        self.refused = why
        self._report(AgentState.ERROR, detail=why)
        self._stop.set()

    def _handle(self, api: FedgeClient, info: RoundInfo) -> None:
        self._etag = info.etag
        step, why = plan(info, self.config.identity.id, self._done_round(), time.time())
        if step is Step.IGNORE:
            # A skip stays shown with its reason until the next round (its notice may close this one at once).
            settled = self._status.state in (AgentState.IDLE, AgentState.SKIPPED)
            if not settled or self._status.round != info.round:
                self._report(AgentState.IDLE, info.round, why)
            return
        rounds_log.info("round %d heard: %s", info.round, _heard(info, why, step is Step.TRAIN))
        if step is Step.SKIP:
            self._finish(info.round, AgentState.SKIPPED, why)
            return
        self.pool.warm(wait=False)
        app = self.config.app or info.task
        self._check_data(app)
        if self.config.app is not None and not self._data_checked(app, self._checks[app]):
            return  # the owner's app was checked from the start: its rounds wait for the answer
        examples = self._examples(app)
        targets = self._targets(api, info)
        offloads = self.config.offload is not OffloadSetting.NEVER
        if offloads and not self.placer.predictor.knows(EDGE, info.task):
            self._calibrate(info, targets)
        placement = self.placer.decide(info, examples, time.time(), capacity.free_memory())
        told: list[str] = []
        try:
            played = play(
                info, self.placer, targets, placement, examples, capacity.free_memory,
                lambda reason: told.append(self._skip(api, info, reason)),
                lambda p, where, fallback: self._placed(info.round, p, where, fallback),
                self._retrying(info.round),
            )  # fmt: skip
        except Exception as exc:  # WorkerFailed (crash, hang), the server's refusal, bad data, the deadline
            if self._stop.is_set():  # not done: the next start takes the round up again if it is still open
                self._report(AgentState.ERROR, info.round, f"round {info.round} stopped: {exc}")
            else:
                rounds_log.warning("round %d failed: %s", info.round, exc)
                notice = self._skip(
                    api, info, f"failed on the device: {exc}"[:200]
                )  # no wait for the deadline
                self._finish(info.round, AgentState.ERROR, f"round {info.round} failed: {exc}; {notice}")
            return
        self._played(info.round, played, told)

    def _evaluate_if_asked(self, info: RoundInfo) -> None:
        """Score the model the server asks this device about on its held-out data and send the figures,
        once per asked round; a failure is said in a line and not tried again (the server does not wait
        for it beyond the request's deadline)."""
        ask = info.evaluate
        if ask is None or self.config.identity.id not in ask.clients or time.time() >= ask.deadline:
            return
        path = self.config.state_dir / "evaluated.json"
        if path.exists() and json.loads(path.read_text())["round"] >= ask.round:
            return
        self.pool.warm(wait=False)
        data = (
            self._data()
            if self.config.eval_data is None
            else LocalData(path=self.config.eval_data, label=self.config.label)
        )
        event = EvaluateEvent(
            server=self.config.server, credentials=CredentialPaths.of(self.config.creds), task=info.task,
            app=self.config.app, run_config=self.config.run_config, data=data, asked=ask,
        )  # fmt: skip
        try:
            result = EvaluateResult.model_validate(self.pool.invoke("evaluate", event).result().result)
        except Exception as exc:  # the app raised, the server refused, the worker died
            rounds_log.warning("round %d evaluation failed: %s", ask.round, exc)
        else:
            accuracy = "" if result.accuracy is None else f", accuracy {result.accuracy:.4f}"
            sent = "sent" if result.sent else "not sent: the server serves a newer model already"
            rounds_log.info(
                "round %d evaluated on %d examples: loss %.4f%s, %s",
                ask.round, result.num_examples, result.loss, accuracy, sent,
            )  # fmt: skip
        write_file(path, json.dumps({"round": ask.round}).encode())

    def _retrying(self, round_: int) -> Retrying:
        """How this round's requests wait out a transient failure: stopped by SIGTERM, and shown."""

        def retried(exc: BaseException, seconds: float) -> None:
            detail = f"round {round_}: {str(exc).rstrip('.')}; trying again in {seconds:.1f} s"
            rounds_log.warning("%s", detail)
            self._report(self._status.state, round_, detail)

        return Retrying(self._stop.wait, retried)

    def _targets(self, api: FedgeClient, info: RoundInfo) -> dict[str, Target]:
        """The device and each executor the owner allows, for this round."""
        until = math.inf if info.deadline is None else info.deadline
        device = DeviceTarget(
            self.pool, self._train_event, self._calibrate_event,
            lambda r: self._trained(r) or self._send_outbox(api, until).get(r), calibrate_s=CALIBRATE_SECONDS,
        )  # fmt: skip
        executors = [
            HttpsExecutor(spec, self.config.creds, api, self._shard, CALIBRATE_SECONDS)
            for spec in self.config.executors
        ]
        return {EDGE: device, **{e.id: e for e in executors}}

    def _skip(self, api: FedgeClient, info: RoundInfo, reason: str) -> str:
        """Tell the server this round gets no update from here, so it need not wait for the deadline;
        returns what became of the notice. A notice the server already holds (its answer was lost) was
        delivered."""
        try:  # until the deadline: without the notice the round merely waits for it
            self._retrying(info.round).call(lambda: api.skip(info.round, reason), info.deadline)
            return "the server was told"
        except ServerError as exc:
            if exc.code in ("already_skipped", "duplicate_update"):
                return "the server was told"
            return f"the skip notice failed: {exc}"
        except httpx.HTTPError as exc:
            return f"the skip notice failed: {exc}"

    def _placed(self, round_: int, placement: Placement, where: str, fallback: str) -> None:
        """Before each attempt: count it (a fallback replaces the offload it follows) and show it."""
        counts = dict(self._status.placements)
        if fallback:
            counts[self._counted] -= 1
            if not counts[self._counted]:
                del counts[self._counted]
        counts[where] = counts.get(where, 0) + 1
        self._counted = where
        update: dict[str, object] = {"placements": counts}
        if fallback:
            update["fallback"] = fallback
        self._status = self._status.model_copy(update=update)
        if placement.prewarm and placement.kind is not Kind.OFFLOAD and not fallback:
            threading.Thread(target=self._prewarm, daemon=True).start()
        rounds_log.info(
            "round %d placed %s: %s", round_, _placed_where(placement), fallback or placement.reason
        )
        self._attempt_started = time.perf_counter()
        if placement.offloaded:
            self._report(AgentState.TRAINING, round_, f"round {round_} offloaded to {placement.target}")
        elif placement.kind is not Kind.SKIP:
            self._report(AgentState.TRAINING, round_, f"training round {round_}")

    def _played(self, round_: int, played: Played, told: list[str]) -> None:
        """After the round: a skip or an executor's run is finished here; the device's update was sent
        (and the round finished) from the outbox."""
        trained = played.trained
        if trained is None:
            detail = played.fallback or f"round {round_}: {played.placement.reason}"
            rounds_log.info("round %d skipped: %s", round_, told[-1])
            self._finish(round_, AgentState.SKIPPED, f"{detail}; {told[-1]}")
        elif trained.invocation is None:
            sent = self._status.raw_bytes_offloaded + trained.raw_bytes
            self._status = self._status.model_copy(update={"raw_bytes_offloaded": sent})
            detail = f"round {round_} trained by executor {played.placement.target}"
            rounds_log.info(
                "%s, which sent the update (%d bytes of raw data sealed to it)", detail, trained.raw_bytes
            )
            self._finish(round_, AgentState.IDLE, detail)
        else:
            invocation = trained.invocation
            self._status.last_invocation = LastInvocation(
                cold=invocation.cold, startup_seconds=invocation.startup_seconds, seconds=invocation.seconds
            )

    def _trained(self, round_: int) -> None:
        """The device's update is ready to send: say how long it took since it was placed here."""
        seconds = time.perf_counter() - self._attempt_started
        rounds_log.info("round %d trained in %.2f s on the device", round_, seconds)

    def _calibrate(self, info: RoundInfo, targets: dict[str, Target]) -> None:
        """Two short timed runs here and on each executor the owner allows, before the first decision that
        could send data away, so it rests on lines measured rather than on optimism (an executor that cannot
        be reached stays unknown, and is tried). Without offload the first round itself is the measurement."""
        log = logging.getLogger("fedge.placement")
        self.placer.shard_bytes = shard_bytes(self._shard())
        for target in targets.values():
            # A device too slow even for this decides its first round without a line.
            survivable = Exception if target.id == EDGE else TargetFailed
            try:
                small, large = target.calibrate(info.task, info.config)
            except survivable as exc:
                log.warning("%s calibration failed (it stays unknown, so it is tried): %s", target.id, exc)
                continue
            self.placer.calibrated(target.id, info.task, small, large)

    def _calibrate_event(self, task: str, config: TrainConfig) -> CalibrateEvent:
        data = self._data()
        assert isinstance(data, LocalData)  # offload needs the device's own file (the CLI says so)
        return CalibrateEvent(task=task, config=config, data=data)

    def _train_event(self, info: RoundInfo) -> TrainEvent:
        return TrainEvent(
            server=self.config.server, credentials=CredentialPaths.of(self.config.creds), task=info.task,
            round=info.round, config=info.config, data=self._data(), outbox=self._outbox,
            model_sha256=info.model_sha256, app=self.config.app, run_config=self.config.run_config,
        )  # fmt: skip

    def _data(self) -> LocalData | AppData:
        if self.config.data is None:
            return AppData(index=self.config.partition[0], num_clients=self.config.partition[1])
        return LocalData(path=self.config.data, label=self.config.label)

    def _check_data(self, app: str | None) -> None:
        """Check, once per app and beside the rounds (in a worker, which then stays warm), that the device's
        data fits ``app``'s model: data that does not stops the agent with one line, at start rather than
        at each round."""
        if app is None or app in self._checks:
            return
        event = CheckDataEvent(
            server=self.config.server, credentials=CredentialPaths.of(self.config.creds), task=app,
            app=self.config.app, run_config=self.config.run_config, data=self._data(),
        )  # fmt: skip
        self._checks[app] = self.pool.invoke("check_data", event)
        self._checks[app].add_done_callback(functools.partial(self._data_checked, app))

    def _data_checked(self, app: str, done: Future[Invocation]) -> bool:
        """The check's answer (waited for): whether the data fits; if not, the agent is stopped."""
        try:
            self._fits[app] = CheckDataResult.model_validate(done.result().result).examples
        except (AppFailed, DataError) as exc:  # the app's one line on this data, a file it cannot read
            self._refused(f"the data does not fit the app {app!r}: {exc}")
            return False
        except Exception as exc:  # e.g. a task this device lacks: each round says so, the server is told
            if self.config.app is not None:  # the owner's own app cannot run here at all
                self._refused(f"the app {app!r} cannot run here: {exc}")
                return False
            rounds_log.warning("could not check the data against %r: %s", app, exc)
        return True

    def _examples(self, app: str) -> int:
        """How many examples the device holds: as checked, else (the check still running) counted here."""
        if app in self._fits:
            return self._fits[app]
        if self.config.data is None:
            return 1  # the app reads its own, in its own form
        return len(datafiles.load(self.config.data, self.config.label)[1])

    def _shard(self) -> tuple[np.ndarray, np.ndarray]:
        """The device's examples as an offload sends them."""
        assert self.config.data is not None  # offload needs the device's own file (cli)
        return datafiles.load(self.config.data, self.config.label)

    def _prewarm(self) -> None:
        """Offload looks likely next round: wake the executors now, so a cold start is not on its clock."""
        for target in self.config.executors:
            try:
                with httpx.Client(verify=client_context(self.config.creds), timeout=30) as http:
                    http.get(f"{target.url}/healthz")
            except httpx.HTTPError:
                pass  # a sleeping executor is the placement's problem next round, not this one's

    def _send_outbox(self, api: FedgeClient, retry_until: float = 0.0) -> dict[int, tuple[int, float]]:
        """Send every kept update, oldest round first; one the server already holds (a resend whose first
        answer was lost) counts as sent, one it refuses is dropped; one refused for the device's
        certificate (revoked, expired) is kept and the agent stops: a reissued certificate sends it. A
        transient failure is tried again until ``retry_until`` (the round's deadline; by default, at start
        and between rounds, never); past it the update stays kept for the next try. Returns (bytes,
        seconds) of each upload the server holds, by round: the uplink the predictor learns."""
        sent: dict[int, tuple[int, float]] = {}
        kept = sorted(
            self._outbox.glob("round-*.safetensors"), key=lambda p: int(p.stem.removeprefix("round-"))
        )
        for path in kept:
            round_ = int(path.stem.removeprefix("round-"))
            self._report(AgentState.UPLOADING, round_, f"sending the update of round {round_}")
            body = path.read_bytes()
            started = time.perf_counter()
            try:
                self._retrying(round_).call(lambda r=round_, b=body: api.post_update(r, b), retry_until)
                detail = f"sent the update of round {round_}"
            except (httpx.TransportError, ServerError) as exc:
                if retry.transient(exc):
                    detail = f"server unreachable, update of round {round_} kept: {exc}"
                    self._report(AgentState.ERROR, round_, detail)
                    self._stop.wait(RETRY_SECONDS)
                    return sent
                if isinstance(exc, ServerError) and exc.status == 401:  # the certificate, not the update
                    self._refused(
                        f"the server refuses this device's certificate (update of round {round_} kept): {exc}"
                    )
                    return sent
                if not (isinstance(exc, ServerError) and exc.code == "duplicate_update"):
                    path.unlink()
                    refused = f"round {round_}: the server refused the update: {exc}"
                    rounds_log.warning("%s", refused)
                    self._finish(round_, AgentState.ERROR, refused)
                    continue
                detail = f"sent the update of round {round_} (the server already held it)"
            sent[round_] = (len(body), time.perf_counter() - started)
            rounds_log.info("round %d sent: %d bytes in %.2f s", round_, *sent[round_])
            path.unlink()
            self._finish(round_, AgentState.IDLE, detail)
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
        if not status.current(self._status.round, round_):
            return
        self._status = self._status.model_copy(
            update={
                "state": state,
                "round": self._status.round if round_ is None else round_,
                "detail": detail,
                "transport": self._transport(),
                "updated": time.time(),
            }
        )
        status.write(self.config.state_dir, self._status)
        if self._mqtt is not None and self._connected.is_set():
            topic = status_topic(self.config.identity.federation, self.config.identity.id)
            self._mqtt.publish(topic, self._status.model_dump_json(), qos=1, retain=True)


def _heard(info: RoundInfo, why: str, selected: bool) -> str:
    if not selected:
        return why
    return f"selected, one of {len(info.selected)}, deadline in {info.seconds_left(time.time()):.0f} s"


def _placed_where(placement: Placement) -> str:
    if placement.offloaded:
        return f"on executor {placement.target}"
    if placement.kind is Kind.FEWER_STEPS:
        return f"on the device, {placement.steps} steps (fewer)"
    if placement.kind is Kind.SKIP:
        return "nowhere (skip)"
    return "on the device"
