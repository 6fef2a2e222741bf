"""The checks a restore makes before it changes anything: that no server has the SQLite store open, and
that the files directory it renames aside does not take a data directory with it."""

from __future__ import annotations

import os
import sqlite3
from pathlib import Path

from bastion.exceptions import FailedPrecondition, InvalidArgument

__all__ = ["check_not_in_use", "refuse_files_dir_over"]


def check_not_in_use(db_path: Path) -> None:
    """Refuse (``FailedPrecondition``) if any process has the SQLite store at ``db_path`` open.

    A running server keeps its connections open; in WAL mode each holds a
    shared lock, so an exclusive lock is refused while any is open.
    """
    if not db_path.exists():
        return
    try:
        conn = sqlite3.connect(db_path, isolation_level=None, timeout=0)
    except sqlite3.Error as exc:
        raise FailedPrecondition(f"cannot open {db_path}: {exc}") from None
    try:
        conn.execute("PRAGMA locking_mode=EXCLUSIVE")
        conn.execute("BEGIN EXCLUSIVE")
        conn.execute("ROLLBACK")
    except sqlite3.OperationalError:
        raise FailedPrecondition(
            f"{db_path} is in use (is a server running on this data directory?): stop it before restoring"
        ) from None
    except sqlite3.DatabaseError:
        pass  # not a database we can read: it is not in use by a server either; it will be kept aside
    finally:
        conn.close()


_DATA_DIR_FILES = ("admin.token", "audit.log", "tls", "bastion.db")  # what a server keeps in its data directory


def refuse_files_dir_over(files_dir: Path, data_dir: Path | None, db_path: Path | None = None) -> None:
    """Refuse (``InvalidArgument``) a files directory that is ``data_dir``, one it is inside, or the database
    file ``db_path``: a restore renames the files directory aside, and the data directory (its database,
    admin token, TLS keys, audit log) would go with it. Whether or not ``data_dir`` is given, a files
    directory that is, or directly holds, a directory with a data directory's own files in it is refused."""
    files = files_dir.resolve()
    if data_dir is not None:
        data = data_dir.resolve()
        if files == data or files in data.parents or (db_path is not None and files == db_path.resolve()):
            _refuse_files_dir(files_dir, data_dir)
    found = _data_dir_in(files)
    if found is not None:
        _refuse_files_dir(files_dir, found)


def _data_dir_in(files: Path) -> Path | None:
    """``files``, or a directory directly in it, if it holds what a server keeps in its data directory."""
    try:
        children = [Path(e.path) for e in os.scandir(files) if e.is_dir(follow_symlinks=False)]
    except OSError:  # not there (yet), or not a directory: nothing it holds goes aside
        return None
    for directory in (files, *sorted(children)):
        if any(os.path.lexists(directory / name) for name in _DATA_DIR_FILES):
            return directory
    return None


def _refuse_files_dir(files_dir: Path, data_dir: Path) -> None:
    raise InvalidArgument(
        f"the files directory {files_dir} is the data directory {data_dir} or holds it: a restore renames "
        "the files directory aside, and the data directory would go with it; nothing was changed. Give the "
        "directory of the file contents only (by default <data-dir>/files)"
    )
