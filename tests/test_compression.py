"""Compressed updates: what a client saves in bytes, what the server restores, and what it costs."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from conftest import submit, toy_model
from test_simulate import run_cli

from fedge import compression
from fedge.codec import encode
from fedge.compression import CompressionError, compress, decompress
from fedge.server.errors import Rejected
from fedge.server.rounds import Federation, FederationSettings
from fedge.server.store import Store


def model_and_update(seed: int = 0) -> tuple[dict, dict]:
    rng = np.random.default_rng(seed)
    base = {"w": rng.normal(0, 1, (200, 50)).astype(np.float32), "b": rng.normal(0, 1, 50).astype(np.float32)}
    trained = {k: v + rng.normal(0, 0.01, v.shape).astype(np.float32) for k, v in base.items()}
    return base, trained


@pytest.mark.parametrize(("kind", "ratio"), [("float16", 0.5), ("int8", 0.25)])
def test_compression_shrinks_an_update_and_restores_it_within_its_precision(kind: str, ratio: float) -> None:
    base, trained = model_and_update()
    sent, how = compress(trained, base, kind)
    metadata = how.to_metadata()
    full = len(encode(trained))
    assert len(encode(sent, metadata)) < full * ratio * 1.05
    restored = decompress(sent, metadata, base)
    for name in base:
        assert restored[name].dtype == np.float32
        change = np.abs(trained[name] - base[name]).max()
        # float16: relative precision of the weights; int8: half a step of the change's scale.
        bound = 1e-3 * np.abs(trained[name]).max() if kind == "float16" else change / 127 / 2 + 1e-6
        assert np.abs(restored[name] - trained[name]).max() <= bound


def test_a_body_with_broken_scales_is_refused() -> None:
    base, trained = model_and_update()
    sent, how = compress(trained, base, "int8")
    metadata = how.to_metadata()
    with pytest.raises(CompressionError, match="int8_scales"):
        decompress(sent, {**metadata, "int8_scales": "not json"}, base)
    with pytest.raises(CompressionError, match="unknown compression"):
        decompress(sent, {"compression": "zip"}, base)


def test_the_server_restores_compressed_updates_before_validating_storing_and_folding(tmp_path: Path) -> None:
    clients = ["alice", "bob", "carol"]
    fed = Federation(
        Store(tmp_path),
        FederationSettings(federation="test", task="toy", rounds=2),
        registered_clients=lambda: clients,
        initial_model=encode(toy_model(1.0)),
    )
    fed.tick()
    base = fed.model.tensors
    quantized, _ = compress(toy_model(2.0), base, "int8")
    broken = encode(quantized, {"num_examples": "10", "compression": "int8"})  # without its scales
    with pytest.raises(Rejected) as refused:
        submit(fed, 1, "alice", broken)
    assert refused.value.code == "bad_compression"
    assert Store(tmp_path).updates(1) == []
    for client, kind, value in [("alice", "int8", 2.0), ("bob", "float16", 3.0), ("carol", "none", 4.0)]:
        sent, how = compress(toy_model(value), base, kind)
        submit(fed, 1, client, encode(sent, {"num_examples": "10", **how.to_metadata()}))
    np.testing.assert_allclose(fed.model.tensors["layer.weight"], 3.0, rtol=1e-3)
    stored = Store(tmp_path).updates(1)
    assert {u.path.stat().st_size for u in stored} == {len(encode(toy_model(), {"num_examples": "10"}))}


def test_simulate_reports_the_bytes_and_accuracy_of_compressed_updates(tmp_path: Path) -> None:
    runs = {}
    for kind in compression.KINDS:
        done = run_cli(
            "simulate", "--dataset", "digits", "--partition", "iid", "--clients", "4", "--rounds", "3",
            "--local-epochs", "2", "--lr", "0.1", "--workers", "2", "--compression", kind,
            "--out", str(tmp_path / kind),
        )  # fmt: skip
        assert done.returncode == 0, done.stderr
        assert f"({kind} compression)" in done.stdout
        runs[kind] = json.loads((tmp_path / kind / "metrics.json").read_text())["rounds"]
    sent = {kind: sum(r["bytes_up"] for r in rounds) for kind, rounds in runs.items()}
    accuracy = {kind: rounds[-1]["accuracy"] for kind, rounds in runs.items()}
    assert sent["float16"] < 0.55 * sent["none"]
    assert sent["int8"] < 0.3 * sent["none"]
    assert accuracy["none"] > 0.85
    assert accuracy["float16"] >= accuracy["none"] - 0.02
    assert accuracy["int8"] >= accuracy["none"] - 0.03
