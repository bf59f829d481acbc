"""How the CLI talks to people: rich output, and user errors as one line with a non-zero exit."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import NoReturn

import typer
from pydantic import ValidationError
from rich.console import Console
from rich.markup import escape

console = Console()
errors = Console(stderr=True)


class UserError(Exception):
    """Something the user can fix: shown as one line, never as a traceback."""


def command_group(help: str) -> typer.Typer:
    """A ``typer.Typer`` as every fedge command group is made. Help text is plain, not rich markup, so a
    default written ``[mnist]`` is shown rather than taken for a style; usage errors are click's one line."""
    return typer.Typer(help=help, no_args_is_help=True, rich_markup_mode=None, pretty_exceptions_enable=False)


def warn(message: str) -> None:
    """Something the user should know that does not stop the command: one line on stderr."""
    errors.print(f"[bold yellow]warning:[/] {escape(message)}", highlight=False, soft_wrap=True)


def fail(message: str, code: int = 1) -> NoReturn:
    errors.print(f"[bold red]error:[/] {escape(message)}", highlight=False, soft_wrap=True)
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
