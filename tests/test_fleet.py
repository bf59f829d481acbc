"""The simulation's placement rules: fedge's policy under each owner's setting, and the baselines it is
measured against (``python -m bench offload``)."""

from __future__ import annotations

import pytest

from fedge.client.policy import Cost, Kind, OffloadSetting, Situation
from fedge.sim.fleet import Rule

SLOW_EDGE = Cost("edge", fixed_s=1, per_step_s=1.0)  # 100 steps: 101 s
GPU = Cost("gpu", fixed_s=5, per_step_s=0.01)  # 6 s


@pytest.mark.parametrize("owner", list(OffloadSetting))
def test_only_fedge_and_the_oracle_respect_the_owner(owner: OffloadSetting) -> None:
    assert Rule.FEDGE.setting(owner) is owner
    assert Rule.ORACLE.setting(owner) is owner
    assert Rule.EDGE_ONLY.setting(owner) is OffloadSetting.NEVER
    assert Rule.CLOUD_ONLY.setting(owner) is OffloadSetting.ALWAYS
    assert Rule.STOIC.setting(owner) is OffloadSetting.WHEN_SHORT


def test_edge_only_trains_every_step_on_the_device_even_past_the_deadline() -> None:
    placement = Rule.EDGE_ONLY.policy(Situation(OffloadSetting.NEVER, 10, 100, SLOW_EDGE, (GPU,)))
    assert (placement.kind, placement.target, placement.steps) == (Kind.EDGE, "edge", 100)


def test_cloud_only_sends_every_round_and_trains_on_the_device_while_no_executor_is_there() -> None:
    fast_edge = Cost("edge", fixed_s=0, per_step_s=0.001)
    sent = Rule.CLOUD_ONLY.policy(Situation(OffloadSetting.ALWAYS, 60, 100, fast_edge, (GPU,)))
    assert (sent.kind, sent.target) == (Kind.OFFLOAD, "gpu")
    alone = Rule.CLOUD_ONLY.policy(Situation(OffloadSetting.ALWAYS, 60, 100, fast_edge, ()))
    assert (alone.kind, alone.target) == (Kind.EDGE, "edge")


def test_fedge_and_stoic_differ_on_a_fast_device_with_a_faster_executor() -> None:
    """fedge keeps data home when the device makes the deadline; STOIC sends it wherever it is fastest."""
    edge = Cost("edge", fixed_s=1, per_step_s=0.1)  # 11 s, fits a 60 s deadline
    situation = Situation(OffloadSetting.WHEN_SHORT, 60, 100, edge, (GPU,))
    assert Rule.FEDGE.policy(situation).target == "edge"
    assert Rule.STOIC.policy(situation).target == "gpu"
