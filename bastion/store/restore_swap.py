"""Putting restored data in place so that a failure half way moves everything back (bastion/store/backup.py).

A restore renames the old data aside and the staged data into place; ``_Moves`` records each step (in the
restore's journal first, bastion/store/restore_journal.py, when it has one) and undoes them newest first if
a later step fails.
"""

from __future__ import annotations

import errno
import logging
import os
import shutil
from collections.abc import Callable
from pathlib import Path

from bastion.exceptions import FailedPrecondition
from bastion.store.restore_journal import Journal

__all__: list[str] = []

log = logging.getLogger("bastion.backup")


class _Moves:
    """What a restore did to put the restored data in place, undone (newest first) if a later step fails."""

    def __init__(self, journal: Journal | None = None) -> None:
        self._undo: list[tuple[str, Callable[[], None]]] = []
        self._journal = journal  # each step written down before it is made (restore_journal.py)

    def rename(self, src: Path, dst: Path) -> None:
        if self._journal is not None:
            self._journal.record("rename", src, dst)
        os.rename(src, dst)
        self._undo.append((f"move {dst} back to {src}", lambda: os.rename(dst, src)))

    def copy(self, src: Path, dst: Path) -> None:
        if self._journal is not None:
            self._journal.record("copy", src, dst)
        self._undo.append((f"remove {dst}", lambda: shutil.rmtree(dst, ignore_errors=True)))  # partial too
        shutil.copytree(src, dst)

    def undo(self) -> bool:
        """Reverse every step made, newest first; whether all were."""
        ok = True
        while self._undo:
            what, step = self._undo.pop()
            try:
                step()
            except OSError as exc:
                ok = False
                log.error("restore failed, and could not %s: %s", what, exc)
        return ok


def _not_put_in_place(exc: OSError) -> FailedPrecondition:
    return FailedPrecondition(f"cannot put the restored data in place ({exc}); the old data was moved back")


def _swap_files(staged: Path, files_dir: Path, stamp: str, moves: _Moves) -> list[str]:
    kept = []
    try:
        if files_dir.exists():
            aside = _free(files_dir.with_name(f"{files_dir.name}.pre-restore-{stamp}"))
            moves.rename(files_dir, aside)
            kept.append(str(aside))
        files_dir.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        if not staged.exists():
            staged.mkdir(mode=0o700)
        try:
            moves.rename(staged, files_dir)
        except OSError as exc:
            if exc.errno != errno.EXDEV:
                raise
            moves.copy(staged, files_dir)  # another file system (the staged copy was verified already)
    except OSError as exc:
        raise _not_put_in_place(exc) from exc
    return kept


def _free(path: Path) -> Path:
    """``path``, or ``path.1``, ``path.2`` … whichever does not exist yet (never overwrite kept data)."""
    candidate, n = path, 0
    while candidate.exists():
        n += 1
        candidate = path.with_name(f"{path.name}.{n}")
    return candidate
