"""Model poisoning end to end: ``fedge simulate --attack`` makes clients malicious, robust strategies hold."""

from __future__ import annotations

import json
from pathlib import Path

from test_simulate import run_cli

# Digits, IID over 10 clients, long enough local training that a clean run converges in a few rounds.
COMMON = (
    "simulate", "--dataset", "digits", "--partition", "iid", "--clients", "10", "--rounds", "4",
    "--local-epochs", "2", "--lr", "0.1", "--workers", "2",
)  # fmt: skip
ATTACK = ("--attack", "sign-flip", "--attackers", "0.2")


def final_accuracy(out: Path, *flags: str) -> tuple[float, dict]:
    done = run_cli(*COMMON, "--out", str(out), *flags)
    assert done.returncode == 0, done.stderr
    metrics = json.loads((out / "metrics.json").read_text())
    return metrics["rounds"][-1]["accuracy"], metrics


def test_sign_flip_attackers_break_fedavg_but_not_trimmed_mean_or_krum(tmp_path: Path) -> None:
    clean, _ = final_accuracy(tmp_path / "clean")
    attacked, metrics = final_accuracy(tmp_path / "fedavg", *ATTACK)
    trimmed, _ = final_accuracy(tmp_path / "trimmed", *ATTACK, "--strategy", "trimmed-mean")
    krum, _ = final_accuracy(
        tmp_path / "krum", *ATTACK, "--strategy", "krum", "--malicious", "2", "--keep", "6"
    )

    assert len(metrics["attackers"]) == 2
    assert metrics["settings"]["attack"] == "sign-flip"
    assert clean > 0.85
    assert attacked < clean - 0.3, f"FedAvg under attack {attacked:.3f} vs clean {clean:.3f}"
    assert trimmed >= clean - 0.03, f"trimmed mean under attack {trimmed:.3f} vs clean {clean:.3f}"
    assert krum >= clean - 0.03, f"Multi-Krum under attack {krum:.3f} vs clean {clean:.3f}"
