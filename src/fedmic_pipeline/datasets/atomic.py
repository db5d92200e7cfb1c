"""Atomic file writes, for outputs that are not Kedro datasets (checkpoints, cache entries,
Flower's models) and for the project's atomic datasets.

A process killed mid-write must leave the previous file (or none), never a truncated one
that a reader would take for valid (a CSV cut between two lines loads as fewer rows). Every
write here goes to a temp file in the target's folder (same filesystem, so the rename is
atomic), is flushed to disk, and then `os.replace`s the target.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path


def write_bytes_atomically(path: Path, data: bytes) -> None:
    """Write `data` to a temp file beside `path`, fsync it, then `os.replace` it into place."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def fsync_path(path: Path) -> None:
    """Flush a file's (or a folder's entries') data to disk, so a rename never outruns it."""
    fd = os.open(path, os.O_RDONLY | (os.O_DIRECTORY if path.is_dir() else 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
