"""Agents that decide where their round runs: a memory-starved device whose owner allows offload sends its
round, sealed, to a real executor process; one whose owner said ``--offload never`` skips instead."""

from __future__ import annotations

import re
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import client_data, free_port, wait_for

from fedge.security import pki

STARVED = ("--train-memory-mb", str(2**40))  # far more than any machine has free: the device cannot train


def test_a_starved_device_offloads_only_when_its_owner_allows(
    make_pki, start_task_server, start_executor, start_agent, tmp_path: Path
) -> None:
    pki_dir = make_pki("alice", "bob")
    pki.issue(pki_dir, pki.Role.EXECUTOR, "gpu-1", hosts=("127.0.0.1",))
    server = start_task_server(pki_dir, "--rounds", "1")
    executor = start_executor(pki_dir, "gpu-1", server.url)
    alice_data, bob_data = client_data(tmp_path, 2)
    allowed = ("--executor", f"gpu-1={executor.url}", "--poll-wait", "2", *STARVED)
    alice = start_agent(pki_dir, "alice", alice_data, server.url, "--offload", "when-short", *allowed)
    bob = start_agent(pki_dir, "bob", bob_data, server.url, "--offload", "never", *allowed)

    alice_done = wait_for(
        lambda: "trained by executor" in alice.status().get("detail", "") and alice.status(),
        240,
        "alice's offloaded round",
    )
    bob_done = wait_for(lambda: bob.status().get("state") == "skipped" and bob.status(), 240, "bob to skip")
    assert alice_done["placements"] == {"offload:gpu-1": 1}
    assert "trained by executor gpu-1" in alice_done["detail"]
    assert alice_done["raw_bytes_offloaded"] > 0
    assert bob_done["placements"] == {"skip": 1}
    assert "out of memory" in bob_done["detail"]
    assert bob_done["raw_bytes_offloaded"] == 0
    with sqlite3.connect(server.data / "state.db") as db:
        assert db.execute("SELECT round, client, computed_by FROM updates").fetchall() == [
            (1, "alice", "gpu-1")
        ]
    assert "offload on gpu-1" in alice.log.read_text()
    assert "skip on None" in bob.log.read_text()
    # Before its first decision that could send data away, alice timed two short runs here; bob did not.
    assert "edge calibrated for digits: 2 steps in" in alice.log.read_text()
    assert "predicted {'edge': Prediction(compute_s=" in alice.log.read_text()  # the decision's inputs
    assert "calibrated" not in bob.log.read_text()
    # ...and on the executor it may use; its run is logged per component, the shard's upload included.
    assert "gpu-1 calibrated for digits: 2 steps in" in alice.log.read_text()
    assert "'gpu-1': Prediction(compute_s=" in alice.log.read_text()
    assert re.search(r"gpu-1 ran \d+ steps: actual Run\(.*bytes_shard=[1-9]", alice.log.read_text())
    shown = subprocess.run(
        [sys.executable, "-m", "fedge", "agent", "status", "--dir", str(alice.state_dir)],
        capture_output=True, text=True, timeout=120, check=True,
    ).stdout  # fmt: skip
    assert (
        f"1 offload:gpu-1; raw data sent (sealed) to executors: {alice_done['raw_bytes_offloaded']} bytes"
        in (" ".join(shown.split()))
    )


def test_a_failed_offload_is_trained_on_the_device_and_the_executor_sits_out_the_next_round(
    make_pki, start_task_server, start_executor, start_agent, tmp_path: Path
) -> None:
    """Alice's executor does not listen at all; bob's answers but cannot reach the server (502). Both owners
    prefer offload, yet every round's update reaches the server, computed on the device, and the second
    round does not try the executor that failed the first."""
    pki_dir = make_pki("alice", "bob")
    pki.issue(pki_dir, pki.Role.EXECUTOR, "gpu-2", hosts=("127.0.0.1",))
    server = start_task_server(pki_dir, "--rounds", "2")
    cut_off = start_executor(pki_dir, "gpu-2", f"https://127.0.0.1:{free_port()}")
    alice_data, bob_data = client_data(tmp_path, 2)
    common = ("--offload", "always", "--poll-wait", "2")
    alice = start_agent(
        pki_dir,
        "alice",
        alice_data,
        server.url,
        *common,
        "--executor",
        f"gpu-1=https://127.0.0.1:{free_port()}",
    )
    bob = start_agent(pki_dir, "bob", bob_data, server.url, *common, "--executor", f"gpu-2={cut_off.url}")

    def both_rounds_sent(agent):
        status = agent.status()
        return "sent the update of round 2" in status.get("detail", "") and status

    for agent, executor in ((alice, "gpu-1"), (bob, "gpu-2")):
        done = wait_for(lambda agent=agent: both_rounds_sent(agent), 300, f"{agent.state_dir.name}'s rounds")
        assert done["placements"] == {"fallback:edge": 1, "edge": 1}
        assert done["raw_bytes_offloaded"] == 0
        assert done["fallback"].startswith(f"round 1: offload to {executor} failed (")
        assert done["fallback"].endswith("device: edge fits")
        log = agent.log.read_text()
        assert f"round 1: {executor} failed, fell back to edge on edge" in log
        assert "round 2: edge on edge" in log  # the failed executor sat the second round out
        # The device's update upload is timed, and the second decision predicts it.
        assert re.search(r"edge ran \d+ steps: actual Run\(.*bytes_up=[1-9]\d*, upload_s=", log)
        assert re.search(r"round 2: .*'edge': Prediction\(.*upload_s=(?!0\.0,)", log)
    assert "server_unreachable" in bob.status()["fallback"]
    with sqlite3.connect(server.data / "state.db") as db:
        rows = db.execute("SELECT round, client, computed_by FROM updates ORDER BY 1, 2").fetchall()
    assert rows == [(1, "alice", ""), (1, "bob", ""), (2, "alice", ""), (2, "bob", "")]
    shown = subprocess.run(
        [sys.executable, "-m", "fedge", "agent", "status", "--dir", str(alice.state_dir)],
        capture_output=True, text=True, timeout=120, check=True,
    ).stdout  # fmt: skip
    assert "1 edge, 1 fallback:edge" in " ".join(shown.split())
    assert "last fallback: round 1: offload to gpu-1 failed" in " ".join(shown.split())


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (("--offload", "sometimes"), "invalid value for offload"),
        (("--offload", "when-short", "--executor", "gpu-1"), "--executor takes ID=https://HOST:PORT"),
        (("--executor", "gpu-1=http://plain:80"), "--executor takes ID=https://HOST:PORT"),
    ],
)
def test_bad_offload_flags_are_one_line_errors(make_pki, tmp_path: Path, flags: tuple, message: str) -> None:
    pki_dir = make_pki("alice")
    creds = pki.credentials(pki_dir, pki.Role.CLIENT, "alice")
    (data,) = client_data(tmp_path, 1)
    args = ["--dir", str(tmp_path / "state"), "--data", str(data), "--server", "https://127.0.0.1:1"]
    args += ["--ca", str(creds.ca), "--cert", str(creds.cert), "--key", str(creds.key), *flags]
    run = subprocess.run(
        [sys.executable, "-m", "fedge", "agent", "run", *args], capture_output=True, text=True, timeout=120
    )
    assert run.returncode == 1
    assert message in " ".join(run.stderr.split())
    assert "Traceback" not in run.stderr
