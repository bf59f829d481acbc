"""``fedge simulate --backend ray`` on a real two-node Ray cluster on loopback: one CPU per node, so the two
client actors must land one on each node, and both nodes' clients reach the real server over mutual TLS."""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path

import loopback
import pytest
from conftest import free_port
from test_simulate import run_cli


@pytest.fixture
def ray_cluster() -> Iterator[str]:
    """A head and a second node, each of one CPU (``loopback.ray_cluster``)."""
    if not loopback.RAY.exists():
        if os.environ.get("CI"):
            pytest.fail("ray is not installed (the bench extra brings it)")
        pytest.skip("ray is not installed (pip install 'fedge[ray]')")
    with loopback.ray_cluster() as address:
        yield address


def test_a_federation_runs_on_both_nodes_of_a_ray_cluster(ray_cluster: str, tmp_path: Path) -> None:
    out = tmp_path / "run"
    done = run_cli(
        "simulate", "--backend", "ray", "--ray-address", ray_cluster, "--workers", "2", "--clients", "4",
        "--rounds", "2", "--local-epochs", "0", "--dataset", "digits", "--out", str(out),
        cwd=tmp_path,  # Ray puts the driver's cwd on workers' path: the tree's fedge/ shadows the wheel
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    metrics = json.loads((out / "metrics.json").read_text())
    assert [r["updates"] for r in metrics["rounds"]] == [4, 4]
    assert len(metrics["nodes"]) == 2  # each node's actor ran invocations
    assert all(count >= 4 for count in metrics["nodes"].values())  # 2 clients x 2 rounds each, at least


def test_without_ray_the_backend_is_refused_in_one_line(tmp_path: Path) -> None:
    done = run_cli("simulate", "--backend", "nowhere", "--out", str(tmp_path / "run"))
    assert done.returncode != 0
    assert "unknown backend 'nowhere'" in done.stderr
    assert "Traceback" not in done.stderr


def test_a_ray_address_nothing_answers_at_is_one_line_not_a_wait(tmp_path: Path) -> None:
    if not loopback.RAY.exists() and not os.environ.get("CI"):
        pytest.skip("ray is not installed (pip install 'fedge[ray]')")
    done = run_cli(
        "simulate", "--backend", "ray", "--ray-address", f"127.0.0.1:{free_port()}", "--clients", "2",
        "--dataset", "digits", "--out", str(tmp_path / "run"),
    )  # fmt: skip
    assert done.returncode == 1
    assert "no Ray cluster answers at 127.0.0.1:" in done.stderr
    assert "Traceback" not in done.stderr
