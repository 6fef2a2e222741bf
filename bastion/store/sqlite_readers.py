"""The SQLite store's readers: ``query_only`` connections, a thread each, fed the reads of a loop turn together.

A read is a function ``(connection) -> result``. ``Readers.read`` queues it
and returns an asyncio future; the reads queued in one turn of the event
loop are handed to the threads at the end of that turn, shared out in
batches (as many as there are threads, of at most ``batch_size`` reads
each), and each batch comes back with one ``call_soon_threadsafe``. With many callers reading at once (64 kv.get
callers: a few dozen reads a turn) the hand-off to a thread and back is
paid once per batch instead of once per read; a ``ThreadPoolExecutor``
costs ~50k instructions per read on the loop for it (its locks, work items
and chained futures), more than the read itself.

Reads of one batch run one after another on one connection, each in its own
implicit transaction, so each sees every write acknowledged before it was
queued; batches run in parallel, one per thread. The batch size bounds how
long a slow read (a large scan) can hold up the reads queued with it.

A read that raises fails alone: its exception (SQLite's translated by the
store's ``translate``) goes to its own future, and the rest of its batch
runs on. Cancelling a read's future does not stop the read; its result is
dropped. ``stop`` lets every queued read run, then ends the threads.
"""

from __future__ import annotations

import asyncio
import contextlib
import queue
import sqlite3
import threading
import time
from collections.abc import Callable
from typing import Any, TypeVar

from bastion.store import observe

__all__ = ["Readers"]

T = TypeVar("T")

# One read: its function, its future, and when it was queued (time.perf_counter(), for observe).
_Read = tuple[Callable[[sqlite3.Connection], Any], asyncio.Future[Any], float]
# How each read of a batch ended: (True, result) or (False, exception).
_Outcome = tuple[bool, Any]


class Readers:
    """A thread per connection in ``conns``, running the reads ``read`` queues (see the module docstring)."""

    def __init__(
        self,
        conns: list[sqlite3.Connection],
        loop: asyncio.AbstractEventLoop,
        translate: Callable[[Exception], Exception],
        *,
        batch_size: int = 16,
        name: str = "bastion-store-reader",
    ) -> None:
        self._loop = loop
        self._translate = translate
        self._batch_size = batch_size
        self._pending: list[_Read] = []  # queued this loop turn, not yet handed to a thread
        self._batches: queue.SimpleQueue[list[_Read] | None] = queue.SimpleQueue()
        self._threads = [
            threading.Thread(target=self._main, args=(conn,), name=f"{name}-{i}", daemon=True)
            for i, conn in enumerate(conns)
        ]
        for thread in self._threads:
            thread.start()

    def read(self, fn: Callable[[sqlite3.Connection], T]) -> asyncio.Future[T]:
        """Queue ``fn`` for a reader connection; a future of its result (on the loop given)."""
        future: asyncio.Future[T] = self._loop.create_future()
        pending = self._pending
        if not pending:
            self._loop.call_soon(self._dispatch)
        pending.append((fn, future, time.perf_counter()))
        return future

    def _dispatch(self) -> None:
        """End of the loop turn: hand the reads queued in it to the threads, shared out among them."""
        pending, self._pending = self._pending, []
        share = -(-len(pending) // len(self._threads))  # so that every thread has some: they run at once
        size = min(share, self._batch_size)
        for start in range(0, len(pending), size):
            self._batches.put(pending[start : start + size])

    async def stop(self) -> None:
        """Run every read queued so far, then end the threads (their connections stay open)."""
        if self._pending:
            self._dispatch()
        for _ in self._threads:
            self._batches.put(None)
        for thread in self._threads:
            await self._loop.run_in_executor(None, thread.join)

    # -- on a reader thread ----------------------------------------------------------------------

    def _main(self, conn: sqlite3.Connection) -> None:
        translate = self._translate
        while (batch := self._batches.get()) is not None:
            outcomes: list[_Outcome] = []
            for fn, _, _ in batch:
                try:
                    outcomes.append((True, fn(conn)))
                except Exception as exc:  # handed to the caller
                    outcomes.append((False, translate(exc)))
            with contextlib.suppress(RuntimeError):  # the loop has closed: nobody waits any more
                self._loop.call_soon_threadsafe(_settle, batch, outcomes)


def _settle(batch: list[_Read], outcomes: list[_Outcome]) -> None:
    """On the loop: each read's future gets its outcome (one whose caller was cancelled, nothing)."""
    for (_, future, started), (ok, value) in zip(batch, outcomes, strict=True):
        observe.done("read", started)
        if future.done():
            continue
        if ok:
            future.set_result(value)
        else:
            future.set_exception(value)
