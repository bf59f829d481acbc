"""The capacity probe on this machine, and the cgroup files it reads, as the kernel writes them."""

from __future__ import annotations

import os
from pathlib import Path

import psutil

from fedge.client import capacity


def test_the_probe_reports_sane_values_here() -> None:
    c = capacity.probe()
    assert 0 < c.free_memory <= psutil.virtual_memory().total
    assert 0 < c.cpus <= len(os.sched_getaffinity(0))
    assert c.load >= 0
    assert c.busy_processes >= 0
    assert c.battery_percent is None or 0 <= c.battery_percent <= 100
    assert c.temperature_c is None or -40 < c.temperature_c < 150


def test_a_cgroup_v2_quota_and_memory_limit_cap_what_the_host_reports(tmp_path: Path) -> None:
    (tmp_path / "cpu.max").write_text("50000 100000\n")
    (tmp_path / "memory.max").write_text(f"{256 * 2**20}\n")
    (tmp_path / "memory.current").write_text(f"{200 * 2**20}\n")
    c = capacity.probe(tmp_path)
    assert c.cpus == 0.5
    assert c.free_memory == 56 * 2**20


def test_unlimited_cgroups_and_v1_files(tmp_path: Path) -> None:
    (tmp_path / "cpu.max").write_text("max 100000\n")
    (tmp_path / "memory.max").write_text("max\n")
    assert capacity.cgroup_cpus(tmp_path) is None
    assert capacity.cgroup_memory(tmp_path)[0] is None
    v1 = tmp_path / "v1"
    (v1 / "cpu").mkdir(parents=True)
    (v1 / "memory").mkdir()
    (v1 / "cpu" / "cpu.cfs_quota_us").write_text("150000\n")
    (v1 / "cpu" / "cpu.cfs_period_us").write_text("100000\n")
    (v1 / "memory" / "memory.limit_in_bytes").write_text(f"{9223372036854771712}\n")
    assert capacity.cgroup_cpus(v1) == 1.5
    assert capacity.cgroup_memory(v1) == (None, 0)
    assert capacity.cgroup_cpus(tmp_path / "absent") is None
