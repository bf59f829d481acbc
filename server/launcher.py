"""Start ``fedge server`` as a separate process and wait until it accepts connections.

Used by ``fedge simulate`` and the tests, so both exercise the service exactly as an operator runs it.
Importing this module costs nothing: the service's own imports happen in the child process.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from fedge.console import UserError


@dataclass
class ServerProcess:
    process: subprocess.Popen
    url: str
    data: Path
    log: Path

    def stop(self, sig: int = signal.SIGTERM) -> int:
        if self.process.poll() is None:
            self.process.send_signal(sig)
            try:
                self.process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        return self.process.returncode


def launch(args: list[str], data: Path, log: Path, timeout: float = 60.0) -> ServerProcess:
    """Run ``fedge server --data DATA ARGS`` (pass ``--port 0`` for a free port) and wait for it."""
    data.mkdir(parents=True, exist_ok=True)
    endpoint = data / "endpoint.json"
    endpoint.unlink(missing_ok=True)
    env = {**os.environ, "FEDGE_CONFIG": os.devnull}
    with log.open("ab") as out:
        process = subprocess.Popen(
            [sys.executable, "-m", "fedge", "server", "--data", str(data), *args],
            stdout=out,
            stderr=subprocess.STDOUT,
            env=env,
        )
    give_up = time.monotonic() + timeout
    while not endpoint.exists():
        if process.poll() is not None or time.monotonic() > give_up:
            process.kill()
            process.wait()
            tail = log.read_text(errors="replace").strip().splitlines()[-5:]
            raise UserError("the aggregation service did not start: " + " | ".join(tail))
        time.sleep(0.05)
    return ServerProcess(process, json.loads(endpoint.read_text())["url"], data, log)
