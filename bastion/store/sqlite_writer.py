"""The SQLite store's writer: the thread of the writer connection, and the writes queued for it.

``_WriterThread`` runs functions on the writer connection's own thread;
``_Write`` is one write, queued when awaited; ``_runs`` and ``_run_together``
cut a group into runs and write each. How the group commit uses them
(``SQLiteStore._write_loop``, ``_commit``) and the contract of a write are
told in bastion/store/sqlite.py's module docstring.
"""

from __future__ import annotations

import asyncio
import contextlib
import queue
import sqlite3
import threading
from collections.abc import Callable, Generator
from typing import TYPE_CHECKING, Any, TypeVar

from bastion.exceptions import InternalError
from bastion.store._access import BatchFn

if TYPE_CHECKING:
    from bastion.store.sqlite import SQLiteStore

T = TypeVar("T")
WriteFn = Callable[[sqlite3.Connection], Any]
Outcome = tuple[bool, Any]  # (True, result) or (False, exception)


_Job = tuple[Callable[[], Any], asyncio.Future[Any], asyncio.AbstractEventLoop]  # fn, its future, the future's loop


class _WriterThread:
    """The thread of the writer connection: runs the functions given to ``run``, one at a time, in order.

    ``run(fn)`` queues ``fn`` and returns an asyncio future the thread settles
    with its result (or exception) through ``call_soon_threadsafe``; cancelling
    that future does not stop ``fn``, which still runs in its turn. ``stop``
    lets every queued function run, then ends the thread.
    """

    def __init__(self, name: str) -> None:
        self._jobs: queue.SimpleQueue[_Job | None] = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._main, name=name, daemon=True)
        self._thread.start()

    def run(self, fn: Callable[[], T]) -> asyncio.Future[T]:
        loop = asyncio.get_running_loop()
        future: asyncio.Future[T] = loop.create_future()
        self._jobs.put((fn, future, loop))
        return future

    async def stop(self) -> None:
        self._jobs.put(None)
        await asyncio.get_running_loop().run_in_executor(None, self._thread.join)

    def _main(self) -> None:
        while (job := self._jobs.get()) is not None:
            fn, future, loop = job
            try:
                outcome: Outcome = (True, fn())
            except BaseException as exc:  # handed to the caller, as an executor would
                outcome = (False, exc)
            with contextlib.suppress(RuntimeError):  # the loop has closed: nobody waits any more
                loop.call_soon_threadsafe(_settle, future, outcome)


def _settle(future: asyncio.Future[Any], outcome: Outcome) -> None:
    if future.done():  # its caller was cancelled
        return
    ok, value = outcome
    if ok:
        future.set_result(value)
    else:
        future.set_exception(value)


class _Write:
    """A write: ``fn(connection)``, or ``item`` for ``batch(connection, items)`` (batched).

    Awaiting it queues it (``SQLiteStore._submit``) and waits for its future:
    the caller's ``await`` reaches the future with no coroutine or generator in
    between (``__await__`` hands over the future's own iterator), and a write is
    queued when it is awaited, as a coroutine's would be.
    """

    __slots__ = ("batch", "fn", "future", "item", "started", "store")

    future: asyncio.Future[Any]  # set when queued

    def __init__(self, store: SQLiteStore, fn: WriteFn | None, batch: BatchFn | None, item: Any) -> None:
        self.store = store
        self.fn = fn
        self.batch = batch
        self.item = item
        self.started = 0.0  # time.perf_counter() when queued (for observe); 0: not queued yet

    def __await__(self) -> Generator[Any, None, Any]:
        return self.store._submit(self).__await__()

    def run(self, conn: sqlite3.Connection) -> Any:
        """This write alone."""
        if self.batch is not None:
            return self.batch(conn, [self.item])[0]
        assert self.fn is not None
        return self.fn(conn)


def _runs(writes: list[_Write]) -> list[list[_Write]]:
    """``writes`` cut into runs: each plain write alone, neighbouring batched writes of one batch together."""
    runs: list[list[_Write]] = []
    batch: BatchFn | None = None
    for write in writes:
        if write.batch is None or write.batch != batch:
            runs.append([write])
        else:
            runs[-1].append(write)
        batch = write.batch
    return runs


def _run_together(conn: sqlite3.Connection, run: list[_Write]) -> list[Any]:
    """The results of a run of ``_runs``: one call of its batch, or its one plain write."""
    first = run[0]
    if first.batch is None:
        return [first.run(conn)]
    values = first.batch(conn, [write.item for write in run])
    if len(values) != len(run):
        raise InternalError(f"a batched write gave {len(values)} results for {len(run)} items")
    return values
