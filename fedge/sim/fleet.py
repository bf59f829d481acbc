"""The simulated devices of ``fedge simulate --profile``: each decides, every round, where its training runs,
the way an agent does (``client.planner``), and acts on it. It trains on its own worker (slowed to its
profile), has the executor process train for it (its shard sealed to the executor, under a one-round
grant), trains fewer steps, sends the server a skip notice, or is simply gone (dropout).

``Rule`` picks whose decisions these are: fedge's policy under each owner's setting, or a baseline
(edge only; cloud only; STOIC's lowest predicted time, which ignores the owner; an oracle running fedge's
policy on actual times). Each decision is also judged against the oracle's under the same rule, which
is how the placement's agreement with the oracle is measured.

The oracle's "actual times" are the emulation's truth: a device's step costs its slowdown times what a
step costs this machine right now (the median of the last round's measured steps, per unit of slowdown),
its transfers its profile's bandwidth; the executor's step what its last jobs took.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, replace
from enum import StrEnum
from typing import Protocol

import httpx
import numpy as np
from pydantic import BaseModel

from fedge.client.planner import ExecutorTarget, Placer, steps_of
from fedge.client.policy import EDGE, Cost, Kind, OffloadSetting, Placement, Situation, fastest, place
from fedge.client.round import Played, play
from fedge.client.targets import Point, Target, TargetFailed, Trained
from fedge.client.targets.device import DeviceTarget
from fedge.client.targets.executor import HttpsExecutor, shard_bytes
from fedge.edge_functions.events import DataSpec, TrainResult
from fedge.edge_functions.runtime import Invocation
from fedge.security.offload import encode_shard
from fedge.security.pki import Credentials
from fedge.sim.emulation import (
    EMULATED_CALIBRATE,
    EMULATED_TRAIN,
    EmulatedCalibrateEvent,
    EmulatedTrainEvent,
    SlowDevice,
)
from fedge.sim.profiles import DeviceProfile
from fedge.transport import FedgeClient, ServerError
from fedge.wire import RoundInfo, TrainConfig

log = logging.getLogger("fedge.sim.fleet")


class Pool(Protocol):
    """Where client functions run: the local warm pool (``edge_functions.runtime.WarmPool``) or Ray actors
    (``fedge.sim.ray_pool.RayPool``)."""

    def warm(self, wait: bool = True) -> None: ...

    def invoke(
        self, function: str, event: BaseModel | dict, timeout: float | None = None
    ) -> Future[Invocation]: ...

    def close(self) -> None: ...


class Rule(StrEnum):
    FEDGE = "fedge"  # fedge's policy, each owner's --offload setting from the profile
    EDGE_ONLY = "edge-only"  # nothing leaves a device
    CLOUD_ONLY = "cloud-only"  # every round on the executor, whatever the owner said (a baseline)
    STOIC = "stoic"  # lowest predicted time, the owner ignored (a baseline)
    ORACLE = "oracle"  # fedge's policy on the actual times

    def setting(self, owner: OffloadSetting) -> OffloadSetting:
        return {
            Rule.EDGE_ONLY: OffloadSetting.NEVER,
            Rule.CLOUD_ONLY: OffloadSetting.ALWAYS,
            Rule.STOIC: OffloadSetting.WHEN_SHORT,
        }.get(self, owner)

    @property
    def policy(self) -> Callable[[Situation], Placement]:
        return {Rule.EDGE_ONLY: edge_only, Rule.CLOUD_ONLY: cloud_only, Rule.STOIC: fastest}.get(self, place)


def edge_only(s: Situation) -> Placement:
    """Today's federated learning: every round, in full, on the device, however long it takes."""
    return Placement(Kind.EDGE, s.edge.target, s.steps, 1.0, "edge only")


def cloud_only(s: Situation) -> Placement:
    """Every round on the (first) executor, however fast the device is; on the device while the executor
    sits out a failure."""
    if not s.executors:
        return Placement(Kind.EDGE, s.edge.target, s.steps, 1.0, "cloud only, but no executor now")
    return Placement(Kind.OFFLOAD, s.executors[0].target, s.steps, 1.0, "cloud only")


@dataclass(frozen=True)
class Outcome:
    """What one device did in one round."""

    client: str
    where: str  # edge, fewer-steps, offload:ID, skip, dropout; fallback:KIND when an offload failed
    accepted: bool  # the server took its update before the round closed
    invocation: Invocation | None = None  # a run on the device's own worker
    raw_bytes: int = 0  # raw data that left the device (its sealed shard's plaintext)
    agrees: bool | None = None  # whether the oracle would have placed it the same
    refused: str | None = None  # the server's error code, when it refused the update


@dataclass
class Device:
    id: str
    index: int
    profile: DeviceProfile
    creds: Credentials
    data: tuple[np.ndarray, np.ndarray]
    placer: Placer
    lock: threading.Lock


class Fleet:
    def __init__(
        self,
        devices: list[Device],
        rule: Rule,
        pool: Pool,
        server: str,
        executor: ExecutorTarget | None,
        train_event: Callable[[RoundInfo, str], EmulatedTrainEvent],
        data_event: Callable[[str], DataSpec],
        train_memory: int,
        seed: int,
    ) -> None:
        self.devices = {d.id: d for d in devices}
        self.rule = rule
        self.pool = pool
        self.server = server
        self.executor = executor
        self.train_event = train_event
        self.data_event = data_event
        self.train_memory = train_memory
        self.seed = seed
        self._machine_step_s: list[float] = []  # this round's measured seconds per step per unit slowdown
        self._executor_step_s: list[float] = []
        self._truth = (0.0, 0.0)  # (machine, executor) seconds per step, as of the last round
        self._model_bytes = 0
        self._lock = threading.Lock()

    def new_round(self) -> None:
        """Carry the last round's measured step costs into the oracle's actual times."""
        with self._lock:
            machine = float(np.median(self._machine_step_s)) if self._machine_step_s else self._truth[0]
            remote = float(np.median(self._executor_step_s)) if self._executor_step_s else self._truth[1]
            self._truth = (machine, remote)
            self._machine_step_s, self._executor_step_s = [], []

    def play(self, info: RoundInfo, client: str) -> Outcome:
        """One device's round: one at a time per device, so a device still busy with a late round starts
        the next one late, as a real one would."""
        device = self.devices[client]
        with device.lock:
            if device.profile.drops_out(self.seed, info.round, device.index):
                return Outcome(client, "dropout", False)
            examples = len(device.data[1])
            free = device.profile.free_memory(self.train_memory)
            now = time.time()
            if self.rule is Rule.ORACLE:
                placement = place(self._actual(device, info, examples, now, free))
                device.placer.previous = placement
            else:
                placement = device.placer.decide(info, examples, now, free)
            agrees = self._agrees(device, info, examples, now, free, placement)
            tried: list[str] = []
            with FedgeClient(self.server, device.creds) as api:
                try:
                    played = play(
                        info, device.placer, self._targets(device, api), placement, examples, lambda: free,
                        lambda reason: self._skip(api, device, info, reason),
                        lambda _placement, where, _fallback: tried.append(where),
                    )  # fmt: skip
                except ServerError as exc:  # the device's own run, refused (late, or already sent)
                    return Outcome(device.id, tried[-1], False, agrees=agrees, refused=exc.code)
            return self._outcome(device, played, agrees)

    def prepare(self, task: str, config: TrainConfig) -> None:
        """Before round 1: every device times two runs, as an agent does before its first decision that
        could send data away (which also loads its data, so no rule starts colder than another), and the
        executor times its own; the oracle's first actual step costs come from them."""
        devices = list(self.devices.values())
        with ThreadPoolExecutor(len(devices)) as threads:
            list(threads.map(lambda d: self._calibrate(d, task, config), devices))
        machine = float(np.median(self._machine_step_s))
        remote = machine
        if self.executor is not None:
            # The executor's line comes from its own two runs on synthetic data, as an agent asks for it.
            first = devices[0]
            with FedgeClient(self.server, first.creds) as api:
                small, large = self._targets(first, api)[self.executor.id].calibrate(task, config)
            for device in devices:
                device.placer.calibrated(self.executor.id, task, small, large)
            remote = (large[1] - small[1]) / (large[0] - small[0])
        self._truth = (machine, remote)
        self._machine_step_s = []

    def _calibrate(self, device: Device, task: str, config: TrainConfig) -> None:
        """A round's steps first, then a quarter of them: every device calibrates at once, so the first runs
        share the machine as a round's do, and the line passes through that point. The agent's two short
        runs would see a quieter machine than the simulated rounds will (half their time, measured)."""
        steps = steps_of(config, len(device.data[1]))
        round_sized, quarter = self._device_target(device).calibrate(task, config)
        device.placer.calibrated(EDGE, task, round_sized, quarter)
        with self._lock:  # the oracle's first step cost: the round-sized run, all in it, as rounds measure
            self._machine_step_s.append(round_sized[1] / steps / device.profile.slowdown)

    def _device_target(self, device: Device) -> DeviceTarget:
        """The device's worker, slowed to its profile; it stops at the deadline by itself."""
        profile = device.profile

        def train_event(info: RoundInfo) -> EmulatedTrainEvent:
            slow = SlowDevice(slowdown=profile.slowdown, bandwidth=profile.bandwidth, deadline=info.deadline)
            return self.train_event(info, device.id).model_copy(update={"device": slow})

        def calibrate_event(task: str, config: TrainConfig) -> EmulatedCalibrateEvent:
            steps = steps_of(config, len(device.data[1]))
            return EmulatedCalibrateEvent(
                task=task, config=config, data=self.data_event(device.id), steps=(steps, max(1, steps // 4)),
                device=SlowDevice(slowdown=profile.slowdown),
            )  # fmt: skip

        functions = (EMULATED_TRAIN, EMULATED_CALIBRATE)
        return DeviceTarget(
            self.pool, train_event, calibrate_event, functions=functions, stop_at_deadline=False
        )

    def _targets(self, device: Device, api: FedgeClient) -> dict[str, Target]:
        targets: dict[str, Target] = {EDGE: self._device_target(device)}
        if self.executor is not None:
            executor = HttpsExecutor(self.executor, device.creds, api, lambda: device.data, 120.0)
            targets[executor.id] = DeviceLink(executor, device.profile.bandwidth)
        return targets

    def _outcome(self, device: Device, played: Played, agrees: bool | None) -> Outcome:
        """What the round counts as (a device's run held back past its deadline: refused as late), and the
        step costs it measured for the oracle's actual times."""
        trained = played.trained
        if trained is None:
            return Outcome(device.id, played.where, False, agrees=agrees)
        steps = max(played.placement.steps, 1)
        with self._lock:
            if trained.invocation is not None and trained.run is not None:  # the device's own worker
                done = TrainResult.model_validate(trained.invocation.result)
                self._model_bytes = max(self._model_bytes, done.bytes_up)
                self._machine_step_s.append(trained.run.compute_s / device.profile.slowdown / steps)
            elif trained.run is not None:
                self._executor_step_s.append(trained.run.compute_s / steps)
        refused = trained.refused or (None if trained.accepted else "past_deadline")
        invocation = trained.invocation if trained.accepted else None
        return Outcome(
            device.id, played.where, trained.accepted, invocation, trained.raw_bytes, agrees, refused
        )

    def _agrees(
        self, device: Device, info: RoundInfo, examples: int, now: float, free: int, placement: Placement
    ) -> bool | None:
        """Whether the oracle, knowing the actual times, would have placed this round the same way; None
        for the rules that do not predict (edge only, cloud only) and for the oracle itself."""
        if self.rule in (Rule.EDGE_ONLY, Rule.CLOUD_ONLY, Rule.ORACLE):
            return None
        oracle = self.rule.policy(self._actual(device, info, examples, now, free))
        return (oracle.kind, oracle.target) == (placement.kind, placement.target)

    def _actual(self, device: Device, info: RoundInfo, examples: int, now: float, free: int) -> Situation:
        machine, remote = self._truth
        profile = device.profile
        link = profile.bandwidth or math.inf
        steps = steps_of(info.config, examples)
        update = self._model_bytes  # an update is as large as the model
        price, per_s = device.placer.price(EDGE)  # priced as the device's planner prices its targets
        edge = Cost(EDGE, (self._model_bytes + update) / link, machine * profile.slowdown, price,
                    free >= self.train_memory, per_s)  # fmt: skip
        shard = shard_bytes(device.data)
        executors: tuple[Cost, ...] = ()
        if self.executor is not None:
            price, per_s = device.placer.price(self.executor.id)
            executors = (Cost(self.executor.id, shard / link, remote, price, True, per_s),)
        deadline = info.seconds_left(now)
        setting = self.rule.setting(profile.offload)
        return Situation(
            setting, deadline, steps, edge, executors, previous=device.placer.previous,
            max_cost=device.placer.max_cost,
        )  # fmt: skip

    def _skip(self, api: FedgeClient, device: Device, info: RoundInfo, reason: str) -> None:
        """Tell the server now, so the round need not wait for this device until its deadline."""
        try:
            api.skip(info.round, reason)
        except (httpx.HTTPError, ServerError) as exc:  # the round closed meanwhile: nothing to tell
            log.warning("%s: the skip notice for round %d failed: %s", device.id, info.round, exc)


@dataclass(frozen=True)
class DeviceLink:
    """The executor as a simulated device reaches it: the shard goes up the device's own link first, the
    device waits for the executor until the deadline, and a refusal the executor relays is the server's
    (counted as such), not a failure the device falls back from."""

    executor: HttpsExecutor
    bandwidth: float | None

    @property
    def id(self) -> str:
        return self.executor.id

    def calibrate(self, task: str, config: TrainConfig) -> tuple[Point, Point]:
        return self.executor.calibrate(task, config)

    def train(self, info: RoundInfo, placement: Placement) -> Trained:
        data = self.executor.shard()
        if self.bandwidth is not None:
            time.sleep(shard_bytes(data) / self.bandwidth)
        try:
            return self.executor.train(info, replace(placement, wait_s=math.inf))
        except TargetFailed as exc:
            if exc.refusal is None:
                log.warning("offload to %s failed, training on the device: %s", self.id, exc)
                raise
            sent = (
                len(encode_shard(*data)) if exc.refusal.status == 502 else 0
            )  # 502: it trained, then refused
            return Trained(None, False, raw_bytes=sent, refused=exc.refusal.code)
