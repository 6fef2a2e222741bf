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
    made = next((p for p in reversed([data_dir.absolute(), *data_dir.absolute().parents]) if not p.exists()), None)
    try:
        data_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    except OSError as exc:
        raise UsageError(f"cannot create the data directory {data_dir}: {exc.strerror}") from None
    opened = threading.Event()
    try:
        yield opened.set
    except BaseException:
        if made is not None and not opened.is_set():
            shutil.rmtree(made, ignore_errors=True)
        raise
