"""docs/benchmarks.md never presents a figure made on other code as current: each result carries a fingerprint
of the sources it measured, and a changed source moves the figure to the stale section."""

from __future__ import annotations

import importlib.util
import shutil
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def bench_main(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """bench/__main__.py pointed at a copy of the measured sources, which the test may change."""
    for folder in ("fedge", "server", "client", "edge_functions", "security", "bench"):
        shutil.copytree(
            ROOT / folder, tmp_path / folder, ignore=shutil.ignore_patterns("results", "__pycache__")
        )
    spec = importlib.util.spec_from_file_location("bench_main_under_test", ROOT / "bench" / "__main__.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    monkeypatch.setattr(module, "ROOT", tmp_path)
    return module


def test_fingerprint_is_stable_for_unchanged_code(bench_main) -> None:
    assert bench_main.code_fingerprint("aggregation") == bench_main.code_fingerprint("aggregation")


def test_fingerprint_changes_when_a_measured_source_changes(bench_main, tmp_path: Path) -> None:
    before = bench_main.code_fingerprint("aggregation")
    rounds = tmp_path / "server" / "rounds.py"
    rounds.write_text(rounds.read_text() + "\n# changed\n")
    assert bench_main.code_fingerprint("aggregation") != before


def test_fingerprint_changes_with_the_benchmark_itself_but_not_another(bench_main, tmp_path: Path) -> None:
    aggregation, ingestion = (
        bench_main.code_fingerprint("aggregation"),
        bench_main.code_fingerprint("ingestion"),
    )
    module = tmp_path / "bench" / "aggregation.py"
    module.write_text(module.read_text() + "\n# changed\n")
    assert bench_main.code_fingerprint("aggregation") != aggregation
    assert bench_main.code_fingerprint("ingestion") == ingestion


def test_a_file_outside_the_measured_code_leaves_figures_current(bench_main, tmp_path: Path) -> None:
    before = bench_main.code_fingerprint("aggregation")
    (tmp_path / "server" / "notes.txt").write_text("not code")
    assert bench_main.code_fingerprint("aggregation") == before


def test_a_shared_bench_helper_makes_the_figures_of_its_users_stale(bench_main, tmp_path: Path) -> None:
    ingestion, aggregation = (
        bench_main.code_fingerprint("ingestion"),
        bench_main.code_fingerprint("aggregation"),
    )
    helper = tmp_path / "bench" / "loopback_pki.py"  # ingestion makes its PKI with it; aggregation does not
    helper.write_text(helper.read_text() + "\n# changed\n")
    assert bench_main.code_fingerprint("ingestion") != ingestion
    assert bench_main.code_fingerprint("aggregation") == aggregation
