"""The capacity probe on this machine, and the cgroup files it reads, as the kernel writes them."""

from __future__ import annotations

from pathlib import Path

import psutil

from fedge.client import capacity


def test_the_free_memory_is_sane_here() -> None:
    assert 0 < capacity.free_memory() <= psutil.virtual_memory().total


def test_a_cgroup_v2_memory_limit_caps_what_the_host_reports(tmp_path: Path) -> None:
    (tmp_path / "memory.max").write_text(f"{256 * 2**20}\n")
    (tmp_path / "memory.current").write_text(f"{200 * 2**20}\n")
    assert capacity.free_memory(tmp_path) == 56 * 2**20


def test_unlimited_cgroups_and_v1_files(tmp_path: Path) -> None:
    (tmp_path / "memory.max").write_text("max\n")
    assert capacity.cgroup_memory(tmp_path)[0] is None
    v1 = tmp_path / "v1"
    (v1 / "memory").mkdir(parents=True)
    (v1 / "memory" / "memory.limit_in_bytes").write_text(f"{9223372036854771712}\n")
    assert capacity.cgroup_memory(v1) == (None, 0)
    (v1 / "memory" / "memory.limit_in_bytes").write_text(f"{2**30}\n")
    (v1 / "memory" / "memory.usage_in_bytes").write_text(f"{2**29}\n")
    assert capacity.free_memory(v1) == min(psutil.virtual_memory().available, 2**29)
    assert capacity.cgroup_memory(tmp_path / "absent") == (None, 0)
