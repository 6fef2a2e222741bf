"""Making renames and new files durable: the one ``fsync`` of a directory every store and service uses,
and the one way to replace a file's contents whole (``replace_file``)."""

from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path


def fsync_dir(path: Path, *, missing_ok: bool = False) -> None:
    """Make a rename or a new file in directory ``path`` durable (``missing_ok``: a directory gone is no error)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    except FileNotFoundError:
        if missing_ok:
            return
        raise
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def replace_file(path: Path, data: bytes, mode: int) -> None:
    """Make ``path`` a new file holding ``data``, with ``mode`` from the start: written to a temporary
    file beside it (``mkstemp``: ``O_EXCL``), fsynced, renamed over it, and the rename fsynced. Whoever
    held the old file open, or reaches it by another name, keeps the old contents."""
    fd, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        os.fchmod(fd, mode)
        with os.fdopen(fd, "wb") as file:
            file.write(data)
            file.flush()
            os.fsync(file.fileno())
        os.replace(temporary, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(temporary)
        raise
    fsync_dir(path.parent)
