"""The README's "Running the service by hand", run as written: its bash blocks, in order, typed into one
shell in a fresh folder beside ``.venv`` (real mosquitto, a real server, real agents), as this user and,
when that is root, as a normal user too. The only change is the two ports, so that runs side by side do
not collide."""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import MOSQUITTO, free_port, wait_for

ROOT = Path(__file__).resolve().parents[1]
VENV = Path(sys.prefix)
ROUNDS = 3  # what the README's server runs


def hand_run_blocks() -> list[str]:
    text = (ROOT / "README.md").read_text()
    section = re.split(r"\n##+ ", text.split("\n## Running the service by hand\n", 1)[1], maxsplit=1)[0]
    return re.findall(r"```bash\n(.*?)```", section, re.S)


class Shell:
    """One bash, fed a block at a time as a person pastes them; ``set -e`` makes a failed command end it."""

    def __init__(self, cwd: Path, user: str | None) -> None:
        self.cwd = cwd
        self.log = cwd / "shell.log"
        prefix = [] if user is None else ["runuser", "-u", user, "--"]
        with self.log.open("w") as out:
            self.process = subprocess.Popen(
                [*prefix, "bash"], stdin=subprocess.PIPE, stdout=out, stderr=subprocess.STDOUT, cwd=cwd,
                text=True, start_new_session=True, env={"PATH": os.environ["PATH"], "HOME": str(cwd)},
            )  # fmt: skip
        self.blocks = 0

    def run(self, block: str, timeout: float) -> None:
        self.blocks += 1
        marker = f"--- block {self.blocks} done ---"
        assert self.process.stdin is not None
        self.process.stdin.write(f"set -e\n{block}\necho '{marker}'\n")
        self.process.stdin.flush()

        def finished() -> bool:
            if self.process.poll() is not None:
                raise AssertionError(f"block {self.blocks} failed:\n{self.log.read_text()[-3000:]}")
            return marker in self.log.read_text()

        wait_for(finished, timeout, f"block {self.blocks} of the README")

    def close(self) -> None:
        """Stop what the blocks started: the shell's process group (server, agents) and mosquitto."""
        pid_file = self.cwd / "broker" / "data" / "mosquitto.pid"
        if pid_file.exists():
            os.kill(int(pid_file.read_text().split()[0]), signal.SIGTERM)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.process.pid, signal.SIGTERM)
        self.process.wait(30)


def rounds_done(state: Path) -> int:
    path = state / "rounds.json"
    try:
        return json.loads(path.read_text())["done"]
    except (OSError, ValueError):
        return 0


def as_nobody_possible() -> str:
    """Why the normal-user variant cannot run here, or ""."""
    if os.geteuid() != 0:
        return "only root can run the README as another user (this run is the normal user's)"
    if not shutil.which("runuser"):
        return "runuser is missing"
    probe = subprocess.run(
        ["runuser", "-u", "nobody", "--", str(VENV / "bin" / "python"), "-c", ""], check=False
    )
    if probe.returncode != 0:
        return f"user nobody cannot run {VENV / 'bin' / 'python'} (its interpreter lies in a private home)"
    return ""


@pytest.mark.parametrize("user", [None, "nobody"], ids=["this-user", "normal-user"])
def test_the_readme_hand_run_path_works_as_written(tmp_path: Path, user: str | None) -> None:
    assert Path(MOSQUITTO).exists(), "mosquitto is missing: apt-get install mosquitto (make test does)"
    if user is not None and (why := as_nobody_possible()):
        pytest.skip(why)
    blocks = hand_run_blocks()
    assert len(blocks) == 3, "the test waits between the README's three blocks: keep them in step"
    server_port, broker_port = free_port(), free_port()
    blocks = [b.replace("8443", str(server_port)).replace("8883", str(broker_port)) for b in blocks]
    work = tmp_path / "by-hand"
    work.mkdir()
    (work / ".venv").symlink_to(VENV)
    if user is not None:
        shutil.chown(work, user)
    shell = Shell(work, user)
    try:
        shell.run(blocks[0], 120)  # the CA, certificates, broker and server
        wait_for(lambda: (work / "state" / "endpoint.json").exists(), 120, "the server")
        shell.run(blocks[1], 180)  # two devices: one with its certificate, one enrolled
        acl = (work / "broker" / "acl").read_text()
        assert "user client:device-2" in acl, "enrollment put the device on the broker's ACL"
        wait_for(lambda: min(rounds_done(work / d) for d in ("agent-1", "agent-2")) >= ROUNDS, 600, "rounds")
        shell.run(blocks[2], 120)  # status, list, revoke
        assert "device-2:" in shell.log.read_text()
        assert "user client:device-1" not in (work / "broker" / "acl").read_text()
        assert (work / "broker" / "crl.pem").read_bytes() == (work / "pki" / "crl.pem").read_bytes()
        assert len(list((work / "state" / "models").iterdir())) == ROUNDS + 1  # the initial model, then each
    finally:
        shell.close()
    for log in ("server.log", "agent-1.log", "agent-2.log", "shell.log"):
        assert "Traceback" not in (work / log).read_text(), log
