"""The price table and the bill: what a round's usage costs, and what a bad price file says."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from fedge.client.planner import ExecutorTarget, Placer
from fedge.client.policy import Cost, Kind, OffloadSetting, Situation, on_device, place, steps_within_budget
from fedge.pricing import (
    GB,
    PriceError,
    Prices,
    Usage,
    cost,
    device_round,
    executor_round,
    load_prices,
    total,
)
from fedge.wire import RoundInfo, RoundState

PRICES = Prices(
    device_gb_second=0.0, device_invocation=0.0, executor_gb_second=0.01, executor_gpu_second=0.1,
    executor_invocation=0.5, gb_up=1.0, gb_down=2.0,
)  # fmt: skip


def test_an_executor_round_is_billed_for_its_memory_gpu_invocation_and_bytes() -> None:
    usage = executor_round(10.0, 2.0, True, bytes_down=GB // 2) + Usage(bytes_up=GB // 4)
    bill = cost(usage, PRICES)
    assert bill.executor == pytest.approx(10 * 2 * 0.01 + 0.5)
    assert bill.gpu == pytest.approx(10 * 0.1)
    assert bill.transfer == pytest.approx(0.5 * 2.0 + 0.25 * 1.0)
    assert bill.device == 0
    assert bill.total == pytest.approx(0.7 + 1.0 + 1.25)


def test_a_device_round_costs_its_owner_nothing_per_second_by_default() -> None:
    usage = device_round(30.0, 1.5, bytes_down=0)
    assert usage.device_gb_seconds == pytest.approx(45.0)
    assert cost(usage, Prices()).device == 0.0
    assert cost(usage, Prices(device_gb_second=1.0)).device == pytest.approx(45.0)


_usages = st.builds(
    Usage,
    *(st.floats(0, 1e6) for _ in range(2)), st.integers(0, 100),
    *(st.floats(0, 1e6) for _ in range(2)), st.integers(0, 100),
    st.floats(0, 1e6), st.integers(0, 10**12), st.integers(0, 10**12),
)  # fmt: skip


@given(_usages, _usages)
def test_the_bill_of_a_sum_is_the_sum_of_the_bills(a: Usage, b: Usage) -> None:
    assert cost(a + b, PRICES).total == pytest.approx(cost(a, PRICES).total + cost(b, PRICES).total)
    assert total([a, b]) == a + b
    assert cost(a, PRICES).total >= 0


def test_a_price_file_changes_only_the_rates_it_names(tmp_path: Path) -> None:
    path = tmp_path / "prices.toml"
    path.write_text("executor_gpu_second = 0.001\ngb_down = 0\n")
    prices = load_prices(path)
    assert (prices.executor_gpu_second, prices.gb_down) == (0.001, 0.0)
    assert prices.executor_gb_second == Prices().executor_gb_second


@pytest.mark.parametrize(
    ("text", "named"),
    [
        ("gpu_second = 0.1\n", "'gpu_second'"),
        ("gb_down = -0.5\n", "gb_down"),
        ("executor_gb_second = inf\n", "executor_gb_second"),
        ("executor_invocation = 'free'\n", "executor_invocation"),
        ("gb_up = \n", "not TOML"),
    ],
)
def test_a_bad_price_file_is_refused_naming_the_key(tmp_path: Path, text: str, named: str) -> None:
    path = tmp_path / "prices.toml"
    path.write_text(text)
    with pytest.raises(PriceError) as caught:
        load_prices(path)
    assert named in str(caught.value)
    assert "\n" not in str(caught.value)


EDGE = Cost("edge", fixed_s=2, per_step_s=0.1, price=0.0, price_per_s=0.01)  # 100 steps: 12 s, 0.12
GPU_CHEAP = Cost("gpu-a", fixed_s=5, per_step_s=0.05, price=0.1, price_per_s=0.01)  # 10 s: 0.2
GPU_DEAR = Cost("gpu-b", fixed_s=2, per_step_s=0.01, price=0.5, price_per_s=0.1)  # 3 s: 0.8


def test_within_the_deadline_the_cheapest_executor_within_the_budget_wins() -> None:
    always = OffloadSetting.ALWAYS
    assert place(Situation(always, 60, 100, EDGE, (GPU_DEAR, GPU_CHEAP))).target == "gpu-a"
    # gpu-a misses a 6 s deadline: the dearer one is taken, unless the budget forbids it.
    assert place(Situation(always, 6, 100, EDGE, (GPU_DEAR, GPU_CHEAP))).target == "gpu-b"
    over = place(Situation(always, 6, 100, EDGE, (GPU_DEAR, GPU_CHEAP), max_cost=0.5))
    assert over.kind is Kind.FEWER_STEPS  # the device, with the steps 6 s allow


def test_past_the_budget_the_device_trains_fewer_steps_or_skips() -> None:
    never = OffloadSetting.NEVER
    fewer = place(Situation(never, 60, 100, EDGE, max_cost=0.07))  # 0.02 + 0.001 a step
    assert (fewer.kind, fewer.steps) == (Kind.FEWER_STEPS, 50)
    assert "budget" in fewer.reason
    assert fewer.weight == pytest.approx(0.5)
    skipped = on_device(Situation(never, 60, 100, EDGE, max_cost=0.01))
    assert skipped.kind is Kind.SKIP
    assert "budget" in skipped.reason
    assert place(Situation(never, 60, 100, EDGE, max_cost=math.inf)).kind is Kind.EDGE


def test_steps_within_budget_never_exceeds_the_round_nor_goes_negative() -> None:
    assert steps_within_budget(EDGE, 100.0, 100) == 100
    assert steps_within_budget(EDGE, 0.0, 100) == 0
    free = Cost("edge", 2, 0.1, price=1.0)
    assert steps_within_budget(free, 0.5, 100) == 0  # the fixed price alone is past the budget


def test_the_planner_prices_targets_from_the_price_table() -> None:
    gpu = ExecutorTarget("gpu", "https://gpu")
    info = RoundInfo(round=1, state=RoundState.OPEN, model_sha256="0" * 64, task="digits")
    prices = Prices(executor_invocation=1.0, executor_gb_second=0.0, executor_gpu_second=0.0)
    always = OffloadSetting.ALWAYS
    assert Placer(always, (gpu,), GB, prices=prices).decide(info, 100, 0, free=GB).kind is Kind.OFFLOAD
    capped = Placer(always, (gpu,), GB, prices=prices, max_cost=0.5)
    assert capped.decide(info, 100, 0, free=GB).kind is Kind.EDGE  # the executor's invocation alone is 1.0
