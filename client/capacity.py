"""What the device can give a round right now: memory, CPU, power and heat, as the placement policy needs.

A container's limits are not the host's: inside a cgroup, psutil reports the host's memory and cores, so
the cgroup's memory limit and CPU quota (v2 ``memory.max`` / ``cpu.max``, v1 equivalents) cap them.
Battery and temperature are None where the device has no such sensor (servers, most containers).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import psutil

CGROUP = Path("/sys/fs/cgroup")


@dataclass(frozen=True)
class Capacity:
    free_memory: int  # bytes available to a new training run, the cgroup's limit taken into account
    cpus: float  # cores this process may use (the cgroup quota, else the affinity mask)
    load: float  # 1-minute load average per usable core: above 1, training competes for CPU
    busy_processes: int  # other processes using CPU now (concurrent work)
    battery_percent: float | None
    on_battery: bool | None
    temperature_c: float | None  # the hottest sensor


def probe(cgroup: Path = CGROUP) -> Capacity:
    cpus = min(float(len(os.sched_getaffinity(0))), cgroup_cpus(cgroup) or float("inf"))
    free = psutil.virtual_memory().available
    limit, used = cgroup_memory(cgroup)
    if limit is not None:
        free = min(free, max(0, limit - used))
    battery = psutil.sensors_battery() if hasattr(psutil, "sensors_battery") else None
    return Capacity(
        free_memory=free,
        cpus=cpus,
        load=os.getloadavg()[0] / cpus,
        busy_processes=_busy_processes(),
        battery_percent=None if battery is None else float(battery.percent),
        on_battery=None if battery is None else not battery.power_plugged,
        temperature_c=_hottest(),
    )


def cgroup_cpus(cgroup: Path) -> float | None:
    """Cores allowed by the CPU quota, None when unlimited or not in a cgroup."""
    v2 = cgroup / "cpu.max"
    if v2.is_file():
        quota, _, period = v2.read_text().strip().partition(" ")
        return None if quota == "max" else int(quota) / int(period or 100_000)
    quota_file, period_file = cgroup / "cpu" / "cpu.cfs_quota_us", cgroup / "cpu" / "cpu.cfs_period_us"
    if quota_file.is_file() and period_file.is_file():
        quota = int(quota_file.read_text())
        return None if quota <= 0 else quota / int(period_file.read_text())
    return None


def cgroup_memory(cgroup: Path) -> tuple[int | None, int]:
    """(limit, usage) of the cgroup's memory in bytes; limit None when unlimited or not in a cgroup."""
    for limit_file, usage_file in (
        (cgroup / "memory.max", cgroup / "memory.current"),
        (cgroup / "memory" / "memory.limit_in_bytes", cgroup / "memory" / "memory.usage_in_bytes"),
    ):
        if limit_file.is_file():
            raw = limit_file.read_text().strip()
            usage = int(usage_file.read_text()) if usage_file.is_file() else 0
            # cgroup v1 writes "no limit" as a huge page-aligned number
            return (None if raw == "max" or int(raw) >= 1 << 60 else int(raw)), usage
    return None, 0


def _busy_processes() -> int:
    me = os.getpid()
    busy = 0
    for process in psutil.process_iter(["pid", "status"]):
        if process.info["pid"] != me and process.info["status"] == psutil.STATUS_RUNNING:
            busy += 1
    return busy


def _hottest() -> float | None:
    read = getattr(psutil, "sensors_temperatures", None)
    if read is None:
        return None
    readings = [t.current for sensors in read().values() for t in sensors if t.current]
    return max(readings) if readings else None
