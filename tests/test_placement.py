"""The placement policy on a table of situations: what runs where, for each owner setting."""

from __future__ import annotations

import math

import pytest

from fedge.client.planner import AVOID_ROUNDS, ExecutorTarget, Placer
from fedge.client.policy import (
    Cost,
    Kind,
    OffloadSetting,
    Placement,
    Situation,
    fastest,
    fewer_steps,
    offload_wait,
    on_device,
    place,
)
from fedge.client.predictor import Run
from fedge.wire import RoundInfo, RoundState, TrainConfig

NEVER, SHORT, ALWAYS = OffloadSetting.NEVER, OffloadSetting.WHEN_SHORT, OffloadSetting.ALWAYS
FAST_EDGE = Cost("edge", fixed_s=2, per_step_s=0.1)  # 100 steps: 12 s
SLOW_EDGE = Cost("edge", fixed_s=2, per_step_s=1.0)  # 100 steps: 102 s
STARVED_EDGE = Cost("edge", fixed_s=2, per_step_s=0.1, fits_memory=False)
CHEAP_GPU = Cost("gpu-cheap", fixed_s=20, per_step_s=0.05, price=1)  # 25 s
DEAR_GPU = Cost("gpu-dear", fixed_s=5, per_step_s=0.01, price=3)  # 6 s
FAR_GPU = Cost("gpu-far", fixed_s=200, per_step_s=0.01, price=0.5)  # 201 s
PREV_OFFLOAD = Placement(Kind.OFFLOAD, "gpu-cheap", 100, 1.0, "")
PREV_EDGE = Placement(Kind.EDGE, "edge", 100, 1.0, "")

# name: (setting, deadline, edge, executors, previous) -> (kind, target, steps)
CASES = {
    "edge fits: stays on the device even when offload is allowed": (
        (SHORT, 60, FAST_EDGE, (CHEAP_GPU,), None), (Kind.EDGE, "edge", 100)),
    "never: a slow device trains fewer steps, never offloads": (
        (NEVER, 60, SLOW_EDGE, (CHEAP_GPU, DEAR_GPU), None), (Kind.FEWER_STEPS, "edge", 58)),
    "never: a memory-starved device skips, never offloads": (
        (NEVER, 60, STARVED_EDGE, (CHEAP_GPU,), None), (Kind.SKIP, None, 0)),
    "when-short: a slow device goes to the cheapest executor that fits": (
        (SHORT, 60, SLOW_EDGE, (DEAR_GPU, CHEAP_GPU, FAR_GPU), None), (Kind.OFFLOAD, "gpu-cheap", 100)),
    "when-short: the cheap executor is too slow, so the dear one": (
        (SHORT, 10, SLOW_EDGE, (CHEAP_GPU, DEAR_GPU), None), (Kind.OFFLOAD, "gpu-dear", 100)),
    "when-short: memory-starved device offloads though it is fast": (
        (SHORT, 60, STARVED_EDGE, (CHEAP_GPU,), None), (Kind.OFFLOAD, "gpu-cheap", 100)),
    "when-short: no executor fits, fewer steps": (
        (SHORT, 30, SLOW_EDGE, (FAR_GPU,), None), (Kind.FEWER_STEPS, "edge", 28)),
    "when-short: nothing fits at all, skip early": (
        (SHORT, 2.5, SLOW_EDGE, (FAR_GPU,), None), (Kind.SKIP, None, 0)),
    "always: offloads even when the device is fast": (
        (ALWAYS, 60, FAST_EDGE, (DEAR_GPU, CHEAP_GPU), None), (Kind.OFFLOAD, "gpu-cheap", 100)),
    "always: falls back to the device when no executor fits": (
        (ALWAYS, 60, FAST_EDGE, (FAR_GPU,), None), (Kind.EDGE, "edge", 100)),
    "hysteresis: after offloading, an edge just inside the deadline keeps offloading": (
        (SHORT, 13, FAST_EDGE, (DEAR_GPU,), PREV_OFFLOAD), (Kind.OFFLOAD, "gpu-dear", 100)),
    "hysteresis: after offloading, an edge well inside the deadline comes back": (
        (SHORT, 60, FAST_EDGE, (DEAR_GPU,), PREV_OFFLOAD), (Kind.EDGE, "edge", 100)),
    "hysteresis: after edge, an edge just inside the deadline stays on the edge": (
        (SHORT, 13, FAST_EDGE, (DEAR_GPU,), PREV_EDGE), (Kind.EDGE, "edge", 100)),
    "never: hysteresis cannot make it offload": (
        (NEVER, 13, FAST_EDGE, (DEAR_GPU,), PREV_OFFLOAD), (Kind.EDGE, "edge", 100)),
}  # fmt: skip


@pytest.mark.parametrize("name", CASES)
def test_placement_table(name: str) -> None:
    (setting, deadline, edge, executors, previous), expected = CASES[name]
    situation = Situation(setting, deadline, 100, edge, executors, min_steps=5, previous=previous)
    placement = place(situation)
    assert (placement.kind, placement.target, placement.steps) == expected
    if placement.kind is Kind.FEWER_STEPS:
        assert placement.weight == pytest.approx(placement.steps / 100)
        assert edge.seconds(placement.steps) <= deadline < edge.seconds(placement.steps + 1)
    else:
        assert placement.weight == (0.0 if placement.kind is Kind.SKIP else 1.0)


def test_never_offloads_whatever_the_numbers() -> None:
    for deadline in (0.1, 1, 5, 13, 50, 500):
        for edge in (FAST_EDGE, SLOW_EDGE, STARVED_EDGE):
            for previous in (None, PREV_OFFLOAD, PREV_EDGE):
                situation = Situation(NEVER, deadline, 100, edge, (DEAR_GPU, CHEAP_GPU), previous=previous)
                placement = place(situation)
                assert not placement.offloaded
                assert not placement.prewarm


def test_a_hovering_prediction_does_not_flap() -> None:
    """Edge predictions that wander around 90-105% of the deadline: one switch to offload, then none."""
    previous, kinds = None, []
    for per_step in (0.09, 0.103, 0.092, 0.101, 0.095, 0.099, 0.091, 0.104):
        edge = Cost("edge", fixed_s=2, per_step_s=per_step)
        previous = place(Situation(SHORT, 12, 100, edge, (DEAR_GPU,), previous=previous))
        kinds.append(previous.kind)
    assert kinds == [Kind.EDGE, Kind.OFFLOAD, *[Kind.OFFLOAD] * 6]


def test_prewarm_when_offload_is_near() -> None:
    near = place(Situation(SHORT, 13, 100, FAST_EDGE, (DEAR_GPU,)))
    assert near.kind is Kind.EDGE
    assert near.prewarm
    assert not place(Situation(SHORT, 60, 100, FAST_EDGE, (DEAR_GPU,))).prewarm


@pytest.mark.parametrize(
    ("left_s", "edge", "expected"),
    [
        (60, FAST_EDGE, (Kind.EDGE, 100, 1.0)),  # time enough: the full round
        (7, FAST_EDGE, (Kind.FEWER_STEPS, 50, 0.5)),  # 2 s + 50 steps of 0.1 s
        (2.2, FAST_EDGE, (Kind.SKIP, 0, 0.0)),  # 2 steps: under min_steps
        (60, STARVED_EDGE, (Kind.SKIP, 0, 0.0)),
    ],
)
def test_after_a_failed_offload_the_device_does_what_the_time_left_allows(
    left_s: float, edge: Cost, expected: tuple
) -> None:
    """The fallback ignores the owner's setting and the executors: they already failed this round."""
    situation = Situation(
        ALWAYS, left_s, 100, edge, (DEAR_GPU, CHEAP_GPU), min_steps=5, previous=PREV_OFFLOAD
    )
    placement = on_device(situation)
    assert (placement.kind, placement.steps, placement.weight) == expected
    assert not placement.offloaded


def test_an_offload_is_waited_for_only_as_long_as_the_device_could_still_take_over() -> None:
    # always, fast device (12 s), executor 25 s, 60 s left: give up on the executor at 48 s, when the
    # device must start to make it alone.
    offloaded = place(Situation(ALWAYS, 60, 100, FAST_EDGE, (CHEAP_GPU,)))
    assert (offloaded.kind, offloaded.wait_s) == (Kind.OFFLOAD, pytest.approx(48))
    assert offload_wait(60, FAST_EDGE, CHEAP_GPU, 100) == pytest.approx(48)
    # The device cannot make it (too slow, or no memory), or waiting for the device's start would cut the
    # executor's predicted time: the executor gets all the time there is.
    assert place(Situation(SHORT, 60, 100, SLOW_EDGE, (CHEAP_GPU,))).wait_s == 60
    assert place(Situation(SHORT, 60, 100, STARVED_EDGE, (CHEAP_GPU,))).wait_s == 60
    assert offload_wait(30, FAST_EDGE, CHEAP_GPU, 100) == 30  # 30 - 12 s would leave the executor 18 of 25 s
    assert place(Situation(SHORT, 60, 100, FAST_EDGE, (CHEAP_GPU,))).wait_s == math.inf  # no offload


def test_a_failed_executor_sits_out_the_next_rounds_then_is_tried_again() -> None:
    placer = Placer(ALWAYS, (ExecutorTarget("gpu-1", "https://a"), ExecutorTarget("gpu-2", "https://b")), 0)
    placer.calibrated("edge", "digits", (10, 1.0), (100, 10.0))  # 0.1 s a step
    info = RoundInfo(
        round=1, state=RoundState.OPEN, model_sha256="0" * 64, task="digits", config=TrainConfig()
    )
    steps = TrainConfig().local_epochs * 4  # 100 examples, batches of 32
    assert placer.decide(info, 100, 0, free=1).target == "gpu-1"  # equal prices: the first
    fallback = placer.fallback("gpu-1", info, 100, 0, free=1)
    assert (fallback.kind, fallback.steps) == (Kind.EDGE, steps)
    targets = [
        placer.decide(info.model_copy(update={"round": r}), 100, 0, free=1).target for r in range(2, 5)
    ]
    assert targets == ["gpu-2"] * AVOID_ROUNDS + ["gpu-1"]
    # With no executor left to try, the device trains; with too little time left, fewer steps.
    placer.fallback("gpu-1", info, 100, 0, free=1)
    placer.fallback("gpu-2", info, 100, 0, free=1)
    assert placer.decide(info, 100, 0, free=1).kind is Kind.EDGE
    placer.observe("edge", "digits", Run(steps, 0.1 * steps))
    short = placer.fallback("gpu-1", info.model_copy(update={"deadline": 100.0}), 100, 100 - 0.05 * steps, 1)
    assert short.kind is Kind.FEWER_STEPS
    assert short.weight == pytest.approx(short.steps / steps)


def test_fewer_steps_never_exceeds_the_round_nor_goes_negative() -> None:
    assert fewer_steps(SLOW_EDGE, 1000, 100) == 100
    assert fewer_steps(SLOW_EDGE, 1, 100) == 0
    assert fewer_steps(Cost("edge", 1, 0), 5, 7) == 7


def test_a_round_cut_short_trains_exactly_its_steps() -> None:
    """``fit`` with ``max_steps`` stops after that many minibatches, across epochs, and none more."""
    import numpy as np

    from fedge.edge_functions import datasets, tasks
    from fedge.edge_functions.functions import fit
    from fedge.wire import TrainConfig

    digits = datasets.load("digits")
    x, y = digits.x_train[:200], digits.y_train[:200]
    config = TrainConfig(local_epochs=3, batch_size=32)  # 7 batches an epoch
    for max_steps, expected in ((5, 5), (10, 10), (None, 21), (100, 21)):
        model = tasks.get("digits").build_model()
        calls: list[int] = []
        model.register_forward_hook(lambda *_, seen=calls: seen.append(1))
        loss = fit(model, x, y, config, max_steps=max_steps)
        assert len(calls) == expected, max_steps
        assert np.isfinite(loss)
        assert loss > 0


# STOIC's rule, the baseline: (edge, executors) -> target; owner setting and price play no part.
FASTEST_CASES = {
    "a fast device stays when no executor is faster": ((FAST_EDGE, (CHEAP_GPU, FAR_GPU)), "edge"),
    "a fast device's data leaves for a faster executor": ((FAST_EDGE, (CHEAP_GPU, DEAR_GPU)), "gpu-dear"),
    "a slow device goes to the fastest executor, however dear": (
        (SLOW_EDGE, (CHEAP_GPU, DEAR_GPU)), "gpu-dear"),
    "a starved device goes to an executor though it is the faster": (
        (STARVED_EDGE, (CHEAP_GPU,)), "gpu-cheap"),
    "nothing fits memory: skip": ((STARVED_EDGE, ()), None),
}  # fmt: skip


@pytest.mark.parametrize("name", FASTEST_CASES)
def test_stoic_rule_picks_the_lowest_predicted_time(name: str) -> None:
    (edge, executors), target = FASTEST_CASES[name]
    for setting in (NEVER, SHORT, ALWAYS):  # STOIC knows nothing of the owner's consent
        placement = fastest(Situation(setting, 60, 100, edge, executors))
        assert placement.target == target, name
        assert placement.steps == (0 if target is None else 100)
