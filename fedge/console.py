"""How the CLI talks to people: rich output, and user errors as one line with a non-zero exit."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import NoReturn

import typer
from pydantic import ValidationError
from rich.console import Console

console = Console()
errors = Console(stderr=True)


class UserError(Exception):
    """Something the user can fix: shown as one line, never as a traceback."""


def fail(message: str, code: int = 1) -> NoReturn:
    errors.print(
        f"[bold red]error:[/] {message}", highlight=False, soft_wrap=True
    )  # one line, even in a pipe
    raise typer.Exit(code)


@contextlib.contextmanager
def user_errors(*kinds: type[Exception]) -> Iterator[None]:
    """Turn the listed exception types (and invalid settings) into one clear line and exit 1."""
    try:
        yield
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first["loc"]) or "settings"
        fail(f"invalid value for {where}: {first['msg']}")
    except (UserError, *kinds) as exc:
        fail(str(exc))
