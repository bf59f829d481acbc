"""Every command, tried as a new user tries it: each option given a bad value in turn. Each try ends with
a non-zero exit, one error line and no traceback, and leaves the files around it exactly as they were.

The commands are read from the ``fedge`` app itself, so a command or option added later is walked too
(and an option without a bad value here fails the walk until it gets one)."""

from __future__ import annotations

import datetime
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import click
import numpy as np
import pytest
import typer.main
from conftest import toy_model, wait_for
from test_cli import assert_one_line_error
from typer.testing import CliRunner

from fedge.cli import app
from fedge.codec import encode
from fedge.security import pki, tokens

COMMAND = typer.main.get_command(app)


def commands(group: click.Command = COMMAND, path: tuple[str, ...] = ()) -> Iterator[tuple[str, ...]]:
    if isinstance(group, click.Group):
        for name, command in group.commands.items():
            yield from commands(command, (*path, name))
    else:
        yield path


def command(path: tuple[str, ...]) -> click.Command:
    found = COMMAND
    for name in path:
        found = found.commands[name]  # type: ignore[attr-defined]
    return found


def options(path: tuple[str, ...]) -> list[click.Option]:
    return [p for p in command(path).params if isinstance(p, click.Option) and not p.is_flag]


FREE_FORM = {"--mount", "--persistence", "--run-as"}  # paths inside a container, a user name: mosquitto's


def bad_values(path: tuple[str, ...], w: Path) -> dict[str, str]:
    """A value a user could type that the command must refuse, per option."""
    data_file = w / "notes.npz" if path == ("agent", "run") else w / "a-file"
    return {
        "--dir": str(w / "a-file"), "--pki": str(w / "a-file"), "--out": str(w / "a-file"),
        "--data": str(data_file), "--init-model": str(w / "notes.npz"), "--profile": str(w / "notes.npz"),
        "--ca": str(w / "notes.npz"), "--cert": str(w / "notes.npz"), "--key": str(w / "notes.npz"),
        "--port": "70000", "--task": "no-such-task", "--strategy": "fedsgd", "--dataset": "cifar",
        "--partition": "bogus", "--attack": "bribe", "--compression": "zip", "--placement": "anywhere",
        "--offload": "sometimes", "--store": "mysql://db/fedge", "--host": "999.1.1.1", "--ip": "999.1.1.1",
        "--bind": "999.1.1.1", "--server": "ftp://example", "--token": "forged", "--ca-fingerprint": "00",
        "--federation": "Bad Name!", "--client": "../x", "--admin": "../x", "--id": "../x",
        "--executor": "nonsense" if path[0] == "agent" else "../x", "--mqtt": "no-port",
        "--broker": "no-port", "--eval-data": str(w / "notes.npz"), "--log-format": "yaml",
        "--backend": "nowhere", "--ray-address": "127.0.0.1:1", "--runtime": "lambda",
        "--image": "Fedge Agent!", "--blobs": str(w / "a-file"),
        "--app": "no_such_module:app", "--flower-app": str(w / "a-file"),
        "--run-config": "no-equals-sign", "--label": "species",
        "--node-config": "partition-id=3 num-partitions=2", "--prices": str(w / "notes.npz"),
    }  # fmt: skip


def valid_values(path: tuple[str, ...], w: Path) -> dict[str, str]:
    """What a command is otherwise given: enough that only the bad value is wrong."""
    client = pki.credentials(w / "pki", pki.Role.CLIENT, "dev-1")
    given: dict[tuple[str, ...], dict[str, str]] = {
        ("server",): {"--pki": str(w / "pki"), "--data": str(w / "state"), "--port": "0",
                      "--init-model": str(w / "model.safetensors"), "--min-clients": "5"},
        ("simulate",): {"--out": str(w / "run"), "--clients": "2", "--rounds": "1", "--dataset": "digits"},
        ("executor",): {"--pki": str(w / "pki"), "--id": "gpu-1", "--server": "https://127.0.0.1:1",
                        "--port": "0"},
        ("pki", "init"): {"--dir": str(w / "new-pki"), "--federation": "acme"},
        ("pki", "server-cert"): {"--dir": str(w / "pki"), "--host": "localhost"},
        ("pki", "client-cert"): {"--dir": str(w / "pki"), "--client": "dev-2"},
        ("pki", "admin-cert"): {"--dir": str(w / "pki"), "--admin": "ops-2"},
        ("pki", "executor-cert"): {"--dir": str(w / "pki"), "--executor": "gpu-2"},
        ("pki", "token"): {"--dir": str(w / "pki"), "--client": "dev-3"},
        ("pki", "revoke"): {"--dir": str(w / "pki"), "--client": "dev-1"},
        ("broker", "config"): {"--pki": str(w / "pki"), "--out": str(w / "broker")},
        ("agent", "run"): {"--dir": str(w / "agent"), "--data": str(w / "data.npz"),
                           "--server": "https://127.0.0.1:1", "--ca": str(client.ca),
                           "--cert": str(client.cert), "--key": str(client.key), "--poll-wait": "1"},
        ("agent", "enroll"): {"--server": "https://127.0.0.1:1", "--token": "t", "--ca-fingerprint": "00",
                              "--dir": str(w / "device")},
    }  # fmt: skip
    return given.get(path, {"--dir": str(w / "pki")})


def bad_value(path: tuple[str, ...], option: click.Option, w: Path) -> str:
    named = bad_values(path, w)
    if option.opts[0] in named:
        return named[option.opts[0]]
    if option.type.name in ("integer", "float", "integer range", "float range"):
        return "-7"
    raise AssertionError(f"no bad value for {' '.join(path)} {option.opts[0]}: add one to bad_values")


def tries() -> list[tuple[tuple[str, ...], str]]:
    return [(path, o.opts[0]) for path in commands() for o in options(path) if o.opts[0] not in FREE_FORM]


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A federation the way a user has one: a PKI with a device and an executor, a model, device data,
    a text file named like data, and a plain file where folders are expected."""
    w = tmp_path_factory.mktemp("world")
    pki.init_ca(w / "pki", "acme")
    pki.issue(w / "pki", pki.Role.SERVER, "server", hosts=("127.0.0.1",))
    pki.issue(w / "pki", pki.Role.CLIENT, "dev-1")
    pki.issue(w / "pki", pki.Role.EXECUTOR, "gpu-1")
    tokens.mint(w / "pki", "dev-9", datetime.timedelta(hours=1))
    (w / "model.safetensors").write_bytes(encode(toy_model()))
    np.savez(w / "data.npz", x=np.zeros((4, 1, 8, 8), np.float32), y=np.zeros(4, np.int64))
    (w / "notes.npz").write_text("x y\n1 2\n")
    (w / "a-file").write_text("not a folder\n")
    return w


def snapshot(w: Path) -> dict[str, tuple[int, int]]:
    return {str(p.relative_to(w)): (p.stat().st_size, p.stat().st_mtime_ns) for p in sorted(w.rglob("*"))}


def attempt(path: tuple[str, ...], flag: str, w: Path) -> str:
    """Run ``fedge PATH`` with ``flag`` bad (in this process: the commands' own imports are paid once);
    what went wrong, or "" when the command refused it as it should."""
    option = next(o for o in options(path) if o.opts[0] == flag)
    given = {**valid_values(path, w), flag: bad_value(path, option, w)}
    if flag == "--task":
        given.pop("--init-model", None)  # with an initial model the task is the clients' business
    argv = [*path, *(part for item in given.items() for part in item)]
    before = snapshot(w)
    handlers = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT)}
    result = CliRunner().invoke(app, argv)
    for sig, handler in handlers.items():
        signal.signal(sig, handler)
    shown = f"fedge {' '.join(argv)}: {result.output!r}"
    errors = [line for line in result.stderr.splitlines() if line.lower().startswith("error")]
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        return f"{shown} raised {result.exception!r}"
    if result.exit_code == 0 or "Traceback" in result.output or len(errors) != 1:
        return f"{shown} exited {result.exit_code} with {len(errors)} error lines"
    if len([line for line in result.stderr.splitlines() if line.strip()]) > 4:  # click adds its usage
        return f"{shown} said more than an error line"
    if snapshot(w) != before:
        return f"{shown} changed files"
    return ""


@pytest.mark.parametrize("path", list(commands()), ids=" ".join)
def test_each_bad_value_is_one_error_line_and_changes_nothing(world: Path, path: tuple[str, ...]) -> None:
    """One child process tries every option of a command in turn, and says which it starts before it
    starts it: a bad value the command took would start a service, which the child is then stopped in."""
    flags = [flag for where, flag in tries() if where == path]
    if not flags:
        pytest.skip("no options to get wrong")
    environment = {
        **os.environ,
        "FEDGE_CONFIG": os.devnull,
        "FEDGE_CACHE_DIR": str(world.parent / "cache"),
        # The child imports conftest, which PYTHONSAFEPATH (set by `make test`) keeps off its path.
        "PYTHONPATH": str(Path(__file__).parent),
    }
    child = subprocess.Popen(
        [sys.executable, __file__, str(world), *path, "--", *flags],
        cwd=world, env=environment, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip
    try:
        out, _ = child.communicate(timeout=60 + 15 * len(flags))
    except subprocess.TimeoutExpired:
        child.kill()
        out, _ = child.communicate()
        started = [line for line in out.splitlines() if line.startswith("trying ")]
        pytest.fail(f"{started[-1] if started else 'the first try'} never ended: the bad value was taken")
    failures = [line for line in out.splitlines() if line.startswith("FAIL ")]
    assert not failures, "\n".join(failures)
    assert child.returncode == 0, out[-4000:]


@pytest.mark.parametrize("path", list(commands()), ids=" ".join)
def test_help_shows_every_default(path: tuple[str, ...]) -> None:
    """Each option's help, its ``[default]`` included, is in ``--help`` (compared without white space:
    click wraps lines at spaces and hyphens)."""
    result = CliRunner().invoke(app, [*path, "--help"])
    assert result.exit_code == 0, result.output
    shown = "".join(result.output.split())
    for option in options(path):
        assert "".join((option.help or "").split()) in shown, f"{' '.join(path)} {option.opts[0]}"


def run_fedge(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "fedge", *args], capture_output=True, text=True, timeout=120, cwd=cwd
    )


def test_a_second_server_on_the_same_data_is_refused_and_the_first_keeps_serving(
    start_server, tmp_path: Path, pki_dir: Path
) -> None:
    first = start_server()
    # The first round opens just after the service is up (a write of its own): the snapshot is taken after.
    wait_for(lambda: b"round 1 opened" in first.log.read_bytes(), 30, "round 1 to open")
    before = snapshot(first.data)
    second = run_fedge("server", "--pki", str(pki_dir), "--data", str(first.data), "--port", "0",
                       "--init-model", str(tmp_path / "initial.safetensors"))  # fmt: skip
    assert_one_line_error(second, f"in use by another fedge server (pid {first.process.pid})")
    assert snapshot(first.data) == before
    assert first.process.poll() is None


def test_an_unknown_task_leaves_no_data_folder(tmp_path: Path, pki_dir: Path) -> None:
    done = run_fedge("server", "--pki", str(pki_dir), "--data", str(tmp_path / "new" / "state"),
                     "--port", "0", "--task", "foo")  # fmt: skip
    assert_one_line_error(done, "unknown task 'foo'")
    assert not (tmp_path / "new").exists()


def test_a_broker_that_does_not_resolve_is_said_once_and_the_server_serves(
    start_server, tmp_path: Path
) -> None:
    server = start_server("--mqtt", "broker.invalid:8883")
    wait_for(lambda: b"does not resolve" in server.log.read_bytes(), 30, "the warning")
    log = server.log.read_text()
    assert log.count("does not resolve") == 1
    assert "'broker.invalid' does not resolve" in log
    assert "retrying with backoff" in log
    assert "Traceback" not in log


def test_a_revoked_agent_stops_and_says_so(
    start_server, start_agent, fresh_pki: Path, tmp_path: Path
) -> None:
    server = start_server("--min-clients", "9", pki_root=fresh_pki)  # no round: the agent only polls
    data = tmp_path / "data.npz"
    np.savez(data, x=np.zeros((4, 1, 8, 8), np.float32), y=np.zeros(4, np.int64))
    agent = start_agent(fresh_pki, "alice", data, server.url, "--poll-wait", "1")
    wait_for(lambda: agent.status().get("state") == "idle", 60, "the agent to start")
    assert run_fedge("pki", "revoke", "--dir", str(fresh_pki), "--client", "alice").returncode == 0
    assert agent.process.wait(60) == 1
    log = agent.log.read_text()
    assert "error: the server refuses this device's certificate: 401 certificate_revoked" in log
    assert "Traceback" not in log
    assert agent.status()["state"] == "stopped"
    assert "certificate_revoked" in agent.status()["detail"]


if __name__ == "__main__":  # the child of test_each_bad_value_is_one_error_line_and_changes_nothing
    world_dir, *rest = sys.argv[1:]
    at = rest.index("--")
    for tried in rest[at + 1 :]:
        print(f"trying {tried}", flush=True)
        if wrong := attempt(tuple(rest[:at]), tried, Path(world_dir)):
            print(f"FAIL {wrong}", flush=True)


def test_an_agent_whose_certificate_expires_stops_and_says_so(
    start_server, start_agent, fresh_pki: Path, tmp_path: Path
) -> None:
    """The server hangs up on an expired certificate without a word: the agent knows its own expiry."""
    server = start_server("--min-clients", "9", pki_root=fresh_pki)
    data = tmp_path / "data.npz"
    np.savez(data, x=np.zeros((4, 1, 8, 8), np.float32), y=np.zeros(4, np.int64))
    pki.issue(fresh_pki, pki.Role.CLIENT, "alice", lifetime=datetime.timedelta(seconds=-1))
    at_start = start_agent(fresh_pki, "alice", data, server.url)
    assert at_start.process.wait(60) == 1
    assert "alice.pem expired on" in " ".join(at_start.log.read_text().split())
    pki.issue(fresh_pki, pki.Role.CLIENT, "bob", lifetime=datetime.timedelta(seconds=30))
    agent = start_agent(fresh_pki, "bob", data, server.url, "--poll-wait", "1")
    wait_for(lambda: agent.status().get("state") == "idle", 60, "the agent to start")
    assert agent.process.wait(90) == 1
    log = agent.log.read_text()
    # On a connection kept open the server answers 401 certificate_expired; on a new one it hangs up.
    (error,) = [line for line in log.splitlines() if line.startswith("error:")]
    assert "certificate_expired" in error or "this device's certificate expired on" in error
    assert "Traceback" not in log


@pytest.mark.parametrize(
    ("out", "fragment"),
    [("a-file", "a-file is not a folder"), ("/proc/fedge/run", "cannot write into /proc/fedge/run")],
)
def test_simulate_refuses_an_out_it_cannot_write_before_it_starts(
    world: Path, monkeypatch: pytest.MonkeyPatch, out: str, fragment: str
) -> None:
    monkeypatch.chdir(world)
    result = CliRunner().invoke(app, ["simulate", "--out", out, "--clients", "2", "--rounds", "1"])
    assert result.exit_code == 1
    assert fragment in " ".join(result.stderr.split())


def test_a_text_file_given_as_data_is_named_for_what_it_is_not(world: Path) -> None:
    """It once read "pickled (object) data", which it is not either."""
    argv = ["agent", "run", *(p for item in valid_values(("agent", "run"), world).items() for p in item)]
    result = CliRunner().invoke(app, [*argv, "--data", str(world / "notes.npz")])
    assert result.exit_code == 1
    assert "notes.npz is not an .npz archive (numpy.savez) with arrays x and y" in result.stderr
    assert "pickled" not in result.stderr
