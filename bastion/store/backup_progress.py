"""How far a backup, a verification or a restore has got: reported through an optional callback.

Backing up a large files directory takes minutes; whoever runs it wants to see it move. The store
layer reports its long work as ``progress(phase, done, total)`` -- a plain callable, so it knows
nothing of terminals or of the CLI (bastion/cli/backup.py draws it):

* ``phase``: one of ``PHASES`` -- ``snapshot`` (the SQLite copy and its integrity check), ``pg_dump``,
  ``blobs`` (holding the blobs the snapshot names), ``archive`` (writing it), ``verify`` (reading an
  archive back, every byte checked), ``restore`` (putting the restored data in place);
* ``done``: the bytes of that phase done so far;
* ``total``: the bytes it will reach, or None while that is not known (a dump's size, the blobs').

For each phase the callback hears ``done == 0`` first, then ``done`` never going back, at most once
every ``STEP`` bytes (so reporting costs nothing next to the work), and last ``done == total`` (the
total known by then). A phase that fails ends without that last call. The callback may be called
from a worker thread (a file watched while SQLite or ``pg_dump`` writes it); an exception it raises
fails the work.
"""

from __future__ import annotations

import contextlib
import os
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

__all__ = ["PHASES", "STEP", "Meter", "Progress", "watch_file"]

#: ``progress(phase, done, total)``: see the module's docstring.
Progress = Callable[[str, int, "int | None"], None]

PHASES = ("snapshot", "pg_dump", "blobs", "archive", "verify", "restore")
STEP = 8 * 1024 * 1024  # report at most once per this many bytes of a phase
_WATCH_INTERVAL = 0.5  # seconds between looks at a file another party writes


class Meter:
    """One phase's progress, told to ``progress`` (None: to no one) at most once per ``step`` bytes."""

    def __init__(self, progress: Progress | None, phase: str, total: int | None = None, *, step: int = STEP) -> None:
        self.progress = progress
        self.phase = phase
        self.total = total
        self.done = 0
        self._step = step
        self._told = 0  # the largest ``done`` told so far
        if progress is not None:
            progress(phase, 0, total)

    def add(self, n: int) -> None:
        """``n`` more bytes done."""
        self.done += n
        if self.progress is not None and self.done - self._told >= self._step:
            self._tell(self.done)

    def reached(self, done: int) -> None:
        """``done`` bytes done in all (a file's size as it grows): never goes back."""
        if done > self.done:
            self.add(done - self.done)

    def finish(self, total: int | None = None) -> None:
        """The phase is done: its last report, ``done == total`` (``total``, else the one given at the start,
        else the bytes counted; never less than a ``done`` already told)."""
        end = max(total if total is not None else self.total if self.total is not None else self.done, self._told)
        self.done = self.total = end
        if self.progress is not None:
            self.progress(self.phase, end, end)
            self._told = end

    def _tell(self, done: int) -> None:
        if self.total is not None:
            done = min(done, self.total)  # an estimate passed (a database grown meanwhile): wait for finish
        if done > self._told:
            self._told = done
            assert self.progress is not None
            self.progress(self.phase, done, self.total)


@contextlib.contextmanager
def watch_file(path: Path, meter: Meter) -> Iterator[Meter]:
    """While the block runs, report the size of ``path`` (written by SQLite or ``pg_dump``) through ``meter``,
    from a thread of its own; finish ``meter`` at the file's final size if the block ends without error."""
    if meter.progress is None:
        yield meter
        return
    stop = threading.Event()

    def size() -> int:
        try:
            return os.stat(path).st_size
        except OSError:  # not made yet
            return 0

    failed: list[BaseException] = []

    def watch() -> None:
        try:
            while not stop.wait(_WATCH_INTERVAL):
                meter.reached(size())
        except BaseException as exc:  # the callback's: it fails the work, as from the work's own thread
            failed.append(exc)

    thread = threading.Thread(target=watch, name=f"bastion-progress-{meter.phase}", daemon=True)
    thread.start()
    try:
        yield meter
    finally:
        stop.set()
        thread.join()
    if failed:
        raise failed[0]
    meter.finish(size() if meter.total is None else None)
