"""The architecture of design.md, checked: the parts import one another in one direction only, and no module
imports itself back through others. (That the wheel holds every module of the tree is checked on the built
wheel, in test_packaging.py: setup.py finds the packages from the same package-dir mapping.)

Imports are read with ``ast`` from the source, those inside functions included, so a lazy import cannot
hide an edge that would break the order."""

from __future__ import annotations

import ast
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE_DIRS = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["package-dir"]

# Lower ranks are imported by higher ones, never the reverse. The kernel (fedge/) and security share the
# base: they may use each other, as long as no module cycle forms (checked below).
KERNEL, EDGE_FUNCTIONS, CLIENT, SERVER, TOP = range(5)
PART_RANKS = {
    "fedge.security": KERNEL,
    "fedge.edge_functions": EDGE_FUNCTIONS,
    "fedge.client": CLIENT,
    "fedge.server": SERVER,
    "fedge.sim": TOP,
    "fedge.cli": TOP,
    "fedge.__main__": TOP,
}


def modules() -> dict[str, Path]:
    """Every module of the distribution by import name: ``server/rounds.py`` is ``fedge.server.rounds``."""
    found: dict[str, Path] = {}
    for package, folder in PACKAGE_DIRS.items():
        for path in (ROOT / folder).rglob("*.py"):
            parts = path.relative_to(ROOT / folder).with_suffix("").parts
            name = ".".join((package, *parts)).removesuffix(".__init__")
            found.setdefault(name, path)  # fedge/sim/x.py is found under "fedge" only; names agree
    return found


def rank(module: str) -> int:
    for prefix, value in PART_RANKS.items():
        if module == prefix or module.startswith(prefix + "."):
            return value
    return KERNEL


def part(module: str) -> str:
    return next((p for p in PART_RANKS if module == p or module.startswith(p + ".")), "fedge")


def imports_of(name: str, path: Path, known: set[str]) -> set[str]:
    """The fedge modules ``name`` imports, anywhere in its source."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names if alias.name in known}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            for alias in node.names:
                submodule = f"{node.module}.{alias.name}"
                if submodule in known:
                    found.add(submodule)
                elif node.module in known:
                    found.add(node.module)
    found.discard(name)
    return found


def graph() -> dict[str, set[str]]:
    found = modules()
    return {name: imports_of(name, path, set(found)) for name, path in found.items()}


def test_parts_import_only_parts_below_them() -> None:
    wrong = [
        f"{a} imports {b}"
        for a, targets in graph().items()
        for b in targets
        if rank(b) > rank(a) or (rank(b) == rank(a) != KERNEL and part(b) != part(a) and rank(a) != TOP)
    ]
    assert wrong == []


def test_no_module_imports_itself_back() -> None:
    edges = graph()
    cycles: list[list[str]] = []
    state: dict[str, int] = {}  # 1: on the current path, 2: done

    def visit(node: str, path: list[str]) -> None:
        state[node] = 1
        for target in sorted(edges[node]):
            if state.get(target) == 1:
                cycles.append([*path[path.index(target) :], target])
            elif target not in state:
                visit(target, [*path, target])
        state[node] = 2

    for node in sorted(edges):
        if node not in state:
            visit(node, [node])
    assert cycles == []


@pytest.mark.parametrize(
    ("module", "imported", "allowed"),
    [
        ("fedge.server.api", "fedge.client.predictor", True),
        ("fedge.client.agent", "fedge.server.rounds", False),
        ("fedge.codec", "fedge.security.pki", True),
        ("fedge.wire", "fedge.sim.run", False),
        ("fedge.edge_functions.functions", "fedge.client.policy", False),
        ("fedge.sim.fleet", "fedge.server.launcher", True),
    ],
)
def test_the_order_is_the_designs(module: str, imported: str, allowed: bool) -> None:
    assert (rank(imported) <= rank(module)) is allowed
