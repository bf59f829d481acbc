"""Which optional extra each command needs, and whether it is installed.

A device installed as ``fedge[agent]`` that runs ``fedge server`` is told in one line which extra to
install, instead of meeting ``ModuleNotFoundError: flwr`` half-way through start-up. What an extra holds is
read from the installed distribution's own metadata (pyproject's lists, as pip saw them), so nothing here
repeats them; only the command -> extra mapping lives here."""

from __future__ import annotations

import functools
import re
from collections.abc import Callable, Iterable, Mapping
from importlib import metadata
from typing import Any

import typer

from fedge.console import fail

DISTRIBUTION = "fedge"

# Commands by their words after ``fedge``; a command not listed needs only the base install.
NEEDS: dict[tuple[str, ...], str] = {
    ("server",): "server",
    ("executor",): "executor",
    ("simulate",): "simulation",
    ("agent", "run"): "agent",
    ("dashboard",): "server",
    ("report",): "simulation",
}

_NAME = re.compile(r"\s*([A-Za-z0-9][A-Za-z0-9._-]*)\s*(?:\[([^\]]*)\])?")
_EXTRA_ONLY = re.compile(r"""\s*extra\s*==\s*["']([^"']+)["']\s*""")


def by_extra(requires: Iterable[str]) -> dict[str, list[tuple[str, tuple[str, ...]]]]:
    """``Requires-Dist`` lines as (distribution, its extras) grouped by the extra asking for them, ``""``
    for the base. A line whose marker says more than ``extra == "X"`` cannot be judged without evaluating
    the marker, so it is left out: a missing-extra message must never be wrong."""
    grouped: dict[str, list[tuple[str, tuple[str, ...]]]] = {}
    for line in requires:
        requirement, _, marker = line.partition(";")
        name = _NAME.match(requirement)
        if name is None:
            continue
        extra = _EXTRA_ONLY.fullmatch(marker) if marker else None
        if marker and extra is None:
            continue
        wanted = tuple(e.strip() for e in (name.group(2) or "").split(",") if e.strip())
        grouped.setdefault(extra.group(1) if extra else "", []).append((name.group(1), wanted))
    return grouped


def distributions(extra: str, grouped: Mapping[str, list[tuple[str, tuple[str, ...]]]]) -> set[str]:
    """Every other distribution ``extra`` brings, following its references to this one's extras
    (``executor = ["fedge[agent]", ...]``)."""
    found: set[str] = set()
    pending, seen = [extra], set()
    while pending:
        current = pending.pop()
        seen.add(current)
        for name, extras in grouped.get(current, []):
            if name.lower() == DISTRIBUTION:
                pending.extend(e for e in extras if e not in seen)
            else:
                found.add(name)
    return found


def missing(extra: str, installed: Callable[[str], bool]) -> list[str]:
    """The distributions of ``extra`` not installed, by name; none when fedge runs from a source tree
    without metadata (nothing to compare against)."""
    try:
        requires = metadata.requires(DISTRIBUTION) or []
    except metadata.PackageNotFoundError:
        return []
    return sorted(name for name in distributions(extra, by_extra(requires)) if not installed(name))


def is_installed(name: str) -> bool:
    try:
        metadata.distribution(name)
    except metadata.PackageNotFoundError:
        return False
    return True


def message(command: tuple[str, ...], extra: str, absent: list[str]) -> str:
    return (
        f"fedge {' '.join(command)} needs the \"{extra}\" extra: pip install 'fedge[{extra}]' "
        f"(not installed: {', '.join(absent)})"
    )


def requiring(command: tuple[str, ...], extra: str, callback: Callable[..., Any]) -> Callable[..., Any]:
    """``callback`` that first checks its extra; the signature typer reads is the original's."""

    @functools.wraps(callback)
    def checked(*args: Any, **kwargs: Any) -> Any:
        absent = missing(extra, is_installed)
        if absent:
            fail(message(command, extra, absent))
        return callback(*args, **kwargs)

    return checked


def guard(app: typer.Typer, path: tuple[str, ...] = ()) -> None:
    """Make every command of ``app`` listed in ``NEEDS`` check its extra before it runs (after ``--help``,
    which works without it)."""
    for info in app.registered_commands:
        if info.callback is None:
            continue
        command = (*path, info.name or typer.main.get_command_name(info.callback.__name__))
        if command in NEEDS:
            info.callback = requiring(command, NEEDS[command], info.callback)
    for group in app.registered_groups:
        if group.typer_instance is not None and group.name is not None:
            guard(group.typer_instance, (*path, group.name))
