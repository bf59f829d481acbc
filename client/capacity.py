"""What the device can give a round right now: the memory a training run would find free, which is what the
placement weighs (its deadline is the predictor's business).

A container's limits are not the host's: inside a cgroup, psutil reports the host's memory, so the cgroup's
memory limit (v2 ``memory.max``, v1 ``memory.limit_in_bytes``) caps it.
"""

from __future__ import annotations

from pathlib import Path

import psutil

CGROUP = Path("/sys/fs/cgroup")


def free_memory(cgroup: Path = CGROUP) -> int:
    """Bytes available to a new training run, the cgroup's limit taken into account."""
    free = psutil.virtual_memory().available
    limit, used = cgroup_memory(cgroup)
    return free if limit is None else min(free, max(0, limit - used))


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
