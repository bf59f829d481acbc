"""Atomic files: a file is either its old whole self or its new whole self, never half written.

Keys, certificates, stored updates and models, the agent's state and a simulation's results are all
written through ``write_file``, so a crash or a reader at the wrong moment never sees a torn file.
"""

from __future__ import annotations

import contextlib
import os
import uuid
from pathlib import Path


def write_file(path: Path, data: bytes, private: bool = False) -> None:
    """Write to a temporary file beside ``path``, fsync it, rename it over ``path`` and fsync the directory,
    so the rename itself survives a power cut. ``private`` files (keys, tokens) are readable by the owner
    only. The temporary name is unique, so concurrent writers of one path do not write into each other."""
    tmp = path.with_name(f"{path.name}.{uuid.uuid4().hex}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600 if private else 0o644)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        raise
    directory = os.open(path.parent, os.O_DIRECTORY)
    try:
        os.fsync(directory)
    finally:
        os.close(directory)
