"""The container runtime (``edge_functions.containers``) on a real Docker daemon and the real agent image: the
same results as worker processes, what a container can see, crashes, hangs, keep-alive, limits, and an
agent that trains its rounds with ``--runtime container``.

``FEDGE_IMAGE`` names another image to run (one layered on the agent image with this tree's wheel);
without Docker, a developer's machine skips these with a reason and CI fails them (``require_docker``).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import struct
from collections.abc import Iterator
from pathlib import Path

import docker
import docker.errors
import httpx
import numpy as np
import psutil
import pytest
from conftest import client_data, require_docker, wait_for
from test_agent import finished
from test_runtime import INITIAL, train_event
from test_service import stored_updates
from test_simulate import run_cli

from fedge.codec import decode
from fedge.edge_functions import container_worker, containers
from fedge.edge_functions.app import AppError, AppFailed
from fedge.edge_functions.runtime import WarmPool, WorkerFailed
from fedge.security import pki
from fedge.transport import ServerError

IMAGE = os.environ.get("FEDGE_IMAGE", containers.DEFAULT_IMAGE)
MEMORY = 1536 * 2**20


@pytest.fixture(scope="module")
def daemon() -> docker.DockerClient:
    require_docker(IMAGE)
    return docker.from_env()


@pytest.fixture
def device(tmp_path: Path, pki_dir: Path) -> tuple[Path, Path]:
    """An agent's state directory (its credentials, as enrollment leaves them) and its data elsewhere."""
    state, data = tmp_path / "agent", tmp_path / "data" / "examples.npz"
    state.mkdir()
    data.parent.mkdir()
    creds = pki.credentials(pki_dir, pki.Role.CLIENT, "alice")
    for source, name in ((creds.ca, "ca.pem"), (creds.cert, "client.pem"), (creds.key, "client.key")):
        shutil.copy2(source, state / name)
    (written,) = client_data(tmp_path, 1)
    written.rename(data)
    return state, data


def settings(data: tuple[Path, ...] = ()) -> containers.ContainerSettings:
    return containers.ContainerSettings(image=IMAGE, memory=MEMORY, cpus=1.5, data=data)


def function_containers(client: docker.DockerClient, stopped: bool = False) -> list:
    """The function containers there are; one removed while they are listed is left out, not an error
    (the SDK inspects each after listing them, and the pool removes what it retires meanwhile)."""
    return client.containers.list(all=stopped, filters={"label": containers.LABEL}, ignore_removed=True)


def container_of(client: docker.DockerClient, pid: int):
    """The function container whose main process is ``pid`` (as the invocation says)."""
    found = [c for c in function_containers(client) if c.attrs["State"]["Pid"] == pid]
    assert len(found) == 1, f"no single function container runs pid {pid}"
    return found[0]


@pytest.fixture
def pool(daemon: docker.DockerClient) -> Iterator[WarmPool]:
    made = containers.pool(1, settings())
    yield made
    made.close()


def test_the_wire_carries_json_only_within_its_limits() -> None:
    """No Docker needed: what crosses the boundary is a frame of JSON, bounded, and errors come back as the
    few types callers act on, anything else as text."""
    ours, theirs = socket.socketpair()
    with ours, theirs:
        container_worker.send(ours, container_worker.encode_result(b"\x00safetensors"))
        assert container_worker.decode_result(container_worker.receive(theirs)) == b"\x00safetensors"
        with pytest.raises(ValueError, match="not JSON compliant"):
            container_worker.send(ours, {"loss": float("nan")})
        theirs.sendall(struct.pack(">I", container_worker.MAX_FRAME + 1))
        with pytest.raises(container_worker.FrameError, match="over the limit"):
            container_worker.receive(ours)
        body = b"[" * 100 + b"]" * 100
        theirs.sendall(struct.pack(">I", len(body)) + body)
        with pytest.raises(container_worker.FrameError, match="deeper"):
            container_worker.receive(ours)

    def crossed(exc: Exception) -> Exception:
        return container_worker.decode_error(container_worker.encode_error(exc))

    refusal = crossed(ServerError(409, "duplicate_update", "x"))
    assert isinstance(refusal, ServerError)
    assert (refusal.status, refusal.code) == (409, "duplicate_update")
    assert isinstance(crossed(httpx.ConnectTimeout("slow")), httpx.ConnectTimeout)
    assert isinstance(crossed(AppFailed("bad")), AppFailed)
    other = crossed(SystemError("no"))
    assert type(other) is RuntimeError
    assert str(other) == "SystemError: no"


def test_an_invocation_runs_in_a_container_and_returns_what_a_worker_process_returns(
    daemon: docker.DockerClient, pool: WarmPool
) -> None:
    first = pool.invoke("initial_model", INITIAL).result()
    second = pool.invoke("initial_model", INITIAL).result()
    container = container_of(daemon, second.pid)
    assert container.image.tags == [IMAGE] or IMAGE in container.image.tags
    processes = WarmPool(1)
    try:
        local = processes.invoke("initial_model", INITIAL).result()
    finally:
        processes.close()
    assert first.cold
    assert first.startup_seconds > 0
    assert not second.cold
    assert second.pid == first.pid
    assert first.pid != local.pid
    ours, theirs = decode(second.result)[0], decode(local.result)[0]
    assert ours.keys() == theirs.keys()
    assert all(np.array_equal(ours[name], theirs[name]) for name in ours)


def test_a_functions_error_crosses_as_its_type_and_the_container_stays_warm(pool: WarmPool) -> None:
    warm = pool.invoke("initial_model", INITIAL).result()
    with pytest.raises(AppError, match="unknown app"):
        pool.invoke("initial_model", {"task": "no-such-task"}).result()
    again = pool.invoke("initial_model", INITIAL).result()
    assert not again.cold
    assert again.pid == warm.pid


def test_the_container_sees_its_data_read_only_and_no_agent_state(
    daemon: docker.DockerClient, device: tuple[Path, Path]
) -> None:
    state, data = device
    mounts = containers.data_mounts([data], private=state)
    assert mounts == (data.parent,)
    event = {
        "server": "https://127.0.0.1:1",  # nobody: the check falls back to the app's first model
        "credentials": {
            "ca": str(state / "ca.pem"), "cert": str(state / "client.pem"), "key": str(state / "client.key")
        },
        "task": "digits",
        "data": {"path": str(data)},
    }  # fmt: skip
    pool = containers.pool(1, settings(mounts))
    try:
        checked = pool.invoke("check_data", event).result()
        assert checked.result["examples"] == len(np.load(data)["y"])
        with pytest.raises(ValueError, match="not mounted"):
            pool.invoke("check_data", {**event, "data": {"path": str(state / "client.key")}}).result()
        container = container_of(daemon, checked.pid)

        def run(*script: str) -> tuple[int, str]:
            code, output = container.exec_run(["python", "-c", "; ".join(script)])
            return code, output.decode()

        assert run(f"import os; print(os.path.exists({str(state)!r}))") == (0, "False\n")
        code, output = run(f"open({str(data.parent / 'x')!r}, 'w')")
        assert code != 0
        assert "Read-only file system" in output
        assert run("import os; print(os.listdir('/fedge/credentials'))") == (0, "[]\n")  # between invocations
        host = container.attrs["HostConfig"]
        assert host["Memory"] == MEMORY
        assert host["NanoCpus"] == 1_500_000_000
        assert host["ReadonlyRootfs"]
        assert host["CapDrop"] == ["ALL"]
        assert all(not Path(m["Source"]).is_relative_to(state) for m in container.attrs["Mounts"])
    finally:
        pool.close()


def test_a_container_hung_past_the_deadline_is_replaced_and_the_invocation_fails(
    daemon: docker.DockerClient, silent_server: str, pki_dir: Path
) -> None:
    pool = containers.pool(1, settings())
    try:
        pool.warm()
        hung = pool.invoke("train", train_event(silent_server, pki_dir), timeout=3)
        with pytest.raises(WorkerFailed, match="hung"):
            hung.result()
        assert pool.live_workers() == 0
        assert not function_containers(daemon)
        after = pool.invoke("initial_model", INITIAL).result()
    finally:
        pool.close()
    assert after.cold


def test_a_container_holds_its_clients_credential_while_it_runs_and_one_that_crashes_is_replaced(
    daemon: docker.DockerClient, silent_server: str, pki_dir: Path
) -> None:
    pool = containers.pool(1, settings())
    try:
        warm = pool.invoke("initial_model", INITIAL).result()
        running = pool.invoke("train", train_event(silent_server, pki_dir))
        main = psutil.Process(warm.pid)  # the container's main process, as the host sees it
        wait_for(lambda: any(c.status == "ESTABLISHED" for c in main.net_connections()), 30, "the call")
        container = container_of(daemon, warm.pid)
        seen = container.exec_run(["sh", "-c", "ls /fedge/credentials/*; cat /fedge/credentials/*/key.pem"])
        key = pki.credentials(pki_dir, pki.Role.CLIENT, "alice").key.read_text()
        assert seen.output.decode() == f"ca.pem\ncert.pem\nkey.pem\n{key}"  # its client's, while it runs
        container.kill()
        with pytest.raises(WorkerFailed, match="crashed"):
            running.result()
        after = pool.invoke("initial_model", INITIAL).result()
    finally:
        pool.close()
    assert after.cold
    assert after.pid != warm.pid


def test_an_idle_container_retires_after_its_keep_alive_and_the_next_invocation_is_cold(
    daemon: docker.DockerClient,
) -> None:
    pool = containers.pool(1, settings(), keep_alive=1.0)
    try:
        first = pool.invoke("initial_model", INITIAL).result()
        wait_for(lambda: pool.live_workers() == 0, 30, "the idle container to retire")
        wait_for(lambda: not function_containers(daemon, stopped=True), 30,
                 "the retired container to be removed")  # fmt: skip
        again = pool.invoke("initial_model", INITIAL).result()
    finally:
        pool.close()
    assert again.cold
    assert again.pid != first.pid


def test_a_container_over_its_memory_limit_is_killed_and_the_invocation_says_so(
    daemon: docker.DockerClient,
) -> None:
    small = containers.ContainerSettings(image=IMAGE, memory=64 * 2**20)  # less than `import torch` takes
    pool = containers.pool(1, small)
    try:
        with pytest.raises(WorkerFailed, match="more than its memory limit"):
            pool.invoke("initial_model", INITIAL).result()
        assert pool.live_workers() == 0
    finally:
        pool.close()
    assert not function_containers(daemon, stopped=True)


def test_an_agent_with_the_container_runtime_trains_every_round(
    daemon: docker.DockerClient, make_pki, start_task_server, start_agent, tmp_path: Path
) -> None:
    pki_dir = make_pki("dev-1")
    server = start_task_server(pki_dir, "--rounds", "2")
    (data,) = client_data(tmp_path, 1)
    agent = start_agent(pki_dir, "dev-1", data, server.url, "--poll-wait", "2", "--runtime", "container",
                        "--image", IMAGE, "--function-memory-mb", "1536")  # fmt: skip
    wait_for(lambda: finished(server, pki_dir), 300, "both rounds to finish")
    assert stored_updates(server.data) == [(1, "dev-1"), (2, "dev-1")]
    assert agent.stop(signal.SIGTERM) == 0
    assert not function_containers(daemon, stopped=True)  # stopped and removed


def test_a_simulation_with_the_container_runtime_completes_its_rounds(
    daemon: docker.DockerClient, tmp_path: Path
) -> None:
    """Two clients on two containers, each invocation with only its own client's credential."""
    done = run_cli("simulate", "--runtime", "container", "--image", IMAGE, "--clients", "2", "--rounds", "2",
                   "--workers", "2", "--dataset", "digits", "--out", str(tmp_path / "run"))  # fmt: skip
    assert done.returncode == 0, done.stderr
    rounds = json.loads((tmp_path / "run" / "metrics.json").read_text())["rounds"]
    assert [(r["round"], r["updates"]) for r in rounds] == [(1, 2), (2, 2)]
    assert rounds[-1]["accuracy"] > 0.5
    assert not function_containers(daemon, stopped=True)


def test_without_the_image_the_runtime_says_so_in_a_line(daemon: docker.DockerClient, tmp_path: Path) -> None:
    done = run_cli("simulate", "--runtime", "container", "--image", "fedge/no-such-image:0", "--clients", "2",
                   "--out", str(tmp_path / "run"))  # fmt: skip
    assert done.returncode != 0
    assert "no image fedge/no-such-image:0" in done.stderr + done.stdout
    assert "Traceback" not in done.stderr
