"""What users install, tested as they install it: the wheel, built from an sdist as pip would, installed
non-editable into a fresh venv per extra, with every module imported and every command's ``--help`` run
from the installed copy, far from the source tree. An editable install reads the source folders, so a
package the wheel leaves out, or an extra that lacks what its commands import, shows only here.

Each venv is made once for the module, from a wheelhouse that pip fills once by resolving ``fedge[all]``
against the package index (resolving against a large index, per venv, was most of the time). torch (the CPU
build) is unpacked once into a folder every venv reads through a ``.pth`` file: pip counts it as installed,
as a venv's own torch would be, and 750 MB is not written three times. ``--no-compile`` skips bytecode."""

from __future__ import annotations

import importlib
import json
import os
import subprocess
import sys
import tomllib
import zipfile
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import pytest
import typer
from click import Group
from conftest import free_port, wait_for

from fedge import extras
from fedge.cli import app

ROOT = Path(__file__).resolve().parents[1]
PACKAGE_DIRS = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["package-dir"]
TORCH = "torch==2.13.0"  # the CPU build, on disk; a bare `torch` would pull the CUDA one
INSTALL_TIMEOUT = 600

# Run in the installed interpreter: every module the installed distribution ships, imported, and every
# command's --help through typer's runner (one process, not one per command).
PROBE = """
import importlib, json
from importlib import metadata

import click, typer
from typer.testing import CliRunner

names = sorted(
    str(f.with_suffix("")).replace("/", ".").removesuffix(".__init__")
    for f in metadata.files("fedge") if f.suffix == ".py" and f.parts[0] == "fedge"
)
failed = {}
for name in names:
    if name != "fedge.__main__":  # runs the CLI on import; the console script covers it
        try:
            importlib.import_module(name)
        except Exception as exc:
            failed[name] = [type(exc).__name__, getattr(exc, "name", None) or str(exc)]

from fedge.cli import app

def paths(command, prefix):
    yield prefix
    for name, sub in getattr(command, "commands", {}).items():
        yield from paths(sub, (*prefix, name))

helpless = {}
commands = [" ".join(p) for p in paths(typer.main.get_command(app), ())]
for command in commands:
    result = CliRunner().invoke(app, [*command.split(), "--help"], prog_name="fedge")
    if result.exit_code != 0 or "Usage:" not in result.output:
        helpless[command] = result.output[-500:]

import fedge
print(json.dumps({"file": fedge.__file__, "modules": names, "failed": failed, "commands": commands,
                  "helpless": helpless}))
"""

# Import names that differ from the distribution that brings them.
DISTRIBUTION_OF = {"sklearn": "scikit-learn", "paho": "paho-mqtt", "prometheus_client": "prometheus-client"}


def source_modules() -> set[str]:
    """Every module file the wheel must hold, as its path inside the wheel."""
    return {
        "/".join((*package.split("."), *path.relative_to(ROOT / folder).parts))
        for package, folder in PACKAGE_DIRS.items()
        for path in (ROOT / folder).rglob("*.py")
    }


@dataclass(frozen=True)
class Install:
    """A venv holding the wheel with one extra, and how to run its ``fedge`` away from the source tree."""

    root: Path
    home: Path

    @property
    def bin(self) -> Path:
        return self.root / "bin"

    def env(self) -> dict[str, str]:
        keep = {k: v for k, v in os.environ.items() if not k.startswith(("PYTHON", "FEDGE_", "VIRTUAL_ENV"))}
        return {**keep, "HOME": str(self.home), "FEDGE_CONFIG": os.devnull, "PYTHONSAFEPATH": "1"}

    def fedge(self, *args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [str(self.bin / "fedge"), *args],
            cwd=self.home,
            env=self.env(),
            capture_output=True,
            text=True,
            timeout=120,
        )

    @cached_property
    def probe(self) -> dict:
        done = subprocess.run(
            [str(self.bin / "python"), "-c", PROBE],
            cwd=self.home,
            env=self.env(),
            capture_output=True,
            text=True,
            timeout=300,
            check=True,
        )
        return json.loads(done.stdout.splitlines()[-1])


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The wheel as pip builds it from the sdist: an unpacked sdist in a temporary folder, so neither a
    stale ``build/`` nor a file the sdist leaves out can hide."""
    out = tmp_path_factory.mktemp("dist")
    subprocess.run(
        [sys.executable, "-m", "build", "--outdir", str(out), str(ROOT)],
        capture_output=True,
        check=True,
        timeout=INSTALL_TIMEOUT,
    )
    (found,) = out.glob("fedge-*.whl")
    return found


@pytest.fixture(scope="module")
def wheelhouse(wheel: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Every distribution any extra needs, as pip resolves ``fedge[all]`` from the index."""
    house = tmp_path_factory.mktemp("wheelhouse")
    pip(sys.executable, "download", "--dest", str(house), f"{wheel}[all]")
    return house


@pytest.fixture(scope="module")
def torch_layer(wheelhouse: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """torch and what it pulls, unpacked once for every venv of the module."""
    layer = tmp_path_factory.mktemp("torch")
    pip(sys.executable, "install", *offline(wheelhouse), "--target", str(layer), TORCH)
    return layer


def pip(python: str | Path, *args: str) -> None:
    subprocess.run(
        [str(python), "-m", "pip", "--quiet", *args], capture_output=True, check=True, timeout=INSTALL_TIMEOUT
    )


def offline(wheelhouse: Path) -> list[str]:
    return ["--no-compile", "--no-index", "--find-links", str(wheelhouse)]


def install(
    tmp_path_factory: pytest.TempPathFactory, wheelhouse: Path, extra: str | None, torch: Path | None
) -> Install:
    place = tmp_path_factory.mktemp(f"venv-{extra or 'base'}")
    venv = Install(place / "venv", place / "home")
    venv.home.mkdir()
    # No pip of its own (ensurepip is seconds per venv): this pip installs into it, with --python.
    subprocess.run(
        [sys.executable, "-m", "venv", "--without-pip", str(venv.root)], check=True, timeout=INSTALL_TIMEOUT
    )
    if torch is not None:
        (site_packages,) = venv.root.glob("lib/python*/site-packages")
        (site_packages / "torch-layer.pth").write_text(f"{torch}\n")
    (wheel,) = wheelhouse.glob("fedge-*.whl")
    requirement = f"{wheel}[{extra}]" if extra else str(wheel)
    pip(sys.executable, "--python", str(venv.bin / "python"), "install", *offline(wheelhouse), requirement)
    return venv


@pytest.fixture(scope="module")
def base(tmp_path_factory: pytest.TempPathFactory, wheelhouse: Path) -> Install:
    return install(tmp_path_factory, wheelhouse, None, None)


@pytest.fixture(scope="module")
def agent(tmp_path_factory: pytest.TempPathFactory, wheelhouse: Path, torch_layer: Path) -> Install:
    return install(tmp_path_factory, wheelhouse, "agent", torch_layer)


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory, wheelhouse: Path, torch_layer: Path) -> Install:
    return install(tmp_path_factory, wheelhouse, "server", torch_layer)


@pytest.fixture(scope="module")
def everything(tmp_path_factory: pytest.TempPathFactory, wheelhouse: Path, torch_layer: Path) -> Install:
    return install(tmp_path_factory, wheelhouse, "all", torch_layer)


def brought_by(extra: str) -> set[str]:
    """The distributions ``extra`` installs besides the base, by normalized name."""
    grouped = extras.by_extra(tomllib_requires())
    return {normal(name) for name in extras.distributions(extra, grouped)}


def tomllib_requires() -> list[str]:
    """pyproject's requirements as ``Requires-Dist`` lines, so the expectations follow the source."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    lines = list(project["dependencies"])
    for extra, requirements in project["optional-dependencies"].items():
        lines += [f'{r}; extra == "{extra}"' for r in requirements]
    return lines


def normal(name: str) -> str:
    return name.lower().replace("_", "-")


def missing_only_what_the_extra_lacks(venv: Install, extra: str) -> dict[str, list[str]]:
    """The modules that failed to import for any reason other than a distribution ``extra`` does not
    bring (an import error of ours, or a dependency the extra should have had)."""
    lacking = brought_by("all") - brought_by(extra)
    return {
        name: [kind, missing]
        for name, (kind, missing) in venv.probe["failed"].items()
        if kind != "ModuleNotFoundError"
        or normal(DISTRIBUTION_OF.get(missing.split(".")[0], missing.split(".")[0])) not in lacking
    }


def test_the_wheel_holds_every_module_of_the_source_tree_and_nothing_else(wheel: Path) -> None:
    with zipfile.ZipFile(wheel) as archive:
        shipped = {name for name in archive.namelist() if name.endswith(".py")}
    assert shipped == source_modules()


def test_a_full_install_imports_every_module_from_site_packages(everything: Install) -> None:
    probe = everything.probe
    assert Path(probe["file"]).is_relative_to(everything.root)
    assert {m.replace(".", "/") for m in probe["modules"]} == {
        m.removesuffix(".py").removesuffix("/__init__") for m in source_modules()
    }
    assert probe["failed"] == {}


@pytest.mark.parametrize("venv", ["base", "agent", "server", "everything"])
def test_every_command_shows_its_help_whatever_extra_is_installed(
    venv: str, request: pytest.FixtureRequest
) -> None:
    installed: Install = request.getfixturevalue(venv)
    assert installed.probe["helpless"] == {}
    assert "server" in installed.probe["commands"]
    shown = installed.fedge("--help")  # the console script itself, as a user runs it
    assert shown.returncode == 0, shown.stderr
    assert "simulate" in shown.stdout


@pytest.mark.parametrize(("venv", "extra"), [("base", None), ("agent", "agent"), ("server", "server")])
def test_a_module_fails_to_import_only_for_what_its_install_lacks(
    venv: str, extra: str | None, request: pytest.FixtureRequest
) -> None:
    installed: Install = request.getfixturevalue(venv)
    assert missing_only_what_the_extra_lacks(installed, extra or "") == {}


def test_an_agent_install_imports_the_whole_agent(agent: Install) -> None:
    assert [m for m in agent.probe["failed"] if m.startswith("fedge.client")] == []


@pytest.mark.parametrize(
    ("venv", "command", "extra"),
    [
        ("agent", ["server"], "server"),
        ("agent", ["simulate"], "simulation"),
        (
            "agent",
            ["executor", "--pki", "pki", "--id", "gpu-1", "--server", "https://127.0.0.1:8443"],
            "executor",
        ),
        ("server", ["agent", "run"], "agent"),
        ("server", ["simulate"], "simulation"),
        ("base", ["server"], "server"),
    ],
)
def test_a_command_whose_extra_is_missing_names_it_in_one_line(
    venv: str, command: list[str], extra: str, request: pytest.FixtureRequest
) -> None:
    installed: Install = request.getfixturevalue(venv)
    done = installed.fedge(*command)
    assert done.returncode == 1
    assert done.stdout == ""
    (line,) = done.stderr.splitlines()
    assert line.startswith(f"error: fedge {command[0]}")
    assert f"needs the \"{extra}\" extra: pip install 'fedge[{extra}]'" in line


def test_a_command_with_its_extra_gets_past_the_check(agent: Install) -> None:
    done = agent.fedge("agent", "run", "--dir", "not-enrolled")
    assert done.returncode == 1
    assert "extra" not in done.stderr
    assert "Traceback" not in done.stderr


def test_a_server_install_serves_a_federation(server: Install) -> None:
    """The server extra holds all the server runs on, the initial model's torch included."""
    for command in (
        ("pki", "init", "--dir", "pki", "--federation", "acme"),
        ("pki", "server-cert", "--dir", "pki", "--host", "localhost", "--ip", "127.0.0.1"),
        ("pki", "client-cert", "--dir", "pki", "--client", "device-1"),
    ):
        done = server.fedge(*command)
        assert done.returncode == 0, done.stderr
    log = server.home / "server.log"
    port = free_port()
    with log.open("wb") as out:
        process = subprocess.Popen(
            [str(server.bin / "fedge"), "server", "--pki", "pki", "--data", "state", "--port", str(port)],
            cwd=server.home,
            env=server.env(),
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    try:
        wait_for(
            lambda: process.poll() is not None or f":{port}" in log.read_text(), 120, "the server to listen"
        )
        assert process.poll() is None, log.read_text()
    finally:
        process.terminate()
        process.wait(timeout=30)
    assert "Traceback" not in log.read_text()


def test_the_base_install_runs_the_pki_without_any_extra(base: Install) -> None:
    done = base.fedge("pki", "init", "--dir", "pki", "--federation", "acme")
    assert done.returncode == 0, done.stderr
    assert (base.home / "pki" / "ca.pem").exists()


def test_every_command_that_needs_an_extra_exists() -> None:
    root = typer.main.get_command(app)

    def exists(words: tuple[str, ...]) -> bool:
        command = root
        for word in words:
            if not isinstance(command, Group) or word not in command.commands:
                return False
            command = command.commands[word]
        return True

    assert [words for words in extras.NEEDS if not exists(words)] == []
    declared = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    assert set(extras.NEEDS.values()) <= set(declared)


def test_an_extra_brings_what_the_extras_it_names_bring() -> None:
    grouped = extras.by_extra(
        [
            "numpy>=1.26",
            'torch>=2.3; extra == "agent"',
            'psycopg[binary]>=3.1; extra == "server"',
            'fedge[agent]; extra == "executor"',
            "uvicorn<0.50,>=0.30; extra == 'executor'",
            'fedge[executor,server]; extra == "all"',
            'tomli; python_version < "3.11" and extra == "server"',
        ]
    )
    assert extras.distributions("", grouped) == {"numpy"}
    assert extras.distributions("executor", grouped) == {"torch", "uvicorn"}
    assert extras.distributions("all", grouped) == {"torch", "uvicorn", "psycopg"}
    assert extras.distributions("nothing", grouped) == set()


def test_installed_tests_import_the_installed_copy() -> None:
    """``make test`` installs the wheel into .venv and says so: the suite must then run that copy."""
    if os.environ.get("FEDGE_TEST_INSTALLED") != "1":
        pytest.skip(
            "the suite runs against an editable install (make dev); make test sets FEDGE_TEST_INSTALLED"
        )
    for package, folder in (("fedge", "fedge"), ("fedge.server", "server")):
        where = Path(importlib.import_module(package).__file__).parent
        assert "site-packages" in where.parts
        assert where != ROOT / folder
