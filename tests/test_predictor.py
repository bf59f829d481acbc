"""The predictor on synthetic traces with a known ground truth: per-step cost, start-up, bandwidth, and
outliers (a neighbour's burst, a cold start, a bad link) that a naive mean would follow."""

from __future__ import annotations

import numpy as np
import pytest

from fedge.client.policy import Kind, OffloadSetting, Situation, place
from fedge.client.predictor import PRIOR_MARGIN, Prediction, Predictor, Run, robust_line

TRUE_FIXED, TRUE_STEP = 0.5, 0.02  # ground truth of the synthetic trace: compute = 0.5 + 0.02 * steps
TRUE_STARTUP, TRUE_BANDWIDTH = 0.2, 5e6


def synthetic_trace(seed: int = 0, runs: int = 20, outliers: int = 4) -> list[Run]:
    """Runs of 50-400 steps with 2% noise; ``outliers`` of them 5x slower in compute, a few cold starts
    (5 s) and a few downloads over a link 10x faster than usual (which must not raise the estimate)."""
    rng = np.random.default_rng(seed)
    trace = []
    slow = set(rng.choice(runs, outliers, replace=False))
    for i in range(runs):
        steps = int(rng.integers(50, 400))
        compute = (TRUE_FIXED + TRUE_STEP * steps) * rng.normal(1, 0.02) * (5 if i in slow else 1)
        startup = 5.0 if i % 7 == 0 else TRUE_STARTUP * rng.normal(1, 0.05)
        bandwidth = TRUE_BANDWIDTH * (10 if i % 5 == 0 else rng.uniform(1.0, 1.5))
        trace.append(
            Run(steps, compute, startup, 10_000_000, 10_000_000 / bandwidth, 1_000_000, 1e6 / bandwidth)
        )
    return trace


def test_robust_line_recovers_the_truth_despite_outliers() -> None:
    trace = synthetic_trace()
    intercept, slope = robust_line([r.steps for r in trace], [r.compute_s for r in trace])
    assert slope == pytest.approx(TRUE_STEP, rel=0.05)
    assert intercept == pytest.approx(TRUE_FIXED, abs=0.5)
    naive_slope = np.polyfit([r.steps for r in trace], [r.compute_s for r in trace], 1)[0]
    assert abs(naive_slope - TRUE_STEP) > 3 * abs(slope - TRUE_STEP)  # the outliers do mislead least squares


def test_calibration_alone_gives_a_line_padded_by_the_prior_margin() -> None:
    predictor = Predictor()
    predictor.calibrate("edge", "v1", (10, TRUE_FIXED + 10 * TRUE_STEP), (100, TRUE_FIXED + 100 * TRUE_STEP))
    prediction = predictor.predict("edge", "v1", 300, model_bytes=0, update_bytes=0)
    assert prediction.compute_s == pytest.approx(TRUE_FIXED + 300 * TRUE_STEP)
    assert prediction.total_s == pytest.approx(prediction.compute_s * (1 + PRIOR_MARGIN))
    with pytest.raises(ValueError, match="no runs"):
        predictor.predict("edge", "v2", 300, model_bytes=0, update_bytes=0)


def test_components_follow_the_trace_pessimistically() -> None:
    predictor = Predictor()
    predictor.calibrate("edge", "v1", (10, 0.7), (100, 2.5))
    for run in synthetic_trace():
        predictor.observe("edge", "v1", run)
    p = predictor.predict("edge", "v1", 200, model_bytes=10_000_000, update_bytes=1_000_000)
    assert p.compute_s == pytest.approx(TRUE_FIXED + 200 * TRUE_STEP, rel=0.1)
    assert p.startup_s == pytest.approx(TRUE_STARTUP, rel=0.15)  # cold starts do not move the median
    assert 10_000_000 / (1.5 * TRUE_BANDWIDTH) < p.download_s < 10_000_000 / (0.9 * TRUE_BANDWIDTH)
    assert p.upload_s == pytest.approx(p.download_s / 10, rel=0.01)
    assert p.margin_s == pytest.approx(PRIOR_MARGIN * (p.total_s - p.margin_s))  # no errors recorded yet
    assert p.cost("edge").seconds(200) == pytest.approx(p.total_s)


def test_the_margin_grows_with_under_prediction_and_versions_are_apart() -> None:
    predictor = Predictor()
    predictor.calibrate("gpu", "v1", (10, 1.0), (100, 1.9))
    for _ in range(10):
        predicted = predictor.predict("gpu", "v1", 100, 0, 0).total_s
        predictor.observe("gpu", "v1", Run(100, 1.9 * 1.3, predicted_s=predicted))  # always 30% slower
    p = predictor.predict("gpu", "v1", 100, 0, 0)
    assert p.margin_s > 0
    assert p.total_s >= 1.9 * 1.3 * 0.95
    assert not predictor.knows("gpu", "v2")


def test_a_device_slowed_five_times_is_sent_to_the_executor() -> None:
    """From traces to a decision: a device whose runs became 5x slower is placed on the executor."""
    predictor = Predictor()
    predictor.calibrate("edge", "v1", (10, 0.7), (100, 2.5))
    predictor.calibrate("gpu", "v1", (10, 1.1), (100, 1.2))
    for run in synthetic_trace(outliers=0):
        predictor.observe("edge", "v1", Run(run.steps, run.compute_s * 5, run.startup_s))
    edge = predictor.predict("edge", "v1", 200, 0, 0).cost("edge")
    gpu = predictor.predict("gpu", "v1", 200, 0, 0).cost("gpu", price=1)
    placed = place(Situation(OffloadSetting.WHEN_SHORT, 10, 200, edge, (gpu,)))
    assert (placed.kind, placed.target) == (Kind.OFFLOAD, "gpu")


def test_an_executor_is_predicted_with_the_device_uploading_the_shard_and_its_own_fast_link() -> None:
    """The executor's runs time its own model download and update upload (fast); the shard goes first, over
    the device's uplink: at the uplink's low quantile until the executor's own shard uploads are timed."""
    device_uplink = 1e6  # bytes a second
    predictor = Predictor()
    predictor.calibrate("gpu", "v1", (10, 1.0), (100, 1.9))
    for run in synthetic_trace(outliers=0):
        predictor.observe("edge", "v1", Run(run.steps, run.compute_s, bytes_up=2_000_000, upload_s=2.0))
    assert predictor.uplink("edge", "v1") == pytest.approx(device_uplink)
    before = predictor.predict("gpu", "v1", 100, 10_000_000, 1_000_000, 50_000_000, uplink=device_uplink)
    assert before.shard_s == pytest.approx(50.0)
    assert (before.download_s, before.upload_s) == (0, 0)  # its link is not timed yet: no guess
    assert before.total_s == pytest.approx((1.9 + 50.0) * (1 + PRIOR_MARGIN))  # no errors recorded yet
    for _ in range(5):  # the executor's link: 100 MB/s; the shard reached it at 2 MB/s
        predictor.observe("gpu", "v1", Run(100, 1.9, 0.1, 10_000_000, 0.1, 1_000_000, 0.01, 50_000_000, 25.0))
    after = predictor.predict("gpu", "v1", 100, 10_000_000, 1_000_000, 50_000_000, uplink=device_uplink)
    assert after.shard_s == pytest.approx(25.0)  # its own measurements now, not the device's other uploads
    assert after.download_s == pytest.approx(0.1)
    assert after.upload_s == pytest.approx(0.01)
    assert after.total_s == pytest.approx((1.9 + 0.1 + 25.0 + 0.1 + 0.01) * (1 + PRIOR_MARGIN))
    assert predictor.predict("gpu", "v1", 100, 0, 0, 0).shard_s == 0  # nothing to send, nothing to wait for


def test_the_placer_counts_uploads_in_both_places() -> None:
    """A device whose compute alone fits the deadline, but not with its update's upload over a slow link,
    goes to the executor; a shard too large for that link keeps it on the device, with fewer steps."""
    from fedge.client.planner import ExecutorTarget, Placer, steps_of
    from fedge.wire import RoundInfo, RoundState, TrainConfig

    info = RoundInfo(
        round=1, state=RoundState.OPEN, deadline=70.0, model_sha256="0" * 64, task="t", config=TrainConfig()
    )
    steps = steps_of(info.config, 3200)  # 100 a local epoch
    placer = Placer(OffloadSetting.WHEN_SHORT, (ExecutorTarget("gpu", "https://gpu"),), train_memory=0)
    placer.calibrated("edge", "t", (10, 4.0), (100, 40.0))  # 40 s for the round
    placer.calibrated("gpu", "t", (10, 0.1), (100, 1.0))
    # No upload timed yet: 40 s, and half again for a line no real round has checked, fits 70 s.
    assert placer.decide(info, 3200, 0, free=1).kind is Kind.EDGE
    # The device's last update: 30 MB in 30 s, so 40 s + 30 s no longer fits 70 s.
    placer.observe("edge", "t", Run(steps, 40.0, bytes_up=30_000_000, upload_s=30.0))
    placer.shard_bytes = 1_000_000  # 1 s at the device's uplink
    offloaded = placer.decide(info, 3200, 0, free=1)
    assert (offloaded.kind, offloaded.target) == (Kind.OFFLOAD, "gpu")
    placer.shard_bytes = 100_000_000  # 100 s: the executor cannot start in time
    fewer = placer.decide(info, 3200, 0, free=1)
    assert fewer.kind is Kind.FEWER_STEPS
    assert 0 < fewer.steps < steps


def test_one_odd_first_run_keeps_the_prior_margin_and_no_run_more_than_doubles_a_prediction() -> None:
    predictor = Predictor()
    predictor.calibrate("edge", "v1", (2, 0.02), (8, 0.08))
    predicted = predictor.predict("edge", "v1", 12, 0, 0).total_s
    predictor.observe("edge", "v1", Run(12, 40 * predicted, predicted_s=predicted))  # a cold first run
    p = predictor.predict("edge", "v1", 12, 0, 0)
    assert p.margin_s == pytest.approx(PRIOR_MARGIN * (p.total_s - p.margin_s))
    for _ in range(5):  # then always ten times slower than predicted
        predicted = predictor.predict("edge", "v1", 12, 0, 0)
        predictor.observe("edge", "v1", Run(12, 10 * predicted.total_s, predicted_s=predicted.total_s))
    p = predictor.predict("edge", "v1", 12, 0, 0)
    assert p.margin_s == pytest.approx(p.total_s - p.margin_s)  # bounded at +100%


def test_the_margin_scales_with_the_steps_so_a_shorter_round_keeps_only_its_share() -> None:
    """The margin is a fraction of the prediction: cutting a round to half its steps halves the steps' part
    of the margin too, which a margin held in the fixed part would not (and fewer steps would not fit)."""
    p = Prediction(compute_s=10.0, startup_s=1.0, download_s=0.5, upload_s=0.5, margin_s=6.0, per_step_s=0.1,
                   steps=100)  # fmt: skip
    cost = p.cost("edge")
    assert cost.seconds(100) == pytest.approx(p.total_s)
    base_at_50 = 12.0 - 0.1 * 50  # everything but 50 of the steps
    assert cost.seconds(50) == pytest.approx(base_at_50 * 1.5)
