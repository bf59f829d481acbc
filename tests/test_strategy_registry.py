"""Strategies declare their parameters once; the commands, the settings and the admin API follow."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Annotated, Any

import pytest
import typer
import typer.main
from pydantic import Field

from fedge.cli import app
from fedge.codec import Tensors
from fedge.server.cli import strategy_options
from fedge.server.strategies import STRATEGIES, Strategy, StrategyError, Weighted, create, registry
from fedge.server.strategies.robust import KrumParams
from fedge.settings import SimulationSettings


@dataclass(frozen=True)
class ScaledParams:
    scale: Annotated[float, Field(gt=0)] = field(default=1.0, metadata={"help": "factor of the mean"})


class Scaled(Strategy[ScaledParams]):
    """A strategy a test registers: the weighted mean times ``scale``."""

    name = "scaled"
    Params = ScaledParams

    def aggregate(
        self, round_: int, model: Tensors, mean: Tensors | None, updates: Sequence[Weighted]
    ) -> Tensors:
        assert mean is not None
        return {n: t * self.params.scale for n, t in mean.items()}


CLICK_TYPES = {int: "integer", float: "float", str: "text", bool: "boolean"}


def command_options(command: Any) -> dict[str, Any]:
    """The click options of a typer command, by flag."""
    return {p.opts[0]: p for p in typer.main.get_command(app).commands[command].params}


@pytest.mark.parametrize("command", ["server", "simulate"])
def test_every_strategy_parameter_is_an_option_of_both_commands_with_its_type_and_help(command) -> None:
    options = command_options(command)
    for name, cls in STRATEGIES.items():
        for f in fields(cls.Params):
            option = options[f"--{f.name.replace('_', '-')}"]
            assert option.type.name == CLICK_TYPES[registry.options()[f.name].flag_type]
            assert name in option.help
            assert f.metadata["help"] in option.help
    assert all(name in options["--strategy"].help for name in STRATEGIES)


def test_strategies_that_share_a_parameter_share_one_option() -> None:
    assert registry.options()["malicious"].strategies == ("krum", "bulyan")
    assert registry.options()["malicious"].help_text == "krum/bulyan: malicious clients tolerated [0]"


def test_a_newly_registered_strategy_is_a_choice_with_its_own_options(monkeypatch) -> None:
    monkeypatch.setitem(STRATEGIES, "scaled", Scaled)

    @strategy_options
    def command(**knobs: Any) -> None:
        """A command that takes the strategies' options."""

    cli = typer.Typer()
    cli.command()(command)
    options = {p.opts[0]: p for p in typer.main.get_command(cli).params}
    assert "scaled" in options["--strategy"].help
    assert options["--scale"].help == "scaled: factor of the mean [1.0]"
    assert create("scaled", {"scale": 2.0}).params == ScaledParams(2.0)
    settings = SimulationSettings.with_knobs(registry.settings_fields())(strategy="scaled", scale=3.0)
    assert registry.pick("scaled", settings.model_dump(), 0).params == ScaledParams(3.0)


def test_two_strategies_declaring_one_parameter_differently_is_caught(monkeypatch) -> None:
    @dataclass(frozen=True)
    class OtherKeep:
        keep: int = field(default=3, metadata={"help": "something else"})

    class Clash(Scaled):
        name = "clash"
        Params = OtherKeep

    monkeypatch.setitem(STRATEGIES, "clash", Clash)
    with pytest.raises(TypeError, match="clash declares keep unlike krum"):
        registry.options()


@pytest.mark.parametrize(
    ("name", "params", "fragments"),
    [
        ("trimmed-mean", {"malicious": 1}, ["trimmed-mean takes no parameter malicious", "trim_fraction"]),
        ("fedmedian", {"trim_fraction": 0.1}, ["fedmedian takes no parameter trim_fraction", "none"]),
        ("krum", {"keep": "many"}, ["--keep", "integer"]),
        ("fedadam", {"beta1": 1.0}, ["--beta1", "less than 1"]),
    ],
)
def test_parameters_are_checked_against_the_chosen_strategys_declaration(
    name: str, params: dict[str, object], fragments: list[str]
) -> None:
    with pytest.raises(StrategyError) as refused:
        create(name, params)
    for fragment in fragments:
        assert fragment in str(refused.value)


def test_strategy_parameters_come_from_the_environment_and_fedge_toml(tmp_path: Path, monkeypatch) -> None:
    (tmp_path / "fedge.toml").write_text('[simulate]\nstrategy = "krum"\nmalicious = 2\n')
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("FEDGE_KEEP", "4")
    settings = SimulationSettings.with_knobs(registry.settings_fields()).from_flags(trim_fraction=0.1)
    assert registry.pick(settings.strategy, settings.model_dump(), 0).params == KrumParams(2, 4)
    flags = settings.aggregation_flags()
    assert flags[:2] == ["--strategy", "krum"]
    assert {"--malicious": "2", "--keep": "4", "--trim-fraction": "0.1"}.items() <= dict(
        zip(flags[::2], flags[1::2], strict=True)
    ).items()


def test_the_choices_list_the_plain_mean_first_as_they_always_have() -> None:
    assert list(STRATEGIES)[:2] == ["fedavg", "fedprox"]
    assert list(STRATEGIES)[-2:] == ["krum", "bulyan"]
