"""``fedge`` commands run as child processes (the server, the executor) by the simulation and the tests:
started as an operator starts them, waited for until they say they are ready, stopped politely then
firmly. Importing this costs nothing: what the command imports loads in the child."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

from fedge.console import UserError

Ready = TypeVar("Ready")


def start(
    args: list[str], log: Path, cwd: Path | None = None, env: dict[str, str] | None = None
) -> subprocess.Popen:
    """``fedge ARGS`` with its output in ``log``, ignoring any ``fedge.toml`` around it."""
    environment = {**os.environ, **(env or {}), "FEDGE_CONFIG": os.devnull, "PYTHONUNBUFFERED": "1"}
    with log.open("ab") as out:
        return subprocess.Popen(
            [sys.executable, "-m", "fedge", *args],
            stdout=out,
            stderr=subprocess.STDOUT,
            cwd=cwd,
            env=environment,
        )


def wait_until(
    process: subprocess.Popen, log: Path, ready: Callable[[], Ready | None], timeout: float, what: str
) -> Ready:
    """Poll ``ready`` until it answers; if the process dies or time runs out, kill it and say why."""
    give_up = time.monotonic() + timeout
    while (answer := ready()) is None:
        if process.poll() is not None or time.monotonic() > give_up:
            process.kill()
            process.wait()
            tail = log.read_text(errors="replace").strip().splitlines()[-5:]
            raise UserError(f"{what} did not start: " + " | ".join(tail))
        time.sleep(0.05)
    return answer


def stop(process: subprocess.Popen, sig: int = signal.SIGTERM, timeout: float = 30.0) -> int:
    if process.poll() is None:
        process.send_signal(sig)
        try:
            process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
    return process.returncode
