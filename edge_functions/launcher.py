"""Start ``fedge executor`` as a separate process and wait until it listens.

Used by ``fedge simulate --profile`` (the executor joins the run) and the tests, so both exercise the
executor exactly as an operator runs it.
"""

from __future__ import annotations

import subprocess
from dataclasses import dataclass
from pathlib import Path

from fedge import processes


@dataclass
class ExecutorProcess:
    process: subprocess.Popen
    url: str
    log: Path

    def stop(self) -> int:
        return processes.stop(self.process)


def launch_executor(
    pki_dir: Path,
    id_: str,
    server: str,
    log: Path,
    cwd: Path | None = None,
    env: dict[str, str] | None = None,
    timeout: float = 120.0,
) -> ExecutorProcess:
    """Run ``fedge executor --port 0`` (a free port) and wait for the line that says where it listens."""
    args = ["executor", "--pki", str(pki_dir), "--id", id_, "--port", "0", "--server", server]
    process = processes.start(args, log, cwd, env)

    def listening() -> str | None:
        lines = log.read_text(errors="replace").splitlines()
        return next((line.rsplit(" ", 1)[-1] for line in lines if "listening on " in line), None)

    url = processes.wait_until(process, log, listening, timeout, f"the executor {id_}")
    return ExecutorProcess(process, url, log)
