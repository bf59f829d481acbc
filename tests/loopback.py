"""Real parts on loopback that the tests (through conftest.py) and bench/ both start: a PostgreSQL cluster
of its own, haproxy in TCP mode in front of server replicas, and a Ray cluster of two nodes."""

from __future__ import annotations

import os
import pwd
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import psutil

HAPROXY = shutil.which("haproxy") or "/usr/sbin/haproxy"
RAY = Path(sys.executable).parent / "ray"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@contextmanager
def postgres_cluster() -> Iterator[str]:
    """A PostgreSQL cluster of its own in a temporary directory, reached over its Unix socket there; yields
    the URL of its ``postgres`` database. PostgreSQL refuses to run as root, so as root (CI) it runs as
    ``nobody``."""
    pg_ctl = shutil.which("pg_ctl") or "/usr/local/bin/pg_ctl"
    initdb = str(Path(pg_ctl).with_name("initdb"))
    directory = Path(tempfile.mkdtemp(prefix="fedge-pg-"))
    as_user: list[str] = []
    if os.geteuid() == 0:
        nobody = pwd.getpwnam("nobody")
        os.chown(directory, nobody.pw_uid, nobody.pw_gid)
        as_user = ["runuser", "-u", "nobody", "--"]
    data = directory / "data"
    port = free_port()
    subprocess.run(
        [*as_user, initdb, "-D", str(data), "-U", "postgres", "--auth=trust", "-E", "UTF8"],
        check=True,
        capture_output=True,
    )
    options = f"-k {directory} -p {port} -c listen_addresses= -c fsync=on"
    subprocess.run(
        [*as_user, pg_ctl, "-D", str(data), "-l", str(directory / "log"), "-o", options, "-w", "start"],
        check=True,
        capture_output=True,
    )
    try:
        yield f"postgresql://postgres@/postgres?host={directory}&port={port}"
    finally:
        subprocess.run([*as_user, pg_ctl, "-D", str(data), "-m", "immediate", "stop"], capture_output=True)
        shutil.rmtree(directory, ignore_errors=True)


class Haproxy:
    """A real haproxy in TCP mode in front of server replicas: TLS passes through, so each replica sees the
    client's certificate; a replica that stops answering is taken out within a second (health checks)."""

    def __init__(self, directory: Path, backends: list[int]) -> None:
        if not Path(HAPROXY).exists():
            raise RuntimeError("haproxy is not installed: `make system` installs it")
        self.port = free_port()
        config = directory / "haproxy.cfg"
        servers = "\n".join(
            f"    server replica{i} 127.0.0.1:{port} check inter 200ms fall 2 rise 2"
            for i, port in enumerate(backends)
        )
        config.write_text(
            "global\n    maxconn 4096\n"
            "defaults\n    mode tcp\n    timeout connect 2s\n    timeout client 120s\n"
            "    timeout server 120s\n    retries 3\n    option redispatch\n"
            f"frontend fedge\n    bind 127.0.0.1:{self.port}\n    default_backend replicas\n"
            f"backend replicas\n    balance roundrobin\n{servers}\n"
        )
        self.log = directory / "haproxy.log"
        self.process = subprocess.Popen(
            [HAPROXY, "-f", str(config), "-db"], stdout=self.log.open("w"), stderr=subprocess.STDOUT
        )
        self.url = f"https://127.0.0.1:{self.port}"
        give_up = time.monotonic() + 10
        while not self._listening():
            if time.monotonic() > give_up:
                raise RuntimeError(f"haproxy did not listen within 10 s: {self.log.read_text()}")
            time.sleep(0.05)

    def _listening(self) -> bool:
        if self.process.poll() is not None:
            raise RuntimeError(f"haproxy exited: {self.log.read_text()}")
        with socket.socket() as probe:
            return probe.connect_ex(("127.0.0.1", self.port)) == 0

    def stop(self) -> None:
        self.process.terminate()
        self.process.wait(10)


@contextmanager
def ray_cluster(nodes: int = 2) -> Iterator[str]:
    """A Ray cluster of ``nodes`` nodes of one CPU each (a head and ``nodes - 1`` more, started as
    ``ray start --address`` would on other machines), in a temporary directory of its own; yields the head's
    address. It is stopped by the processes that directory names: ``ray stop`` would stop every Ray on the
    machine, not just this one."""
    temp = tempfile.mkdtemp(prefix="ray-", dir="/tmp")  # Ray's socket paths must stay short
    port = free_port()
    address = f"127.0.0.1:{port}"
    common = ("--num-cpus", "1", "--node-ip-address", "127.0.0.1", "--object-store-memory", str(100 << 20))
    try:
        _ray(
            "start", "--head", "--port", str(port), "--temp-dir", temp, "--include-dashboard=false",
            "--ray-client-server-port", str(free_port()), "--disable-usage-stats", *common,
        )  # fmt: skip
        for _ in range(nodes - 1):
            _ray("start", "--address", address, *common)
        yield address
    finally:
        mine = [p for p in psutil.process_iter() if _of_cluster(p, temp)]
        for process in mine:
            process.kill()
        psutil.wait_procs(mine, timeout=30)
        shutil.rmtree(temp, ignore_errors=True)


def _ray(*args: str) -> None:
    done = subprocess.run([str(RAY), *args], capture_output=True, text=True, timeout=120, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"ray {args[0]} failed: {done.stdout}{done.stderr}")


def _of_cluster(process: psutil.Process, temp: str) -> bool:
    """Whether ``process`` is one of this cluster's: it names the cluster's directory, or holds a file in it
    (Ray's agents rename themselves, ``ray::DashboardAgent``, but keep their logs open there)."""
    try:
        return temp in " ".join(process.cmdline()) or any(
            f.path.startswith(temp) for f in process.open_files()
        )
    except psutil.Error:
        return False
