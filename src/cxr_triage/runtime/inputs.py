"""Which paths `predict` answers: every named path gets one row, and so does every scanned entry that may be an image.

Rules (no silent drop):

- A named path that exists, even with ``*``, ``?`` or ``[`` in its name, is taken literally; a folder is scanned.
  A named path that does not exist is expanded as a glob when it has such characters; a pattern matching nothing,
  and any other missing path, gets an error row.
- While scanning, an entry gets a row when its name has an image suffix or no suffix, or when it is a regular file
  with the DICOM ``DICM`` preamble whatever its name: symbolic-link loops, dangling links, FIFOs, sockets and devices
  included (their rows say what they are; they are never opened). A folder named like an image that yields no
  rows of its own gets one. Other files (``.md``, ``.csv``, hidden files...) are skipped and counted.
- Symbolic links to folders are followed once per real folder (no endless loops).
"""

from __future__ import annotations

import glob
import os
import stat
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

from cxr_triage.core.decode import IMAGE_SUFFIXES

GLOB_CHARS = "*?["


@dataclass
class Inputs:
    """The paths to answer, in order, and the scanned files skipped (by suffix)."""

    paths: list[str] = field(default_factory=list)
    skipped: Counter = field(default_factory=Counter)

    def summary(self) -> str:
        """'skipped 3 files that are not images (.md: 2, .csv: 1)', or '' when none were."""
        n = sum(self.skipped.values())
        if not n:
            return ""
        kinds = ", ".join(f"{k}: {v}" for k, v in self.skipped.most_common())
        return f"skipped {n} file{'s' if n != 1 else ''} that {'are' if n != 1 else 'is'} not images ({kinds})"


def _has_dicom_preamble(path: Path) -> bool:
    """A regular file whose bytes 128..131 are 'DICM' (read with O_NONBLOCK: never blocks)."""
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
    except OSError:
        return False
    with os.fdopen(fd, "rb") as f:
        return stat.S_ISREG(os.fstat(f.fileno()).st_mode) and f.read(132)[128:132] == b"DICM"


def _wanted(entry: os.DirEntry, mode: int | None) -> bool:
    """Does a scanned non-folder entry get a row? ``mode`` is its target's mode (None: a broken link)."""
    suffix = Path(entry.name).suffix.lower()
    if suffix in IMAGE_SUFFIXES or suffix == "":
        return True
    return mode is not None and stat.S_ISREG(mode) and _has_dicom_preamble(Path(entry.path))


def _target_mode(entry: os.DirEntry) -> int | None:
    try:
        return entry.stat(follow_symlinks=True).st_mode
    except OSError:  # dangling link, link loop, permission
        return None


def _scan(folder: Path, out: Inputs, seen: set[tuple[int, int]]) -> int:
    """Append the folder's answerable entries (sorted, recursively) to ``out``; return how many were added."""
    try:
        st = folder.stat()
        entries = sorted(os.scandir(folder), key=lambda e: e.name)
    except OSError:
        out.paths.append(str(folder))  # unreadable folder: one error row that says why
        return 1
    if (st.st_dev, st.st_ino) in seen:
        out.skipped["folder already scanned (link)"] += 1
        return 0
    seen.add((st.st_dev, st.st_ino))
    added = 0
    for entry in entries:
        path = str(folder / entry.name)  # as pathlib spells it: "x.png" in ".", not "./x.png"
        if entry.name.startswith("."):
            out.skipped["hidden"] += 1
            continue
        mode = _target_mode(entry)
        if mode is not None and stat.S_ISDIR(mode):
            found = _scan(folder / entry.name, out, seen)
            if found == 0 and Path(entry.name).suffix.lower() in IMAGE_SUFFIXES:
                out.paths.append(path)  # a folder named like an image, nothing inside: tell the user
                found = 1
            added += found
        elif _wanted(entry, mode):
            out.paths.append(path)
            added += 1
        else:
            out.skipped[Path(entry.name).suffix.lower() or "no suffix"] += 1
    return added


def _named(item: str, out: Inputs, seen: set[tuple[int, int]]) -> None:
    path = Path(item)
    if os.path.lexists(item):
        if path.is_dir():
            if (path.stat().st_dev, path.stat().st_ino) in seen:
                return  # named twice
            if _scan(path, out, seen) == 0 and path.suffix.lower() in IMAGE_SUFFIXES:
                out.paths.append(item)
        else:
            out.paths.append(item)  # files, links, FIFOs...: the decoder says what is wrong, without opening FIFOs
    elif any(ch in item for ch in GLOB_CHARS) and (matches := sorted(glob.glob(item, recursive=True))):
        for match in matches:
            _named(match, out, seen)
    else:
        out.paths.append(item)  # missing: an error row, not a crash and not a silent drop


def scan_inputs(items: Iterable[str]) -> Inputs:
    """Every path to answer for the given files, folders and globs (order kept, no repeats)."""
    out, seen = Inputs(), set()
    for item in items:
        _named(item, out, seen)
    unique: dict[str, str] = {}
    for p in out.paths:  # "a.png" and "./a.png" are one entry; the first spelling is kept
        unique.setdefault(os.path.normpath(p), p)
    out.paths = list(unique.values())
    return out
