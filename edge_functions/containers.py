"""Function instances in containers, on the Docker SDK: the warm pool's second kind of instance.

As a FaaS platform hosts a function, each instance is a warm container (``fedge/agent:<version>`` by
default: the installed wheel with torch) whose main process serves invocations over a unix socket in JSON
(``edge_functions.container_worker``), never pickle. It sees only what the function needs:

- its data, each path mounted read-only where the agent has it (so events need no rewriting);
- the model and data-set cache (``$FEDGE_CACHE_DIR``), read-only;
- the credentials of the client the current invocation is for, copied into a directory of their own
  (mounted read-only) for the invocation's time only: a simulation's container serves many clients in
  turn, each invocation with only its own key, and never the agent's state directory (a connection the
  function keeps warm holds the key in memory, as a warm worker's does);
- a directory of its own for its socket and its outbox: the update it leaves there is moved into the
  agent's outbox after the invocation, so the agent's state stays out of its reach.

It runs as the agent's own user, read-only but for a small ``/tmp``, with no capabilities, under the memory
and CPU limits of the agent's settings, on the host's network by default (the function itself fetches
the model and posts the update). The pool (``runtime.WarmPool``) keeps it warm, retires it after
``keep_alive`` and replaces one that crashes or hangs, as it does its worker processes.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import os
import re
import shutil
import socket
import stat
import tempfile
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import docker
import docker.errors
from docker.models.containers import Container
from docker.types import Mount

from fedge import __version__
from fedge.edge_functions import datasets
from fedge.edge_functions.container_worker import FrameError, decode_error, decode_result, receive, send
from fedge.edge_functions.runtime import START_TIMEOUT, Instance, WarmPool, WorkerFailed
from fedge.files import write_file

DEFAULT_IMAGE = f"fedge/agent:{__version__}"
LABEL = "fedge.function"  # every function container carries it: `docker ps --filter label=fedge.function`
_IO = "/fedge/io"  # the instance's socket and outbox
_CREDENTIALS = "/fedge/credentials"
_CACHE = "/fedge/cache"
_SOCKET = "worker.sock"
_UPDATE = re.compile(r"round-\d+\.safetensors")  # what a train function leaves in an outbox
_STOP_SECONDS = 5.0
_SCRATCH = "/tmp"  # noqa: S108  (the container's own tmpfs, its only writable place but its io)
T = TypeVar("T")


class ContainerError(RuntimeError):
    """No Docker daemon answers, or the image is not there: nothing can start."""


@dataclass(frozen=True)
class ContainerSettings:
    """``memory`` bytes and ``cpus`` cores at most per container (None: no limit); ``data``: paths mounted
    read-only at the same place (``data_mounts``); ``network``: Docker's network mode."""

    image: str = DEFAULT_IMAGE
    memory: int | None = None
    cpus: float | None = None
    data: tuple[Path, ...] = ()
    network: str = "host"
    cache: Path = field(default_factory=datasets.cache_dir)


def data_mounts(paths: Iterable[Path | None], private: Path | None = None) -> tuple[Path, ...]:
    """What to mount for each data path: its folder, so a file the owner replaces is seen replaced; the
    file alone where that folder holds ``private`` (the agent's state directory)."""
    mounts = []
    for path in (p.resolve() for p in paths if p is not None):
        folder = path if path.is_dir() else path.parent
        hides = private is not None and private.resolve().is_relative_to(folder)
        mounts.append(path if hides else folder)
    return tuple(dict.fromkeys(mounts))


def instances(settings: ContainerSettings) -> Callable[[int], Instance]:
    """A maker of container instances for ``WarmPool(instances=...)``, once the daemon answers and has
    the image; ``ContainerError`` otherwise."""
    try:
        client = docker.from_env()
        client.ping()
    except docker.errors.DockerException as exc:
        raise ContainerError(f"no Docker daemon answers ({exc}): start one (`make images` does)") from None
    try:
        client.images.get(settings.image)
    except docker.errors.ImageNotFound:
        raise ContainerError(f"no image {settings.image}: build it (`make images`) or give --image") from None
    except docker.errors.DockerException as exc:
        raise ContainerError(f"cannot inspect the image {settings.image}: {exc}") from None
    return functools.partial(_Container, client, settings)


def pool(
    workers: int, settings: ContainerSettings, keep_alive: float | None = None, threads: int | None = None
) -> WarmPool:
    """A warm pool of ``workers`` containers."""
    return WarmPool(workers, keep_alive, threads, instances(settings))


class _Container:
    """One warm container and the agent's end of its socket (``runtime.Instance``)."""

    def __init__(self, client: docker.DockerClient, settings: ContainerSettings, threads: int) -> None:
        settings.cache.mkdir(parents=True, exist_ok=True)  # Docker mounts only what exists
        # 0700 and the agent's; the container runs as the agent's user, so it may use what is in there.
        self._home = Path(tempfile.mkdtemp(prefix="fedge-function-"))
        (self._home / "io").mkdir()
        (self._home / "credentials").mkdir()
        self._listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._listener.bind(str(self._home / "io" / _SOCKET))
        self._listener.listen(1)
        self._conn: socket.socket | None = None
        self._data = settings.data
        self.ready = False
        self.pid = 0
        self.idle_since = time.monotonic()
        mounts = [
            Mount(_IO, str(self._home / "io"), type="bind"),
            Mount(_CREDENTIALS, str(self._home / "credentials"), type="bind", read_only=True),
            Mount(_CACHE, str(settings.cache.resolve()), type="bind", read_only=True),
            *(Mount(str(p), str(p), type="bind", read_only=True) for p in settings.data),
        ]
        try:
            self._container: Container = client.containers.run(
                settings.image,
                [f"{_IO}/{_SOCKET}", str(threads)],
                entrypoint=["python", "-m", "fedge.edge_functions.container_worker"],
                detach=True,
                user=f"{os.getuid()}:{os.getgid()}",
                environment={"HOME": _SCRATCH, "FEDGE_CACHE_DIR": _CACHE},
                working_dir=_SCRATCH,
                mounts=mounts,
                read_only=True,
                tmpfs={_SCRATCH: "size=256m"},
                cap_drop=["ALL"],
                security_opt=["no-new-privileges"],
                network_mode=settings.network,
                mem_limit=settings.memory,
                memswap_limit=settings.memory,  # no swap beyond the limit: over it, the function is killed
                nano_cpus=None if settings.cpus is None else int(settings.cpus * 1e9),
                labels={LABEL: __version__},
            )
        except docker.errors.DockerException as exc:
            self._clean_up()
            raise WorkerFailed(f"could not start a container of {settings.image}: {exc}") from None
        self.name = self._container.short_id

    def start_up(self) -> float:
        """Wait until the container's worker has imported torch and connected; returns how long."""
        if self.ready:
            return 0.0
        started = time.perf_counter()
        give_up = time.monotonic() + START_TIMEOUT
        self._listener.settimeout(0.25)
        while self._conn is None:
            try:
                self._conn, _ = self._listener.accept()
            except TimeoutError:
                if not self._running():
                    words = self._last_words()
                    raise WorkerFailed(f"container {self.name} crashed while starting: {words}") from None
                if time.monotonic() > give_up:
                    raise WorkerFailed(f"container {self.name} hung while starting") from None
        self._receive(give_up, "while starting")
        with contextlib.suppress(docker.errors.DockerException):
            self._container.reload()
            self.pid = int(self._container.attrs["State"]["Pid"])
        self.ready = True
        return time.perf_counter() - started

    def call(self, function: str, event: dict, timeout: float | None) -> tuple[Any, float]:
        assert self._conn is not None
        staged, outbox = self._stage(event)
        give_up = time.monotonic() + (timeout or float("inf"))
        self._within(give_up)
        try:
            send(self._conn, {"function": function, "event": staged})
            reply = self._receive(give_up, f"running {function}")
        except TimeoutError:
            raise WorkerFailed(f"container {self.name} hung before running {function}") from None
        except OSError:
            raise WorkerFailed(f"container {self.name} crashed before running {function}") from None
        finally:
            self._unstage()  # the credentials are on disk for the invocation only
        if "error" in reply:
            raise self._parsed(function, lambda: decode_error(reply["error"]))
        result, seconds = self._parsed(
            function, lambda: (decode_result(reply["ok"]), float(reply["seconds"]))
        )
        if outbox is not None:
            self._deliver(Path(outbox))
        return result, seconds

    def _parsed(self, function: str, parse: Callable[[], T]) -> T:
        """What ``parse`` reads from a reply; a reply of the wrong shape is the container's failure."""
        try:
            return parse()
        except (KeyError, TypeError, ValueError):
            raise WorkerFailed(f"container {self.name} answered {function} with a malformed reply") from None

    def _receive(self, give_up: float, what: str) -> dict:
        assert self._conn is not None
        self._within(give_up)
        try:
            reply = receive(self._conn)
        except TimeoutError:
            raise WorkerFailed(f"container {self.name} hung {what}: stopped after the deadline") from None
        except (FrameError, OSError) as exc:
            words = self._last_words()
            raise WorkerFailed(f"container {self.name} crashed {what} ({exc}): {words}") from None
        if not isinstance(reply, dict):
            raise WorkerFailed(f"container {self.name} sent a malformed reply {what}")
        return reply

    def _within(self, give_up: float) -> None:
        """The socket's reads and writes time out at ``give_up`` (a monotonic time; infinite: never)."""
        assert self._conn is not None
        left = give_up - time.monotonic()
        self._conn.settimeout(None if left == float("inf") else max(left, 0.001))

    def _stage(self, event: dict) -> tuple[dict, str | None]:
        """The event as the container sees it: the client's credentials copied into its directory, the
        outbox its own; and the agent's outbox the update goes to after the invocation."""
        staged = dict(event)
        data = event.get("data")
        if isinstance(data, dict) and data.get("path") is not None:
            path = Path(data["path"]).resolve()
            if not any(path.is_relative_to(mount) for mount in self._data):
                raise ValueError(f"{path} is not mounted into the function's container")
        if isinstance(event.get("credentials"), dict):
            staged["credentials"] = self._stage_credentials(event["credentials"])
        outbox = event.get("outbox")
        for left in (self._home / "io" / "outbox").glob("*"):  # a failed invocation's leftovers
            left.unlink()
        if outbox is not None:
            staged["outbox"] = f"{_IO}/outbox"
        return staged, outbox

    def _stage_credentials(self, creds: dict) -> dict:
        """The client's CA, certificate and key in a directory named for it, with their mtimes: a renewed
        certificate has a new one, which the function's connection cache notices."""
        self._unstage()  # what a staging that failed half-way left
        slot = hashlib.sha256(str(creds["cert"]).encode()).hexdigest()[:16]
        (self._home / "credentials" / slot).mkdir(mode=0o700)
        staged = {}
        for name in ("ca", "cert", "key"):
            shutil.copy2(creds[name], self._home / "credentials" / slot / f"{name}.pem")
            staged[name] = f"{_CREDENTIALS}/{slot}/{name}.pem"
        return staged

    def _unstage(self) -> None:
        for slot in (self._home / "credentials").iterdir():
            shutil.rmtree(slot)

    def _deliver(self, outbox: Path) -> None:
        """Move the update the function left into the agent's outbox: regular files of an update's name
        only (a link the container made would have the agent read a file of its own choosing)."""
        for path in (self._home / "io" / "outbox").glob("*"):
            if _UPDATE.fullmatch(path.name) and stat.S_ISREG(path.lstat().st_mode):
                fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
                with os.fdopen(fd, "rb") as f:
                    outbox.mkdir(parents=True, exist_ok=True)
                    write_file(outbox / path.name, f.read())
            path.unlink()

    def _running(self) -> bool:
        try:
            self._container.reload()
        except docker.errors.NotFound:
            return False
        return self._container.status in ("created", "running")

    def _last_words(self) -> str:
        """Its exit code and the end of its output, for the line that says it failed."""
        with contextlib.suppress(Exception):
            code = self._container.wait(timeout=_STOP_SECONDS)["StatusCode"]
            self._container.reload()
            if self._container.attrs["State"]["OOMKilled"]:
                return f"exit code {code}: killed for using more than its memory limit"
            tail = self._container.logs(tail=5).decode(errors="replace").strip().replace("\n", " | ")
            return f"exit code {code}{': ' + tail if tail else ''}"
        return "no exit code"

    def ask_to_stop(self) -> None:
        if self._conn is not None:
            with contextlib.suppress(OSError):
                send(self._conn, None)

    def stop(self, force: bool = False) -> None:
        if not force:
            self.ask_to_stop()
            with contextlib.suppress(Exception):  # past the wait (a read timeout), it is killed
                self._container.wait(timeout=_STOP_SECONDS)
        with contextlib.suppress(docker.errors.DockerException):
            self._container.remove(force=True)
        self._clean_up()

    def _clean_up(self) -> None:
        if self._conn is not None:
            self._conn.close()
        self._listener.close()
        shutil.rmtree(self._home, ignore_errors=True)
