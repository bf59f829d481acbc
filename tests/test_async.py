"""Asynchronous federation end to end: stragglers do not hold versions back, and their late work counts."""

from __future__ import annotations

import json
from pathlib import Path

from test_simulate import run_cli

from fedge.codec import decode


def test_an_async_run_with_stragglers_keeps_making_versions_and_folds_their_stale_updates(
    tmp_path: Path,
) -> None:
    # Two of four clients lag 1.5 s before sending; a version needs 3 updates from different clients, so
    # every version takes a straggler's update, which by then was trained from an older version.
    done = run_cli(
        "simulate", "--dataset", "digits", "--partition", "iid", "--clients", "4", "--rounds", "4",
        "--local-epochs", "2", "--lr", "0.1", "--workers", "3", "--buffer", "3", "--max-staleness", "10",
        "--stragglers", "0.5", "--straggler-delay", "1.5", "--out", str(tmp_path),
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    rounds = metrics["rounds"]
    assert len(metrics["stragglers"]) == 2
    assert rounds[-1]["round"] == 4
    assert decode((tmp_path / "model.safetensors").read_bytes())[1]["round"] == "4"
    assert sum(r["stale_updates"] for r in rounds) > 0
    assert rounds[-1]["accuracy"] > 0.85
    # What the server refused: second updates to one version, and stragglers that finished too late.
    assert set(metrics["refused"]) <= {"duplicate_update", "round_closed", "too_stale"}
