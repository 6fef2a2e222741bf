"""The SQLite store's readers: ``query_only`` connections, a thread each, fed the reads of a loop turn together.

A read is a function ``(connection) -> result``. ``Readers.read`` queues it
and returns an asyncio future. At the end of the loop turn the reads queued
in it join one work queue shared by the threads, and as many threads as
there are reads (at most all of them) are woken. A woken thread takes reads
off the queue one at a time until it is empty, and sends back what it ran
with one ``call_soon_threadsafe`` per ``batch_size`` reads. With many
callers reading at once (64 kv.get callers: a few dozen reads a turn) the
hand-off to a thread and back is paid about once per thread and turn, not
once per read; a ``ThreadPoolExecutor`` costs ~50k instructions per read on
the loop for it (its work items, locks and chained futures), more than the
read itself.

No read waits in the queue behind a slow one (a large scan) while a thread
is free: each thread takes the next read only when it is done with its
last. What a slow read does delay is the answers its own thread ran just
before it, which go back with it (at most ``batch_size - 1`` of them).

Each read is one statement or a few, in the connection's own implicit
transactions, so it sees every write acknowledged before it was queued;
reads on different threads run at once. A read that raises fails alone:
its exception (SQLite's translated by the store's ``translate``) goes to its
own future. A read whose future is already done (its caller was cancelled)
is skipped if it has not started. ``stop`` lets every queued read run, then
ends the threads.
"""

from __future__ import annotations

import asyncio
import contextlib
import queue
import sqlite3
import threading
import time
from collections import deque
from collections.abc import Callable
from typing import Any, TypeVar

from bastion.store import observe

__all__ = ["Readers"]

T = TypeVar("T")

# One read: its function, its future, and when it was queued (time.perf_counter(), for observe).
_Read = tuple[Callable[[sqlite3.Connection], Any], asyncio.Future[Any], float]
# A read that ran, and how it ended: (read, True, result) or (read, False, exception).
_Ran = tuple[_Read, bool, Any]


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
        self._pending: list[_Read] = []  # queued this loop turn (touched on the loop only)
        self._work: deque[_Read] = deque()  # handed to the threads, not yet taken by one
        self._wake: queue.SimpleQueue[bool] = queue.SimpleQueue()  # True: look for work; False: end
        self._threads: list[threading.Thread] = []
        for i, conn in enumerate(conns):
            thread = threading.Thread(target=self._main, args=(conn,), name=f"{name}-{i}", daemon=True)
            thread.start()
            self._threads.append(thread)

    def read(self, fn: Callable[[sqlite3.Connection], T]) -> asyncio.Future[T]:
        """Queue ``fn`` for a reader connection; a future of its result (on the loop given)."""
        future: asyncio.Future[T] = self._loop.create_future()
        pending = self._pending
        if not pending:
            self._loop.call_soon(self._dispatch)
        pending.append((fn, future, time.perf_counter()))
        return future

    def _dispatch(self) -> None:
        """End of the loop turn: hand the reads queued in it to the threads."""
        pending, self._pending = self._pending, []
        if not pending:  # stop() handed them over already
            return
        self._work.extend(pending)
        for _ in range(min(len(pending), len(self._threads))):
            self._wake.put(True)

    async def stop(self) -> None:
        """Run every read queued so far, then end the threads (their connections stay open)."""
        self._dispatch()
        for _ in self._threads:
            self._wake.put(False)  # after every wake-up for work: each thread empties the queue first
        for thread in self._threads:
            await self._loop.run_in_executor(None, thread.join)
        self._threads.clear()

    # -- on a reader thread ----------------------------------------------------------------------

    def _main(self, conn: sqlite3.Connection) -> None:
        work, size = self._work, self._batch_size
        while self._wake.get():
            ran: list[_Ran] = []
            while True:
                try:
                    read = work.popleft()
                except IndexError:
                    break
                fn, future, _ = read
                if future.done():  # its caller was cancelled before it started
                    continue
                try:
                    ran.append((read, True, fn(conn)))
                except BaseException as exc:  # handed to the caller, as an executor would
                    ran.append((read, False, _failure(exc, self._translate)))
                if len(ran) >= size:
                    self._send(ran)
                    ran = []
            if ran:
                self._send(ran)

    def _send(self, ran: list[_Ran]) -> None:
        with contextlib.suppress(RuntimeError):  # the loop has closed: nobody waits any more
            self._loop.call_soon_threadsafe(_settle, ran)


def _failure(exc: BaseException, translate: Callable[[Exception], Exception]) -> BaseException:
    """What a read that raised ``exc`` hands its caller: never an exception that escapes the thread."""
    try:
        error: BaseException = translate(exc) if isinstance(exc, Exception) else exc
    except Exception as bad:  # a translation that raises: its error, not a dead thread
        error = bad
    if isinstance(error, StopIteration):  # a future refuses it (TypeError): the rest would go unanswered
        wrapped = RuntimeError(f"a store read raised {error!r}")
        wrapped.__cause__ = error
        return wrapped
    return error


def _settle(ran: list[_Ran]) -> None:
    """On the loop: each read's future gets its outcome (one whose caller was cancelled, nothing)."""
    for (_, future, _), ok, value in ran:
        if future.done():
            continue
        if ok:
            future.set_result(value)
        else:
            future.set_exception(value)
    if observe.observer is not None:  # after every future is settled: an observer that raises loses none
        for (_, _, started), _, _ in ran:
            observe.done("read", started)
