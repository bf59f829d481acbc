"""Start ``fedge executor`` as a separate process and wait until it listens.

Used by ``fedge simulate --profile`` (the executor joins the run) and the tests, so both exercise the
executor exactly as an operator runs it. Importing this module costs nothing: torch loads in the child.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from fedge.console import UserError


@dataclass
class ExecutorProcess:
    process: subprocess.Popen
    url: str
    log: Path

    def stop(self) -> int:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        return self.process.returncode


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
    environment = {**os.environ, **(env or {}), "FEDGE_CONFIG": os.devnull, "PYTHONUNBUFFERED": "1"}
    with log.open("ab") as out:
        process = subprocess.Popen(
            [sys.executable, "-m", "fedge", *args],
            stdout=out,
            stderr=subprocess.STDOUT,
            cwd=cwd,
            env=environment,
        )
    give_up = time.monotonic() + timeout
    while True:
        for line in log.read_text(errors="replace").splitlines():
            if "listening on " in line:
                return ExecutorProcess(process, line.rsplit(" ", 1)[-1], log)
        if process.poll() is not None or time.monotonic() > give_up:
            process.kill()
            process.wait()
            tail = log.read_text(errors="replace").strip().splitlines()[-5:]
            raise UserError("the executor did not start: " + " | ".join(tail))
        time.sleep(0.1)
