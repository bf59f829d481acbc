"""The wheel's packages, found from pyproject's package-dir mapping (``fedge.server`` lives in ``server/``).

setuptools' own discovery does not follow a remapped package-dir, and the hand-kept list this replaces once
left ``fedge.edge_functions.adapters`` out of every installed copy. Here every folder under a mapped one that
holds a module is a package, so a new one cannot be left out; tests/test_packaging.py checks the built wheel
against the source tree."""

from __future__ import annotations

import tomllib
from pathlib import Path

from setuptools import setup

ROOT = Path(__file__).resolve().parent


def packages(mapping: dict[str, str], root: Path) -> list[str]:
    """Every package by import name: a folder under a mapped one (import name -> folder) holding a ``.py``."""
    found: set[str] = set()
    for package, folder in mapping.items():
        base = root / folder
        for module in base.rglob("*.py"):
            found.add(".".join((package, *module.parent.relative_to(base).parts)))
    return sorted(found)


if __name__ == "__main__":
    mapping = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["package-dir"]
    setup(packages=packages(mapping, ROOT))
