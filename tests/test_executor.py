"""The cloud executor end to end: a real server process, a real ``fedge executor`` process, over mTLS.

A client seals its shard to the executor's key and grants it one round; the executor trains and submits
in the client's slot, the server records the update as computed off-device, and the executor's working
directory and temp directory stay empty. Every job that is not exactly that is refused and changes nothing.
"""

from __future__ import annotations

import os
import sqlite3
import subprocess
import sys
from pathlib import Path

import httpx
import numpy as np
import pytest
import torch
from conftest import client_data
from test_service import open_round

from fedge.client.targets.executor import calibrate_executor, offload_round
from fedge.security import offload, pki
from fedge.security.tls import client_context
from fedge.transport import FedgeClient, ServerError
from fedge.wire import TrainConfig


def computed(server) -> list[tuple[int, str, str]]:
    with sqlite3.connect(server.data / "state.db") as db:
        return db.execute("SELECT round, client, computed_by FROM updates ORDER BY 1, 2").fetchall()


def billed(server) -> list[tuple]:
    with sqlite3.connect(server.data / "state.db") as db:
        return db.execute(
            "SELECT client, executor_invocations, executor_seconds, executor_gb_seconds, gpu_seconds,"
            " device_invocations, bytes_up, bytes_down FROM usage"
        ).fetchall()


def tree(directory: Path) -> list[str]:
    return sorted(str(p.relative_to(directory)) for p in directory.rglob("*"))


def open_files_under(pid: int, *roots: Path) -> list[str]:
    """Regular files the process holds open under ``roots`` (it must hold none)."""
    held = []
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        try:
            target = os.readlink(fd)
        except OSError:
            continue
        if any(target.startswith(str(root)) for root in roots):
            held.append(target)
    return held


def shard(path: Path) -> tuple[np.ndarray, np.ndarray]:
    with np.load(path, allow_pickle=False) as arrays:
        return arrays["x"].astype(np.float32), arrays["y"].astype(np.int64)


def test_an_offloaded_round_is_trained_by_the_executor_under_the_grant_and_leaves_nothing(
    make_pki, start_task_server, start_executor, tmp_path: Path
) -> None:
    pki_dir = make_pki("alice", "bob")
    for executor_id in ("gpu-1", "gpu-2"):
        subprocess.run(
            [sys.executable, "-m", "fedge", "pki", "executor-cert", "--dir", str(pki_dir),
             "--executor", executor_id, "--host", "127.0.0.1"],
            check=True, capture_output=True, timeout=120,
        )  # fmt: skip
    server = start_task_server(pki_dir, "--rounds", "1")
    executor = start_executor(pki_dir, "gpu-1", server.url)
    alice_creds, bob_creds = (pki.credentials(pki_dir, pki.Role.CLIENT, c) for c in ("alice", "bob"))
    alice_data = shard(client_data(tmp_path, 2)[0])
    config = TrainConfig(local_epochs=1)
    with FedgeClient(server.url, alice_creds) as alice, FedgeClient(server.url, bob_creds) as bob:
        r = open_round(alice).round
        gpu1 = ("gpu-1", executor.url)

        # The executor's key must be gpu-1's: a client expecting gpu-2 at that address refuses to send.
        with pytest.raises(offload.OffloadError, match="not executor 'gpu-2'"):
            offload_round(alice, alice_creds, ("gpu-2", executor.url), "digits", r, config, alice_data)

        with httpx.Client(base_url=executor.url, verify=client_context(alice_creds), timeout=120) as http:
            key = offload.verify_executor_key(
                alice_creds.ca.read_bytes(), "edge", "gpu-1", http.get("/v1/key").json()
            )
        sealed = offload.seal(
            key, offload.encode_shard(*alice_data), offload.shard_context("edge", r, "alice", "gpu-1")
        )
        job = {"task": "digits", "round": r, "config": config.model_dump(), "shard": sealed}
        valid = {**job, "grant": alice.grant(r, "gpu-1")}
        admin_creds = pki.credentials(pki_dir, pki.Role.ADMIN, "ops")
        gpu2_creds = pki.credentials(pki_dir, pki.Role.EXECUTOR, "gpu-2")
        refused = {
            "a grant for another executor": (
                alice_creds, {**job, "grant": alice.grant(r, "gpu-2")}, 403, "bad_grant"),
            "a grant for another round": (
                alice_creds, {**job, "grant": alice.grant(r + 1, "gpu-1")}, 403, "bad_grant"),
            "an expired grant": (
                alice_creds, {**job, "grant": alice.grant(r, "gpu-1", ttl=-1)}, 403, "bad_grant"),
            "alice's shard under bob's grant, sent by bob": (
                bob_creds, {**job, "grant": bob.grant(r, "gpu-1")}, 400, "bad_job"),
            "alice's valid job replayed by bob": (bob_creds, valid, 403, "not_grant_holder"),
            "alice's valid job sent by an admin": (admin_creds, valid, 403, "not_grant_holder"),
            "alice's valid job sent by another executor": (gpu2_creds, valid, 403, "not_grant_holder"),
            "a shard sealed for another round": (
                alice_creds,
                {**job, "round": r, "grant": alice.grant(r, "gpu-1"),
                 "shard": offload.seal(key, offload.encode_shard(*alice_data),
                                       offload.shard_context("edge", r + 1, "alice", "gpu-1"))},
                400, "bad_job"),
            "a shard altered in transit": (
                alice_creds,
                {**job, "grant": alice.grant(r, "gpu-1"),
                 "shard": {**sealed, "ciphertext": sealed["ciphertext"][:-8] + "AAAAAAA="}},
                400, "bad_job"),
            "no grant at all": (alice_creds, job, 400, "bad_job"),
        }  # fmt: skip
        for name, (sender, bad, status, code) in refused.items():
            with httpx.Client(base_url=executor.url, verify=client_context(sender), timeout=120) as http:
                response = http.post("/v1/jobs", json=bad)
            assert (response.status_code, response.json()["error"]) == (status, code), name
            assert computed(server) == [], name

        # The executor cannot submit for alice on its own: the server asks for her grant.
        gpu_creds = pki.credentials(pki_dir, pki.Role.EXECUTOR, "gpu-1")
        with FedgeClient(server.url, gpu_creds) as gpu, pytest.raises(ServerError, match="missing_grant"):
            gpu.post_update(r, b"not even a body")

        done = offload_round(alice, alice_creds, gpu1, "digits", r, config, alice_data, weight=0.5)
        assert done.result.client == "alice"
        assert done.result.device in ("cpu", "cuda")
        assert done.result.num_examples == round(len(alice_data[1]) * 0.5)
        assert done.result.bytes_down > 0
        assert done.result.bytes_up > 0
        assert done.job_bytes > done.raw_bytes  # sealed and base64: a third more than the raw examples
        assert done.raw_bytes >= alice_data[0].nbytes + alice_data[1].nbytes
        assert computed(server) == [(r, "alice", "gpu-1")]
        # What the job consumed is on the round's bill: one executor invocation, its seconds and memory
        # (GPU-seconds only on CUDA), the model it fetched and the update the server received.
        ((client, calls, seconds, gb_seconds, gpu_seconds, device_calls, up, down),) = billed(server)
        assert (client, calls, device_calls) == ("alice", 1, 0)
        assert 0 < seconds <= done.result.seconds
        assert gb_seconds > 0
        assert (gpu_seconds > 0) == (done.result.device == "cuda")
        assert (up, down) == (done.result.bytes_up, done.result.bytes_down)

        # One grant, one update: the same job again is refused by the server.
        with pytest.raises(ServerError, match="duplicate_update"):
            offload_round(alice, alice_creds, gpu1, "digits", r, config, alice_data)
    # On disk: only torch's compile-cache directory, empty and the process's own; gone once it stops.
    assert tree(executor.cwd) == []
    (scratch,) = tree(executor.tmp)
    assert scratch.startswith("fedge-executor-")
    assert tree(executor.tmp / scratch) == []
    assert open_files_under(executor.process.pid, tmp_path) == [str(executor.log)] * 2  # stdout, stderr
    executor.process.terminate()
    assert executor.process.wait(60) == 0
    assert tree(executor.tmp) == []


def test_an_executor_times_a_calibration_on_synthetic_inputs_for_any_client_of_the_federation(
    make_pki, start_executor, tmp_path: Path
) -> None:
    """No server is needed and no client data is sent: one example's shape and the number of classes."""
    pki_dir = make_pki("alice")
    pki.issue(pki_dir, pki.Role.EXECUTOR, "gpu-1", hosts=("127.0.0.1",))
    executor = start_executor(pki_dir, "gpu-1", "https://127.0.0.1:1")  # nothing listens there
    alice_creds = pki.credentials(pki_dir, pki.Role.CLIENT, "alice")
    alice_data = shard(client_data(tmp_path, 1)[0])
    config = TrainConfig(batch_size=16)

    small, large = calibrate_executor(alice_creds, ("gpu-1", executor.url), "digits", config, alice_data, 120)
    assert (small[0], large[0]) == (2, 8)
    assert 0 < small[1] < large[1]
    with pytest.raises(offload.OffloadError, match="not 'gpu-2'"):
        calibrate_executor(alice_creds, ("gpu-2", executor.url), "digits", config, alice_data, 120)

    request = {"task": "digits", "config": config.model_dump(), "shape": [1, 8, 8], "classes": 10}
    alice, ops = ("alice", pki.Role.CLIENT), ("ops", pki.Role.ADMIN)
    bad = "bad_calibration"
    refused = {
        "an admin": (ops, request, 403, "wrong_role"),
        "an unknown task": (alice, {**request, "task": "nope"}, 400, bad),
        "inputs the model cannot take": (alice, {**request, "shape": [3]}, 400, bad),
        "a long run": (alice, {**request, "steps": [2, 10_000]}, 400, bad),
        "a huge input": (alice, {**request, "shape": [10_000, 10_000]}, 400, bad),
    }  # fmt: skip
    for name, ((who, role), body, status, code) in refused.items():
        tls = client_context(pki.credentials(pki_dir, role, who))
        with httpx.Client(base_url=executor.url, verify=tls, timeout=120) as http:
            response = http.post("/v1/calibrate", json=body)
        assert (response.status_code, response.json()["error"]) == (status, code), name
    with httpx.Client(base_url=executor.url, verify=client_context(alice_creds), timeout=120) as http:
        answer = http.post("/v1/calibrate", json=request).json()
    assert answer["device"] == ("cuda" if torch.cuda.is_available() else "cpu")
    assert tree(executor.cwd) == []


def test_fedge_executor_refuses_a_missing_certificate_in_one_line(make_pki) -> None:
    pki_dir = make_pki("alice")
    run = subprocess.run(
        [
            sys.executable,
            "-m",
            "fedge",
            "executor",
            "--pki",
            str(pki_dir),
            "--id",
            "nobody",
            "--server",
            "https://x",
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert run.returncode != 0
    assert "no executor certificate 'nobody'" in " ".join(run.stderr.split())
    assert "Traceback" not in run.stderr


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_fit_trains_on_the_gpu_and_hands_back_cpu_tensors() -> None:
    from fedge.edge_functions import datasets, tasks
    from fedge.edge_functions.functions import fit

    digits = datasets.load("digits")
    model = tasks.get("digits").build_model()
    before = tasks.tensors_of(model)
    loss = fit(model, digits.x_train[:256], digits.y_train[:256], TrainConfig(), torch.device("cuda"))
    assert next(model.parameters()).is_cuda
    after = tasks.tensors_of(model)
    assert np.isfinite(loss)
    assert any(not np.array_equal(before[name], after[name]) for name in before)
