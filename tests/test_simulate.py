"""``fedge simulate`` end to end: a server process, mutual TLS, warm client functions, real MNIST."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from fedge.codec import decode


def run_cli(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "fedge", *args],
        capture_output=True,
        text=True,
        timeout=600,
        cwd=cwd,
        check=False,
    )


def test_the_default_demo_learns_mnist_over_mutual_tls(tmp_path: Path) -> None:
    """The README's demo as a user runs it: MNIST, Dirichlet 0.5, 10 clients, 10 rounds, 1 local epoch."""
    done = run_cli("simulate", "--out", str(tmp_path / "run"))
    assert done.returncode == 0, done.stderr

    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    rounds = metrics["rounds"]
    assert [r["round"] for r in rounds] == list(range(1, 11))
    assert all(r["updates"] == 10 for r in rounds)
    assert rounds[-1]["accuracy"] >= 0.90
    assert rounds[-1]["accuracy"] > rounds[0]["accuracy"] + 0.3
    assert all(r["bytes_up"] > 0 and r["seconds"] > 0 for r in rounds)
    # Warm workers keep the model by ETag: a round downloads it at most once per worker, not per client.
    assert all(r["bytes_down"] < r["bytes_up"] / 2 for r in rounds)
    assert metrics["settings"]["partition"] == "dirichlet:0.5"

    tensors, metadata = decode((tmp_path / "run" / "model.safetensors").read_bytes())
    assert metadata == {"round": "10", "task": "mnist"}
    assert tensors["0.weight"].shape == (6, 1, 5, 5)
    assert (tmp_path / "run" / "accuracy.png").read_bytes().startswith(b"\x89PNG")
    assert "round" in done.stdout
    assert "accuracy" in done.stdout


def test_digits_with_an_iid_partition_and_more_local_epochs(tmp_path: Path) -> None:
    done = run_cli(
        "simulate", "--dataset", "digits", "--partition", "iid", "--clients", "4", "--rounds", "3",
        "--local-epochs", "2", "--workers", "1", "--out", str(tmp_path),
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    rounds = json.loads((tmp_path / "metrics.json").read_text())["rounds"]
    assert [r["updates"] for r in rounds] == [4, 4, 4]
    assert rounds[-1]["accuracy"] > 0.8
