"""Start ``fedge server`` as a separate process and wait until it accepts connections.

Used by ``fedge simulate`` and the tests, so both exercise the service exactly as an operator runs it.
Importing this module costs nothing: the service's own imports happen in the child process.
"""

from __future__ import annotations

import json
import signal
import subprocess
from dataclasses import dataclass
from pathlib import Path

from fedge import processes


@dataclass
class ServerProcess:
    process: subprocess.Popen
    url: str
    data: Path
    log: Path

    def stop(self, sig: int = signal.SIGTERM) -> int:
        return processes.stop(self.process, sig, timeout=15)


def launch(
    args: list[str], data: Path, log: Path, timeout: float = 60.0, serve_after_finish: bool = True
) -> ServerProcess:
    """Run ``fedge server --data DATA ARGS`` (pass ``--port 0`` for a free port) and wait for it. Whoever
    launches a server reads its results from it after the last round (a simulation's final model, a
    test's round history), so it keeps serving then unless told otherwise."""
    data.mkdir(parents=True, exist_ok=True)
    endpoint = data / "endpoint.json"
    endpoint.unlink(missing_ok=True)
    linger = ["--serve-after-finish"] if serve_after_finish else []
    process = processes.start(["server", "--data", str(data), *linger, *args], log)
    found = processes.wait_until(
        process, log, lambda: endpoint if endpoint.exists() else None, timeout, "the aggregation service"
    )
    return ServerProcess(process, json.loads(found.read_text())["url"], data, log)
