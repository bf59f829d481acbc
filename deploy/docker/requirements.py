"""Print fedge's requirements for the given extras, one a line, read from pyproject.toml.

The images install these in a layer of their own, before the wheel: the layer's cache key is pyproject.toml,
so a rebuild after a code change reuses every dependency and reinstalls only fedge itself.

    python requirements.py PYPROJECT EXTRA...
"""

from __future__ import annotations

import re
import sys
import tomllib
from pathlib import Path

_SELF = re.compile(r"^(?P<name>[A-Za-z0-9_.-]+)\[(?P<extras>[^\]]+)\]$")


def requirements(project: dict, extras: list[str]) -> list[str]:
    """The base dependencies plus each extra's, with the project's references to itself expanded."""
    name = project["name"]
    optional = project.get("optional-dependencies", {})
    found: list[str] = list(project.get("dependencies", []))
    pending, seen = list(extras), set()
    while pending:
        extra = pending.pop()
        if extra in seen:
            continue
        if extra not in optional:
            raise SystemExit(f"error: {name} has no extra {extra!r}")
        seen.add(extra)
        for requirement in optional[extra]:
            match = _SELF.match(requirement.replace(" ", ""))
            if match and match["name"] == name:
                pending.extend(match["extras"].split(","))
            elif requirement not in found:
                found.append(requirement)
    return found


if __name__ == "__main__":
    if len(sys.argv) < 3:
        raise SystemExit(__doc__)
    project = tomllib.loads(Path(sys.argv[1]).read_text())["project"]
    print("\n".join(requirements(project, sys.argv[2:])))
