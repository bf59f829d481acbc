"""Atomic files: a file is either its old whole self or its new whole self, never half written.

Keys, certificates, stored updates and models, the agent's state and a simulation's results are all
written through ``write_file``, so a crash or a reader at the wrong moment never sees a torn file.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import uuid
from collections.abc import Iterator
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


@contextlib.contextmanager
def made_dir(path: Path) -> Iterator[Path]:
    """Make the folder ``path`` (parents too) and prove it writable, else an ``OSError`` that says why in
    one line. If the block raises, what was made here is removed again: a command refused half-way leaves
    no half-made folder behind."""
    made = next((p for p in (*reversed(path.absolute().parents), path.absolute()) if not p.exists()), None)
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe = path / f".probe-{uuid.uuid4().hex}"
        probe.touch()
        probe.unlink()
    except (FileExistsError, NotADirectoryError):
        raise NotADirectoryError(f"{path} is not a folder: it or a folder above it is a file") from None
    except OSError as exc:
        _remove(made)
        raise OSError(f"cannot write into {path}: {exc.strerror}") from None
    try:
        yield path
    except BaseException:
        _remove(made)
        raise


def _remove(made: Path | None) -> None:
    if made is not None:
        shutil.rmtree(made, ignore_errors=True)
