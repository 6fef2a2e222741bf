"""Making renames and new files durable: the one ``fsync`` of a directory every store and service uses."""

from __future__ import annotations

import os
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
