"""One device's round (``client.round``), as the agent and the simulation's fleet play it: the placement is
acted on, a failed offload falls back to the device, and every run reaches the planner."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest
from conftest import client_data, free_port

from fedge.client.planner import ExecutorTarget, Placer
from fedge.client.policy import EDGE, Kind, OffloadSetting, Placement
from fedge.client.predictor import Run
from fedge.client.round import play
from fedge.client.targets import Point, Trained
from fedge.client.targets.device import DeviceTarget
from fedge.client.targets.executor import HttpsExecutor
from fedge.edge_functions.events import CalibrateEvent, LocalData
from fedge.edge_functions.runtime import WarmPool
from fedge.security import pki
from fedge.transport import FedgeClient
from fedge.wire import RoundInfo, RoundState, TrainConfig

INFO = RoundInfo(
    round=1, state=RoundState.OPEN, deadline=None, model_sha256="0" * 64, task="digits", selected=["alice"],
    config=TrainConfig(batch_size=10),
)  # fmt: skip
EXAMPLES = 100  # 10 steps a round


@dataclass
class FakeDevice:
    """The device's own target, recording what it was asked to train: its pool is not what is tested."""

    trained: list[Placement] = field(default_factory=list)
    step_s: float = 0.1
    id: str = EDGE

    def calibrate(self, task: str, config: TrainConfig) -> tuple[Point, Point]:
        return (2, 0.2), (8, 0.8)

    def train(self, info: RoundInfo, placement: Placement) -> Trained:
        self.trained.append(placement)
        return Trained(Run(placement.steps, self.step_s * placement.steps))


def planner(*executors: ExecutorTarget) -> Placer:
    setting = OffloadSetting.ALWAYS if executors else OffloadSetting.NEVER
    placer = Placer(setting, executors, train_memory=0)
    placer.calibrated(EDGE, INFO.task, (1, 0.1), (10, 1.0))
    return placer


def test_an_executor_that_cannot_be_reached_makes_the_round_fall_back_to_the_device(
    pki_dir: Path,
) -> None:
    creds = pki.credentials(pki_dir, pki.Role.CLIENT, "alice")
    spec = ExecutorTarget("gpu-1", f"https://127.0.0.1:{free_port()}")  # nothing listens there
    placer, device = planner(spec), FakeDevice()
    shard = (np.zeros((EXAMPLES, 1, 8, 8), np.float32), np.zeros(EXAMPLES, np.int64))
    placed: list[tuple[str, str]] = []
    skipped: list[str] = []
    with FedgeClient("https://127.0.0.1:1", creds) as api:
        executor = HttpsExecutor(spec, creds, api, lambda: shard)
        placement = placer.decide(INFO, EXAMPLES, 0.0, free=1)
        assert placement.target == "gpu-1"
        played = play(
            INFO, placer, {EDGE: device, "gpu-1": executor}, placement, EXAMPLES, lambda: 1, skipped.append,
            lambda p, where, why: placed.append((where, why)),
        )  # fmt: skip
    assert played.where == "fallback:edge"
    assert [p.kind for p in device.trained] == [Kind.EDGE]
    assert played.fallback.startswith("round 1: offload to gpu-1 failed (")
    assert [where for where, _ in placed] == ["offload:gpu-1", "fallback:edge"]
    assert placed[1][1] == played.fallback
    assert skipped == []
    assert placer.decide(INFO, EXAMPLES, 0.0, free=1).target == EDGE  # the failed executor sits out


def test_a_skip_tells_the_server_and_trains_nowhere() -> None:
    placer, device = planner(), FakeDevice()
    skip = Placement(Kind.SKIP, None, 0, 0.0, "out of memory")
    skipped: list[str] = []
    played = play(INFO, placer, {EDGE: device}, skip, EXAMPLES, lambda: 0, skipped.append)
    assert (played.where, played.trained, skipped, device.trained) == ("skip", None, ["out of memory"], [])


def test_a_device_run_teaches_the_planner_what_the_next_round_costs() -> None:
    placer, device = planner(), FakeDevice(step_s=1.0)  # ten times what calibration measured
    before = placer.predictor.predict(EDGE, INFO.task, 10, 0, 0).total_s
    placement = placer.decide(INFO, EXAMPLES, 0.0, free=1)
    played = play(INFO, placer, {EDGE: device}, placement, EXAMPLES, lambda: 1, lambda _: None)
    assert played.where == "edge"
    assert device.trained == [placement]
    assert placer.predictor.predict(EDGE, INFO.task, 10, 0, 0).total_s > 2 * before


def test_the_device_target_times_two_runs_on_its_own_data_in_its_warm_pool(tmp_path: Path) -> None:
    (data,) = client_data(tmp_path, 1)
    pool = WarmPool(1)
    try:
        device = DeviceTarget(
            pool, lambda _: pytest.fail("no round is trained"),
            lambda task, config: CalibrateEvent(task=task, config=config, data=LocalData(path=data)),
        )  # fmt: skip
        (small, small_s), (large, large_s) = device.calibrate(INFO.task, INFO.config)
    finally:
        pool.close()
    assert (small, large) == (2, 8)
    assert 0 < small_s < large_s
