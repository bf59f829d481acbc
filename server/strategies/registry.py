"""Strategies by name, and their parameters as every surface takes them.

Each strategy module registers its classes with ``@register``. The ``--strategy`` choices, the options of
``fedge server`` and ``fedge simulate``, the ``FEDGE_*`` settings and ``fedge.toml`` keys, and the checks of
``PUT /v1/admin/strategy`` are all read from this table, so a strategy's knob is declared once: as a field
of its ``Params`` dataclass, typed, constrained (``Annotated[float, Field(ge=0)]``), with a default and help.
"""

from __future__ import annotations

import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass, fields, replace
from typing import Any, TypeVar

from pydantic import TypeAdapter, ValidationError

from fedge.server.strategies.base import Strategy, StrategyError

STRATEGIES: dict[str, type[Strategy]] = {}

S = TypeVar("S", bound=type[Strategy])


def register(cls: S) -> S:
    """Make a strategy choosable by its ``name``."""
    STRATEGIES[cls.name] = cls
    return cls


@dataclass(frozen=True)
class Option:
    """One strategy parameter as a flag, a setting and an admin parameter; strategies that share a
    parameter (krum's and bulyan's ``malicious``) share its option."""

    name: str
    annotation: Any  # the field's type with its constraints, as pydantic validates it
    default: Any
    help: str
    default_text: str
    strategies: tuple[str, ...]

    @property
    def flag_type(self) -> type:
        """The plain type a command-line parser converts the flag's text to (``float`` for
        ``Annotated[float, Field(gt=0)] | None``)."""
        kind = self.annotation
        while typing.get_origin(kind) in (typing.Annotated, typing.Union, types.UnionType):
            kind = next(a for a in typing.get_args(kind) if a is not type(None))
        return kind

    @property
    def help_text(self) -> str:
        return f"{'/'.join(self.strategies)}: {self.help} [{self.default_text}]"


def options() -> dict[str, Option]:
    """Every parameter of every registered strategy, once, in registration order."""
    found: dict[str, Option] = {}
    for name, cls in STRATEGIES.items():
        hints = typing.get_type_hints(cls.Params, include_extras=True)
        for f in fields(cls.Params):
            if "help" not in f.metadata:
                raise TypeError(f"{name} declares {f.name} without help")
            known = found.get(f.name)
            text = f.metadata.get("default_text", str(f.default))
            option = Option(f.name, hints[f.name], f.default, f.metadata["help"], text, (name,))
            declared = (repr(option.annotation), option.default, option.help)
            if known is not None and (repr(known.annotation), known.default, known.help) != declared:
                raise TypeError(f"{name} declares {f.name} unlike {known.strategies[0]} does")
            found[f.name] = option if known is None else replace(known, strategies=(*known.strategies, name))
    return found


def settings_fields() -> dict[str, tuple[Any, Any]]:
    """The parameters as pydantic fields (type with constraints, default), for the commands' settings."""
    return {o.name: (o.annotation, o.default) for o in options().values()}


def lookup(name: str) -> type[Strategy]:
    """The strategy class called ``name``; ``StrategyError`` with the choices when there is none."""
    if name not in STRATEGIES:
        raise StrategyError(f"unknown strategy {name!r}: choose from {', '.join(STRATEGIES)}")
    return STRATEGIES[name]


def parameters(name: str) -> tuple[str, ...]:
    return tuple(f.name for f in fields(lookup(name).Params))


def create(name: str, params: Mapping[str, object] | None = None, seed: int = 0) -> Strategy:
    """The strategy ``name`` with ``params`` checked against its declaration: an unknown parameter, a
    wrong type or a value out of range is a ``StrategyError`` naming the flag."""
    cls = lookup(name)
    given = dict(params or {})
    if unknown := sorted(set(given) - set(parameters(name))):
        takes = ", ".join(parameters(name)) or "none"
        raise StrategyError(f"{name} takes no parameter {', '.join(unknown)} (its parameters: {takes})")
    try:
        checked = TypeAdapter(cls.Params).validate_python(given)
    except ValidationError as exc:
        reasons = (f"--{'.'.join(map(str, e['loc'])).replace('_', '-')}: {e['msg']}" for e in exc.errors())
        raise StrategyError(f"{name}: {'; '.join(reasons)}") from None
    return cls(checked, seed)


def pick(name: str, values: Mapping[str, object], seed: int = 0) -> Strategy:
    """The strategy ``name`` with its own parameters taken from ``values``, which hold every strategy's
    (a command's settings; a choice stored by a server that kept every knob)."""
    own = set(parameters(name))
    return create(name, {k: v for k, v in values.items() if k in own}, seed)
