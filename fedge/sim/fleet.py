"""The simulated devices of ``fedge simulate --profile``: each decides, every round, where its training runs,
the way an agent does (``client.placer``), and acts on it. It trains on its own worker (slowed to its
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

import httpx
import numpy as np

from fedge.client.offload import calibrate_executor, offload_round, shard_bytes
from fedge.client.placement import Cost, Kind, OffloadSetting, Placement, Situation, fastest, place
from fedge.client.placer import ExecutorTarget, Placer, steps_of
from fedge.client.predictor import Run
from fedge.edge_functions.runtime import Invocation, WarmPool
from fedge.security.offload import OffloadError, encode_shard
from fedge.security.pki import Credentials
from fedge.sim.profiles import DeviceProfile
from fedge.transport import FedgeClient, ServerError
from fedge.wire import RoundInfo, TrainConfig

log = logging.getLogger("fedge.sim.fleet")


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
        pool: WarmPool,
        server: str,
        executor: ExecutorTarget | None,
        train_event: Callable[[RoundInfo, str], dict],
        data_event: Callable[[str], dict],
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
            if placement.kind is Kind.SKIP:
                return self._skip(device, info, placement, agrees)
            if placement.offloaded:
                outcome = self._offload(device, info, placement, agrees)
                if outcome is not None:
                    return outcome
                assert placement.target is not None
                placement = device.placer.fallback(placement.target, info, examples, time.time(), free)
                where = f"fallback:{placement.kind}"
                if placement.kind is Kind.SKIP:
                    return self._skip(device, info, placement, agrees, where)
                return self._train(device, info, placement, agrees, where)
            return self._train(device, info, placement, agrees)

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
            target = (self.executor.id, self.executor.url)
            small, large = calibrate_executor(first.creds, target, task, config, first.data, 120.0)
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
        event = {
            "task": task,
            "config": config.model_dump(),
            "data": self.data_event(device.id),
            "device": {"slowdown": device.profile.slowdown},
            "steps": (steps, max(1, steps // 4)),
        }
        round_sized, quarter = self.pool.invoke("calibrate", event).result().result["points"]
        device.placer.calibrated("edge", task, tuple(round_sized), tuple(quarter))
        with self._lock:  # the oracle's first step cost: the round-sized run, all in it, as rounds measure
            self._machine_step_s.append(round_sized[1] / steps / device.profile.slowdown)

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
        edge = Cost("edge", (self._model_bytes + update) / link, machine * profile.slowdown)
        edge = replace(edge, fits_memory=free >= self.train_memory)
        shard = shard_bytes(device.data)
        executors = () if self.executor is None else (Cost(self.executor.id, shard / link, remote, 1.0),)
        deadline = info.deadline - now if info.deadline is not None else math.inf
        setting = self.rule.setting(profile.offload)
        return Situation(setting, deadline, steps, edge, executors, previous=device.placer.previous)

    def _skip(
        self, device: Device, info: RoundInfo, placement: Placement, agrees: bool | None, where: str = "skip"
    ) -> Outcome:
        """Tell the server now, so the round need not wait for this device until its deadline."""
        try:
            with FedgeClient(self.server, device.creds) as api:
                api.skip(info.round, placement.reason)
        except (httpx.HTTPError, ServerError) as exc:  # the round closed meanwhile: nothing to tell
            log.warning("%s: the skip notice for round %d failed: %s", device.id, info.round, exc)
        return Outcome(device.id, where, False, agrees=agrees)

    def _offload(
        self, device: Device, info: RoundInfo, placement: Placement, agrees: bool | None
    ) -> Outcome | None:
        """The executor trains the round; None when it could not, so the device trains it itself."""
        assert self.executor is not None
        x, y = device.data
        if device.profile.bandwidth is not None:  # the shard goes up the device's own link
            time.sleep(shard_bytes(device.data) / device.profile.bandwidth)
        timeout = max(1.0, info.deadline - time.time()) if info.deadline is not None else 600.0
        where = f"offload:{self.executor.id}"
        try:
            with FedgeClient(self.server, device.creds) as api:
                done = offload_round(
                    api, device.creds, (self.executor.id, self.executor.url), info.task, info.round,
                    info.config, (x, y), placement.weight, timeout,
                )  # fmt: skip
        except ServerError as exc:  # 502: the executor trained, and relays the server's refusal (late)
            sent = len(encode_shard(x, y)) if exc.status == 502 else 0
            return Outcome(device.id, where, False, raw_bytes=sent, agrees=agrees, refused=exc.code)
        except (httpx.HTTPError, OffloadError) as exc:
            log.warning(
                "%s: offload to %s failed, training on the device: %s", device.id, self.executor.id, exc
            )
            return None
        device.placer.observe(self.executor.id, info.task, done.run(placement.steps))
        device.placer.shard_bytes = done.job_bytes
        with self._lock:
            self._executor_step_s.append(done.result.compute_seconds / max(placement.steps, 1))
        return Outcome(device.id, where, True, raw_bytes=done.raw_bytes, agrees=agrees)

    def _train(
        self, device: Device, info: RoundInfo, placement: Placement, agrees: bool | None, where: str = ""
    ) -> Outcome:
        profile = device.profile
        event = {
            **self.train_event(info, device.id),
            "device": {
                "slowdown": profile.slowdown,
                "bandwidth": profile.bandwidth,
                "deadline": info.deadline,
            },
            "max_steps": placement.steps if placement.kind is Kind.FEWER_STEPS else None,
            "weight": placement.weight,
        }
        future: Future[Invocation] = self.pool.invoke("train", event)
        where = where or str(placement.kind)
        try:
            invocation = future.result()
        except ServerError as exc:
            return Outcome(device.id, where, False, agrees=agrees, refused=exc.code)
        done = invocation.result
        compute = done["seconds"] - done["download_seconds"]  # a late device: what it would have taken
        run = Run(
            placement.steps, compute, invocation.startup_seconds, done["bytes_down"], done["download_seconds"]
        )
        device.placer.observe("edge", info.task, run)
        with self._lock:
            self._model_bytes = max(self._model_bytes, done["bytes_up"])
            self._machine_step_s.append(compute / profile.slowdown / max(placement.steps, 1))
        if done["late"]:
            return Outcome(device.id, where, False, agrees=agrees, refused="past_deadline")
        return Outcome(device.id, where, True, invocation=invocation, agrees=agrees)
