"""Each strategy against Flower's own computation on the same small inputs (flwr is the reference)."""

from __future__ import annotations

import math
import tracemalloc
from pathlib import Path

import numpy as np
import pytest
from flwr.common import Code, FitRes, Status, ndarrays_to_parameters, parameters_to_ndarrays
from flwr.server.strategy import (
    DifferentialPrivacyServerSideFixedClipping,
    FedAdagrad,
    FedAdam,
    FedAvg,
    FedYogi,
)
from flwr.server.strategy.aggregate import (
    aggregate_bulyan,
    aggregate_krum,
    aggregate_median,
    aggregate_trimmed_avg,
)

from fedge.codec import Tensors, encode, mapped
from fedge.server import aggregation
from fedge.server.strategies import StrategyError, Weighted, create, dp, robust
from fedge.wire import TrainConfig

NAMES = ("conv.weight", "fc.bias", "fc.weight")


def random_model(rng: np.random.Generator, scale: float = 1.0) -> Tensors:
    return {
        "conv.weight": rng.normal(0, scale, (4, 3, 3)).astype(np.float32),
        "fc.bias": rng.normal(0, scale, 7).astype(np.float32),
        "fc.weight": rng.normal(0, scale, (50, 60)).astype(np.float32),  # several slices below
    }


def layers(tensors: Tensors) -> list[np.ndarray]:
    return [tensors[n] for n in NAMES]


def stored(tmp_path: Path, updates: list[Tensors], weights: list[int]) -> list[Weighted]:
    """Updates as the store hands them to strategies: one safetensors file each, memory-mapped."""
    records = []
    for i, (update, weight) in enumerate(zip(updates, weights, strict=True)):
        path = tmp_path / f"client-{i}.safetensors"
        path.write_bytes(encode(update, {"num_examples": str(weight)}))
        records.append((mapped(path), weight))
    return records


def run_round(strategy, round_, model, updates, records):
    """What the federation does with a strategy in one round."""
    mean = None
    if strategy.streaming:
        acc = aggregation.start(model)
        for update, (_, num_examples) in zip(updates, records, strict=True):
            aggregation.fold(acc, strategy.prepare(update, model), float(num_examples))
        mean = aggregation.average(acc, model)
    return strategy.aggregate(round_, model, mean, records)


def fit_results(updates: list[Tensors], weights: list[int]) -> list:
    return [
        (None, FitRes(Status(Code.OK, ""), ndarrays_to_parameters(layers(u)), w, {}))
        for u, w in zip(updates, weights, strict=True)
    ]


def assert_same(ours: Tensors, reference: list[np.ndarray], rtol: float = 1e-5, atol: float = 1e-6) -> None:
    for name, theirs in zip(NAMES, reference, strict=True):
        np.testing.assert_allclose(ours[name], theirs, rtol=rtol, atol=atol)
        assert ours[name].shape == theirs.shape


@pytest.fixture(autouse=True)
def small_slices(monkeypatch) -> None:
    """Force every tensor of the robust strategies through several memory-mapped slices."""
    monkeypatch.setattr(robust, "SLICE_BYTES", 1)


@pytest.mark.parametrize(
    ("name", "flower"),
    [("fedadam", FedAdam), ("fedyogi", FedYogi), ("fedadagrad", FedAdagrad)],
)
def test_server_optimizers_match_flower_over_rounds(tmp_path: Path, name: str, flower) -> None:
    rng = np.random.default_rng(1)
    model = random_model(rng)
    reference = flower(initial_parameters=ndarrays_to_parameters(layers(model)))
    ours = create(name)
    for round_ in (1, 2, 3):
        weights = [int(w) for w in rng.integers(1, 100, 5)]
        updates = [
            {k: v + rng.normal(0, 0.1, v.shape).astype(np.float32) for k, v in model.items()} for _ in weights
        ]
        model = run_round(ours, round_, model, updates, stored(tmp_path, updates, weights))
        theirs, _ = reference.aggregate_fit(round_, fit_results(updates, weights), [])
        # Our mean is summed in float64, Flower's in float32; a tiny pseudo-gradient magnifies the difference.
        assert_same(model, parameters_to_ndarrays(theirs), rtol=1e-4, atol=2e-5)
    assert set(ours.state()) == {f"{p}/{n}" for p in "mv" for n in NAMES}


def test_a_server_optimizer_restored_from_its_state_continues_identically(tmp_path: Path) -> None:
    rng = np.random.default_rng(2)
    model = random_model(rng)
    updates = [random_model(rng) for _ in range(3)]
    records = stored(tmp_path, updates, [1, 2, 3])
    first = create("fedadam")
    after_one = run_round(first, 1, model, updates, records)
    restarted = create("fedadam")
    restarted.load_state(first.state())
    continued = run_round(first, 2, after_one, updates, records)
    np.testing.assert_array_equal(
        run_round(restarted, 2, after_one, updates, records)["fc.weight"], continued["fc.weight"]
    )
    # Without its moments, a fresh optimizer takes a different step: the state matters.
    fresh = run_round(create("fedadam"), 2, after_one, updates, records)
    assert not np.array_equal(fresh["fc.weight"], continued["fc.weight"])


def test_fedprox_averages_like_fedavg_and_hands_clients_the_proximal_term(tmp_path: Path) -> None:
    rng = np.random.default_rng(3)
    model = random_model(rng)
    updates, weights = [random_model(rng) for _ in range(4)], [5, 1, 9, 2]
    records = stored(tmp_path, updates, weights)
    prox = create("fedprox", {"proximal_mu": 0.1})
    assert prox.configure(TrainConfig()).proximal_mu == 0.1
    theirs, _ = FedAvg().aggregate_fit(1, fit_results(updates, weights), [])
    assert_same(run_round(prox, 1, model, updates, records), parameters_to_ndarrays(theirs))
    with pytest.raises(StrategyError, match="proximal-mu"):
        create("fedprox")


def test_dp_fedavg_clips_like_flower_and_adds_noise_of_flowers_deviation(tmp_path: Path) -> None:
    rng = np.random.default_rng(4)
    model = random_model(rng)
    updates = [
        {k: v + rng.normal(0, s, v.shape).astype(np.float32) for k, v in model.items()} for s in (0.01, 1, 3)
    ]
    weights = [10, 10, 10]
    records = stored(tmp_path, updates, weights)

    noiseless = create("dp-fedavg", {"clip_norm": 2.0, "noise_multiplier": 0.0})
    reference = DifferentialPrivacyServerSideFixedClipping(
        FedAvg(), noise_multiplier=0.0, clipping_norm=2.0, num_sampled_clients=3
    )
    reference.current_round_params = layers(model)
    theirs, _ = reference.aggregate_fit(1, fit_results(updates, weights), [])
    clean = run_round(noiseless, 1, model, updates, records)
    assert_same(clean, parameters_to_ndarrays(theirs))

    noisy = create("dp-fedavg", {"clip_norm": 2.0, "noise_multiplier": 1.5}, seed=7)
    first = run_round(noisy, 1, model, updates, records)
    noise = np.concatenate([(first[n] - clean[n]).ravel() for n in NAMES])
    expected = 1.5 * 2.0 / 3  # flwr's compute_stdv(noise_multiplier, clipping_norm, clients)
    assert abs(noise.std() / expected - 1) < 0.1
    # Seeded by round: a resumed round adds the same noise, the next round different noise.
    np.testing.assert_array_equal(
        run_round(noisy, 1, model, updates, records)["fc.weight"], first["fc.weight"]
    )
    assert not np.array_equal(run_round(noisy, 2, model, updates, records)["fc.weight"], first["fc.weight"])


def test_privacy_spent_follows_the_gaussian_mechanisms_rdp_bound() -> None:
    for sigma, rounds, delta in [(1.0, 1, 1e-5), (2.0, 10, 1e-5), (0.8, 50, 1e-6)]:
        # Closed form of the same bound with alpha unrestricted.
        closed = rounds / (2 * sigma**2) + math.sqrt(2 * rounds * math.log(1 / delta)) / sigma
        assert dp.gaussian_epsilon(sigma, rounds, delta) == pytest.approx(closed, rel=2e-3)
    assert dp.gaussian_epsilon(1.0, 20, 1e-5) > dp.gaussian_epsilon(1.0, 10, 1e-5)
    private = create("dp-fedavg", {"noise_multiplier": 1.0})
    assert float(private.metadata(3)["dp_epsilon"]) == pytest.approx(dp.gaussian_epsilon(1.0, 3, 1e-5), 1e-5)


@pytest.mark.parametrize(
    ("name", "params", "reference"),
    [
        ("fedmedian", {}, aggregate_median),
        ("trimmed-mean", {"trim_fraction": 0.2}, lambda r: aggregate_trimmed_avg(r, 0.2)),
        ("trimmed-mean", {"trim_fraction": 0.0}, lambda r: aggregate_trimmed_avg(r, 0.0)),
        ("krum", {"malicious": 2}, lambda r: aggregate_krum(r, 2, 0)),
        ("krum", {"malicious": 1, "keep": 4}, lambda r: aggregate_krum(r, 1, 4)),
        ("bulyan", {"malicious": 2}, lambda r: aggregate_bulyan(r, 2, aggregate_krum, to_keep=0)),
    ],
    ids=["median", "trimmed-mean", "trimmed-nothing", "krum", "multi-krum", "bulyan"],
)
def test_robust_strategies_match_flower_reading_updates_from_disk(
    tmp_path: Path, name: str, params: dict[str, float], reference
) -> None:
    rng = np.random.default_rng(5)
    model = random_model(rng)
    honest = [
        {k: v + rng.normal(0, 0.1, v.shape).astype(np.float32) for k, v in model.items()} for _ in range(9)
    ]
    attackers = [random_model(rng, scale=20.0) for _ in range(2)]
    updates = honest + attackers
    weights = [int(w) for w in rng.integers(1, 50, len(updates))]
    strategy = create(name, params)
    assert not strategy.streaming
    ours = run_round(strategy, 1, model, updates, stored(tmp_path, updates, weights))
    assert_same(ours, reference([(layers(u), w) for u, w in zip(updates, weights, strict=True)]))
    assert all(ours[n].dtype == np.float32 for n in NAMES)


def test_bulyan_refuses_fewer_updates_than_its_assumption_allows(tmp_path: Path) -> None:
    rng = np.random.default_rng(6)
    bulyan = create("bulyan", {"malicious": 1})
    assert bulyan.min_updates() == 7
    updates = [random_model(rng) for _ in range(6)]
    with pytest.raises(StrategyError, match="at least 7"):
        run_round(bulyan, 1, random_model(rng), updates, stored(tmp_path, updates, [1] * 6))


def test_robust_strategies_hold_a_slice_not_every_update_in_memory(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setattr(robust, "SLICE_BYTES", 2 * 2**20)
    size = 500_000  # 2 MB per update, 40 MB for 20
    model = {"w": np.zeros(size, np.float32)}
    rng = np.random.default_rng(7)
    updates = [{"w": rng.normal(0, 1, size).astype(np.float32)} for _ in range(20)]
    records = stored(tmp_path, updates, [1] * 20)
    del updates
    tracemalloc.start()
    result = create("trimmed-mean").aggregate(1, model, None, records)
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert peak < 15 * 2**20, f"peak {peak / 2**20:.1f} MiB for 40 MiB of updates"
    assert abs(float(result["w"].mean())) < 0.01


@pytest.mark.parametrize(
    ("name", "params", "fragment"),
    [
        ("fedsgd", {}, "unknown strategy 'fedsgd'"),
        ("trimmed-mean", {"trim_fraction": 0.5}, "trim-fraction"),
        ("dp-fedavg", {"clip_norm": 0.0}, "clip-norm"),
        ("krum", {"malicious": -1}, "malicious"),
    ],
)
def test_bad_strategy_settings_are_refused_with_the_reason(
    name: str, params: dict[str, float], fragment: str
) -> None:
    with pytest.raises(StrategyError, match=fragment):
        create(name, params)
