"""``fedge simulate`` end to end: a server process, mutual TLS, warm client functions, real MNIST."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from fedge.client.policy import OffloadSetting
from fedge.codec import decode
from fedge.edge_functions import datasets, partition
from fedge.security.offload import encode_shard
from fedge.sim.profiles import assign, load


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


def test_profiled_devices_offload_skip_and_drop_out_and_the_run_accounts_for_each(tmp_path: Path) -> None:
    """Four devices: one memory-starved whose owner allows offload (the executor process trains for it),
    one memory-starved whose owner does not (it skips: its data never leaves), one that is always gone,
    one ordinary. The report counts every client-round where it ran and the raw bytes that left."""
    profile = tmp_path / "devices.toml"
    profile.write_text(
        '[default]\noffload = "never"\n\n'
        '[[group]]\nshare = 0.25\nmemory_mb = 16\noffload = "when-short"\n\n'
        "[[group]]\nshare = 0.25\nmemory_mb = 16\n\n"
        "[[group]]\nshare = 0.25\ndropout = 1.0\n"
    )
    done = run_cli(
        "simulate", "--dataset", "digits", "--partition", "iid", "--clients", "4", "--rounds", "2",
        "--round-timeout", "25", "--profile", str(profile), "--out", str(tmp_path / "run"),
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    expected = {"edge": 2, "offload:executor-0": 2, "skip": 2, "dropout": 2}
    assert metrics["placements"] == expected, done.stderr
    assert (metrics["asked"], metrics["arrived"], metrics["completion_rate"]) == (8, 4, 0.5)
    assert [r["updates"] for r in metrics["rounds"]] == [2, 2]

    profiles = assign(load(profile), 4, seed=0)
    (offloader,) = [i for i, p in enumerate(profiles) if p.offload is OffloadSetting.WHEN_SHORT]
    data = datasets.load("digits")
    mine = partition.split(data.y_train, 4, "iid", 0)[offloader]
    shard = encode_shard(data.x_train[mine], data.y_train[mine])  # the plaintext sealed to the executor
    assert metrics["raw_bytes_offloaded"] == 2 * len(shard)
    assert "updates arrived before the deadline: 4 of 8" in done.stdout
    assert "raw data offloaded" in done.stdout


def test_a_bad_profile_is_one_line_and_no_run(tmp_path: Path) -> None:
    profile = tmp_path / "devices.toml"
    profile.write_text("[default]\nslowdown = 0.5\n")
    done = run_cli("simulate", "--profile", str(profile), "--out", str(tmp_path / "run"))
    assert done.returncode == 1
    assert "default.slowdown" in done.stderr
    assert "Traceback" not in done.stderr
    assert not (tmp_path / "run").exists()
    both = run_cli("simulate", "--profile", str(profile), "--buffer", "2", "--out", str(tmp_path / "run"))
    assert both.returncode == 1
    assert "Traceback" not in both.stderr
