"""The round log of a real ``fedge server`` process: one line per event of each round's life, in order, as
text or JSON, and the server's exit once the federation is finished."""

from __future__ import annotations

import contextlib
import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import client_data, toy_server_args, update_body, wait_for
from test_service import open_round

from fedge.server.launcher import ServerProcess, launch
from fedge.server.roundlog import (
    LineWriter,
    evaluated,
    finished,
    human,
    json_line,
    opened,
    skip,
    update,
    why_failed,
)
from fedge.server.store import RoundRecord, Store
from fedge.wire import MetadataError, RoundState, TrainConfig, UpdateMeta

HOUR = ("--round-timeout", "3600")
TIME = r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d"


def finishing_server(tmp_path: Path, pki_dir: Path, *flags: str) -> ServerProcess:
    """A toy federation that exits when its rounds are done (as an operator runs it, no lingering)."""
    args = [*toy_server_args(pki_dir, tmp_path / "initial.safetensors"), *HOUR, *flags]
    return launch(args, tmp_path / "state", tmp_path / "server.log", serve_after_finish=False)


def play_two_rounds(server: ServerProcess, connect) -> None:
    """Round 1: alice and carol send updates, bob skips. Round 2: everyone skips, so it fails."""
    alice, bob, carol = (connect(server, name) for name in ("alice", "bob", "carol"))
    first = open_round(alice)
    alice.post_update(first.round, update_body(2.0))
    bob.skip(first.round, "out of memory")
    carol.post_update(first.round, update_body(4.0))
    second = open_round(alice)
    assert second.round == first.round + 1
    for client in (alice, bob, carol):
        client.skip(second.round, "battery low")


def test_each_event_of_a_round_is_one_line_in_order_and_the_server_exits_0_when_finished(
    tmp_path: Path, pki_dir: Path, connect
) -> None:
    server = finishing_server(tmp_path, pki_dir, "--rounds", "2")
    play_two_rounds(server, connect)
    assert server.process.wait(30) == 0
    lines = server.log.read_text().splitlines()
    sha = Store(server.data).round(1).result_sha256  # type: ignore[union-attr]
    expected = [
        r"fedge aggregation service on https://127\.0\.0\.1:\d+",
        r"round 1 opened: 3 selected, deadline \S+ \S+ \(in 360\d s\)",
        r"round 1 update from alice: \d+ B, on the device",
        r"round 1 skip from bob: out of memory",
        r"round 1 update from carol: \d+ B, on the device",
        rf"round 1 closed: 2 updates, 1 skip, aggregated in \d+\.\d ms, model {sha[:12]}",
        r"round 2 opened: 3 selected, .*",
        *[rf"round 2 skip from {c}: battery low" for c in ("alice", "bob", "carol")],
        r"round 2 failed: 0 updates, 3 skips: 3 skips left 0 updates, below the quorum of 1",
        r"federation finished: 2 rounds done",
    ]
    assert len(lines) == len(expected), "\n".join(lines)
    for line, pattern in zip(lines, expected, strict=True):
        assert re.fullmatch(f"{TIME} {pattern}", line), (line, pattern)


def test_json_log_format_is_one_object_per_line_with_each_events_fields(
    tmp_path: Path, pki_dir: Path, connect
) -> None:
    args = [*toy_server_args(pki_dir, tmp_path / "initial.safetensors"), *HOUR, "--rounds", "2"]
    stdout, stderr = tmp_path / "stdout.jsonl", tmp_path / "stderr.log"
    data = tmp_path / "state"
    with stdout.open("wb") as out, stderr.open("wb") as err:
        process = subprocess.Popen(
            [sys.executable, "-m", "fedge", "server", "--data", str(data), "--log-format", "json", *args],
            stdout=out,
            stderr=err,
        )
    try:
        wait_for(lambda: (data / "endpoint.json").exists(), 60, "the server")
        url = json.loads((data / "endpoint.json").read_text())["url"]
        play_two_rounds(ServerProcess(process, url, data, stdout), connect)
        assert process.wait(30) == 0
    finally:
        process.kill()
    records = [json.loads(line) for line in stdout.read_text().splitlines()]  # every line parses
    assert [(r["event"], r["round"]) for r in records] == [
        ("serving", 0), ("opened", 1), ("update", 1), ("skip", 1), ("update", 1), ("closed", 1),
        ("opened", 2), ("skip", 2), ("skip", 2), ("skip", 2), ("failed", 2), ("finished", 2),
    ]  # fmt: skip
    assert all(re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", r["time"]) for r in records)
    opening, update, skip, closing, failing = records[1], records[2], records[3], records[5], records[10]
    assert opening["selected"] == 3
    assert opening["deadline"] > opening["time"]
    assert (update["client"], update["where"]) == ("alice", "device")
    assert update["bytes"] == len(update_body(2.0))
    assert (skip["client"], skip["reason"]) == ("bob", "out of memory")
    assert (closing["updates"], closing["skips"]) == (2, 1)
    assert closing["aggregation_ms"] >= 0
    assert closing["model_sha256"] == Store(data).round(1).result_sha256  # type: ignore[union-attr]
    assert "below the quorum" in failing["why"]
    assert records[-1]["rounds"] == 2


def test_with_serve_after_finish_the_server_says_finished_and_keeps_serving(
    tmp_path: Path, pki_dir: Path, connect
) -> None:
    args = [*toy_server_args(pki_dir, tmp_path / "initial.safetensors"), *HOUR, "--rounds", "1"]
    server = launch(args, tmp_path / "state", tmp_path / "server.log")  # --serve-after-finish
    try:
        clients = [connect(server, name) for name in ("alice", "bob", "carol")]
        first = open_round(clients[0])
        for client in clients:
            client.post_update(first.round, update_body(1.0))
        wait_for(lambda: "federation finished: 1 round done" in server.log.read_text(), 30, "finished")
        assert clients[0].current_round().state is RoundState.FINISHED
        assert server.process.poll() is None
        for client in clients:
            client.close()  # idle keep-alive connections would hold SIGTERM's graceful shutdown
    finally:
        server.stop()


def test_a_restarted_server_whose_federation_is_finished_says_so_and_exits_0(
    tmp_path: Path, pki_dir: Path, connect
) -> None:
    server = finishing_server(tmp_path, pki_dir, "--rounds", "1")
    first = open_round(connect(server, "alice"))
    for name in ("alice", "bob", "carol"):
        connect(server, name).post_update(first.round, update_body(1.0))
    assert server.process.wait(30) == 0
    flags = [*toy_server_args(pki_dir, tmp_path / "i.safetensors"), "--rounds", "1"]
    command = [sys.executable, "-m", "fedge", "server", "--data", str(server.data), *flags]
    again = subprocess.run(command, capture_output=True, text=True, timeout=60)
    assert again.returncode == 0, again.stderr
    assert again.stdout.splitlines()[-1].endswith("federation finished: 1 round done")


def test_a_failed_round_says_why_from_what_it_counted() -> None:
    assert why_failed(0, 3, 3, 1, "fedavg") == "3 skips left 0 updates, below the quorum of 1"
    assert why_failed(1, 0, 3, 2, "fedavg") == "the deadline passed with 1 update, below the quorum of 2"
    assert why_failed(3, 0, 3, 3, "krum") == "strategy krum could not aggregate the 3 updates"


def test_both_formats_say_the_same_event() -> None:
    event = opened(RoundRecord(7, "open", "a" * 64, None, ["x", "y"], TrainConfig(), 0.0, 60.0))
    assert (
        human(event)
        == "1970-01-01 00:00:00 round 7 opened: 2 selected, deadline 1970-01-01 00:01:00 (in 60 s)"
    )
    assert json.loads(json_line(event)) == {
        "time": "1970-01-01T00:00:00.000Z", "event": "opened", "round": 7, "selected": 2,
        "deadline": "1970-01-01T00:01:00.000Z",
    }  # fmt: skip


def test_an_update_says_where_it_was_computed_from_its_provenance_and_metadata() -> None:
    on_device = update(1, "alice", 2048, "", UpdateMeta(10), 0.0)
    fewer = update(1, "bob", 2048, "", UpdateMeta(10, steps=3), 0.0)
    offloaded = update(1, "carol", 2048, "gpu-1", UpdateMeta(10, raw_bytes=26_112), 0.0)
    assert [e.fields["where"] for e in (on_device, fewer, offloaded)] == ["device", "fewer-steps", "offload"]
    assert human(on_device).endswith("round 1 update from alice: 2.0 kB, on the device")
    assert human(fewer).endswith("round 1 update from bob: 2.0 kB, on the device, fewer steps (3)")
    assert human(offloaded).endswith(
        "round 1 update from carol: 2.0 kB, offloaded to gpu-1, 26.1 kB raw data"
    )
    assert json.loads(json_line(offloaded))["raw_bytes"] == 26_112


def test_steps_and_raw_bytes_travel_in_an_updates_metadata_and_bad_ones_are_refused() -> None:
    meta = UpdateMeta(10, steps=3, raw_bytes=26_112)
    assert UpdateMeta.from_metadata(meta.to_metadata()) == meta
    for bad in ("-1", "1.5", "9" * 20, "\uff13"):  # the last: a full-width digit
        with pytest.raises(MetadataError, match="steps"):
            UpdateMeta.from_metadata({**meta.to_metadata(), "steps": bad})


def test_an_agent_logs_a_human_line_per_step_of_its_round(
    make_pki, start_task_server, start_agent, tmp_path: Path
) -> None:
    pki_dir = make_pki("dev-1")
    server = start_task_server(pki_dir, "--rounds", "1")
    (data,) = client_data(tmp_path, 1)
    agent = start_agent(pki_dir, "dev-1", data, server.url, "--poll-wait", "2")
    wait_for(lambda: "federation finished" in server.log.read_text(), 300, "the round")
    wait_for(lambda: "round 1 sent" in agent.log.read_text(), 30, "the agent's last line")
    lines = [line for line in agent.log.read_text().splitlines() if re.match(rf"{TIME} round 1 ", line)]
    expected = [
        r"round 1 heard: selected, one of 1, deadline in \d+ s",
        r"round 1 placed on the device: .+",
        r"round 1 trained in \d+\.\d\d s on the device",
        r"round 1 sent: \d+ bytes in \d+\.\d\d s",
    ]
    assert len(lines) == len(expected), "\n".join(lines)
    for line, pattern in zip(lines, expected, strict=True):
        assert re.fullmatch(f"{TIME} {pattern}", line), (line, pattern)
    server_side = server.log.read_text()
    assert re.search(r"round 1 update from dev-1: [\d.]+ kB, on the device\n", server_side)


def test_a_diverged_models_loss_is_null_in_json_and_nan_in_text() -> None:
    event = evaluated(3, "server", math.nan, 0.1, 360, 0.0)
    assert json.loads(json_line(event))["loss"] is None
    assert human(event).endswith("round 3 evaluated (server, 360 examples): accuracy 0.1000, loss nan")


def test_a_round_log_whose_output_is_gone_does_not_stop_the_round() -> None:
    read_end, write_end = os.pipe()
    os.close(read_end)
    gone = open(write_end, "w")  # noqa: SIM115 (a closed pipe: every flush is a BrokenPipeError)
    LineWriter("text", gone)(finished(2, 0.0))  # said to nobody, and no exception
    with contextlib.suppress(BrokenPipeError):
        gone.close()  # what it still buffers cannot go anywhere either
    with pytest.raises(ValueError, match="unknown log format"):
        LineWriter("yaml")


def test_a_skip_reason_cannot_write_a_log_line_of_its_own() -> None:
    forged = "ok\n2026-01-01 00:00:00 round 9 closed: 3 updates\x1b[2K"
    event = skip(4, "bob", forged, 0.0)
    line = human(event)
    assert "\n" not in line
    assert "\x1b" not in line
    assert line.endswith("round 4 skip from bob: ok\\n2026-01-01 00:00:00 round 9 closed: 3 updates\\x1b[2K")
    assert json.loads(json_line(event))["reason"] == forged  # JSON escapes it by itself
