"""The blocking client's turn: one call at a time, reentrant, and given back by whichever thread ends the call."""

from __future__ import annotations

import threading


class Turn:
    """A reentrant lock that any thread may release.

    A ``SyncClient`` stream holds the client's turn between the items it
    yields, so the turn is given back when its generator ends -- and an
    abandoned generator ends when the garbage collector finalizes it, in
    whatever thread that happens to run, perhaps after the thread that read
    the stream has ended. ``threading.RLock`` refuses a release there
    ("cannot release un-acquired lock") and the turn would stay with the
    ended thread for ever: every later call would wait out its timeout, and
    ``close`` would never return. Here the thread that takes the turn owns
    it for reentry (a call made while a stream is read, in the same thread),
    and a release counts down whoever does it.
    """

    __slots__ = ("_books", "_depth", "_held", "_owner")

    def __init__(self) -> None:
        self._held = threading.Lock()  # a plain Lock may be released by any thread
        self._books = threading.Lock()  # guards _owner and _depth
        self._owner: int | None = None
        self._depth = 0

    def acquire(self, blocking: bool = True, timeout: float = -1.0) -> bool:
        me = threading.get_ident()
        with self._books:
            if self._owner == me:
                self._depth += 1
                return True
        if not self._held.acquire(blocking, timeout):
            return False
        with self._books:
            self._owner = me
            self._depth = 1
        return True

    def release(self) -> None:
        with self._books:
            if self._depth <= 0:
                raise RuntimeError("release of a turn nobody holds")
            self._depth -= 1
            if self._depth:
                return
            self._owner = None
        self._held.release()

    def __enter__(self) -> Turn:
        self.acquire()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.release()
