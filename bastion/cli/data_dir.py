"""The data directory ``bastion serve`` makes, and unmakes when the start fails before its store opens."""

from __future__ import annotations

import contextlib
import shutil
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

from bastion.exceptions import UsageError

__all__ = ["new_data_dir"]


@contextlib.contextmanager
def new_data_dir(data_dir: Path) -> Iterator[Callable[[], None]]:
    """Make ``data_dir`` (0700, with its parents); if the start fails before the store opens, remove what it made.

    Yields the callback to call once the store has opened: from then on the
    directory may hold what the store refers to (the admin token), and stays.
    Before that it holds at most the development CA and certificate a failed
    first start minted for nobody; an operator fixing the store's address
    must find the working directory as ``serve --check`` leaves it.
    """
    try:
        made = _make_dirs(data_dir.absolute())
    except OSError as exc:
        raise UsageError(f"cannot create the data directory {data_dir}: {exc.strerror}") from None
    opened = threading.Event()
    try:
        yield opened.set
    except BaseException:
        if made and not opened.is_set():
            _unmake(data_dir.absolute(), made)
        raise


def _make_dirs(data_dir: Path) -> list[Path]:
    """Make ``data_dir`` and its missing parents one at a time, outermost first; those this call made.

    Only a ``mkdir`` that succeeded counts: a directory another process makes meanwhile (a second server's
    shared parent, at boot) is theirs, and never removed here.
    """
    missing = [p for p in reversed([data_dir, *data_dir.parents]) if not p.exists()]
    made: list[Path] = []
    for path in missing:
        try:
            path.mkdir(mode=0o700 if path == data_dir else 0o777)
        except FileExistsError:
            if not path.is_dir():
                raise
            continue
        made.append(path)
    return made


def _unmake(data_dir: Path, made: list[Path]) -> None:
    """Remove what a failed start made: the data directory whole only if this start made it (0700: only
    this user writes there), then each parent it made, innermost first, only while it is empty: a parent
    another process has put something in since (a second server's data directory) stays, with its parents."""
    parents = made
    if made[-1] == data_dir:
        shutil.rmtree(data_dir, ignore_errors=True)
        parents = made[:-1]
    for path in reversed(parents):
        try:
            path.rmdir()
        except OSError:
            return
