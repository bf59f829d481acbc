"""One aggregation server per ``--data``: two would each think they own the rounds and the models.

The lock is an ``flock`` on ``DATA/server.lock``, held by the open file for the process's whole life, so
the kernel releases it however the process ends (a SIGKILL too) and a restart never finds a stale lock.
The file holds the holder's PID, to name it in the refusal.
"""

from __future__ import annotations

import fcntl
import os
from pathlib import Path
from typing import IO

from fedge.console import UserError

LOCK_FILE = "server.lock"


def hold(data: Path) -> IO[str]:
    """Take the lock of ``data`` or refuse in one line; keep the returned file open while serving."""
    handle = (data / LOCK_FILE).open("a+")
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.seek(0)
        holder = handle.read().strip()
        handle.close()
        who = f" (pid {holder})" if holder.isdigit() else ""
        raise UserError(f"{data} is in use by another fedge server{who}: one server per --data") from None
    handle.seek(0)
    handle.truncate()
    handle.write(f"{os.getpid()}\n")
    handle.flush()
    return handle
