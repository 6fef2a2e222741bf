"""The embedded store: one SQLite file, stdlib ``sqlite3``.

Theory of operation
-------------------

The file is in WAL mode with ``synchronous=FULL``, so a committed transaction
is on disk (fsynced WAL) before the commit returns, and readers never block
the writer or each other.

Writes: exactly one connection writes, and it lives on one dedicated thread
(a single-worker executor). Callers never touch it: a write is a small
function ``(connection) -> result`` queued with a future, and one asyncio
task -- the writer task -- feeds that thread:

1. wait for the first queued write, then take everything else already
   queued (up to ``max_batch``) -- the *group*;
2. on the writer thread: ``BEGIN IMMEDIATE``; run each write; run the
   *before-commit hooks* the writes registered; ``COMMIT`` -- one fsync for
   the whole group;
3. back on the loop: resolve each caller's future with its own result or
   exception. If the ``COMMIT`` itself fails, nothing was committed and
   every write in the group fails.

A write that raises fails alone: nothing it did is saved, and the others in
its group commit. Step 2 gets there in one of two modes:

- *optimistic* (the usual): the writes run back to back, with nothing
  between them. If one raises, the whole transaction is rolled back and the
  group runs again, isolated;
- *isolated*: each write runs inside its own ``SAVEPOINT``; one that raises
  is rolled back to its savepoint (``ROLLBACK TO``) and the rest go on.

A savepoint costs two statements (``SAVEPOINT``, ``RELEASE``) per write, and
every statement lets go of the GIL and must win it back from the event loop,
so the optimistic mode is what makes a busy group cheap. After a group has
had to run again, the next ``_ISOLATED_GROUPS`` groups go straight to the
isolated mode: a steady stream of failing writes (compare-and-swap misses)
costs at most one extra run every that many groups, never one per group.

Hence the contract of a write function: it may be called more than once,
each time in a new transaction (and so with a new ``_tx_serial``); only the
result of the last call is returned. It must act only on the connection it
is given -- or, outside the database, only in ways that are harmless to
repeat and keyed to ``_tx_serial`` -- and never end the transaction or
touch savepoints itself.

``_tx_serial`` counts the transactions begun; a write function may use it to
cache, for the rest of its group, something it read inside the transaction
(the write lock is held from ``BEGIN IMMEDIATE`` to ``COMMIT``, so no other
process can change it meanwhile). A write that caches must undo its change
to the cache if it raises, since its savepoint is rolled back.

``_before_commit`` holds the hooks of the current transaction: a write may
put ``name -> hook(connection)`` there (the same name again replaces it), and
each hook runs once, in order of first registration, after the last write
and just before ``COMMIT``; a hook that raises fails the whole group. A hook
runs even if the write that registered it was then rolled back to its
savepoint, so it must be right either way -- e.g. kv stores the revision
counter there once per group, from the cache only successful writes advance,
instead of once per write. The hooks are dropped when the transaction ends.

*Batched writes*: a write queued with ``_write_batched(runner, item)`` is an
``item`` for ``runner(connection, items) -> results``, which writes several
items at once (kv: a few multi-row statements per table for a whole run of puts,
instead of two statements and their Python around each put). In
the optimistic mode, each run of such writes that sit next to each other in
the group with the same ``runner`` is one call of it (one result per item,
in order); in the isolated mode, and so whenever a batch raised, each item
runs alone, as ``runner(connection, [item])`` in its own savepoint. A runner
is a write function over many items and keeps the same contract; it may
raise only as a whole (the group then runs again, isolated), so every item
it is given must be one it can write.

The writer thread is a plain thread fed by a ``SimpleQueue`` that settles
each job's asyncio future with ``call_soon_threadsafe`` (``_WriterThread``,
in sqlite_writer.py): the hand-off to it and back happens once per group, and
a one-worker ``ThreadPoolExecutor`` costs about twice the CPU for it (its
locks, semaphore and chained futures), which on a busy server is CPU the
event loop does not get.

The queue is a plain deque plus one wake-up future for the writer task:
queuing is on every write's path, so it stays a few attribute operations.
A write is a ``_Write`` object that queues itself when awaited, as a
coroutine would, and then waits on its own future; ``_write_batched`` hands
it back as it is, so a kv put's ``await`` reaches the future through no
coroutine of the store's (``_write`` wraps it in one: callers may make a
task of it). The store keeps the loop it was opened on rather than asking
``asyncio.get_running_loop()``, which on Python 3.11 makes a ``getpid()``
system call each time.

Reads run on a small pool of ``query_only`` connections, a thread each
(``Readers``, bastion/store/sqlite_readers.py), so several reads proceed at
once while the writer commits. The reads queued in one turn of the loop are
handed to the threads together, shared out among them, and come back
together: the hand-off is paid per batch, not per read. Each read is one
statement, in its own implicit transaction, so it sees every write
acknowledged before it was queued.

Parameters: ``sqlite3`` looks for an adapter for every parameter that is
not an int, float, str or bytearray, and for ``bytes`` and ``None`` finds
none only after raising and swallowing an ``AttributeError`` -- a few
microseconds per value, on every kv put. The module registers identity
adapters for those two types, so each is one dictionary hit; nothing
changes in what is stored (and an adapter the application registered for
either type first is left in place).

Files: the database, ``-wal`` and ``-shm`` hold password hashes and token
digests, so they are created with mode 0600 (SQLite gives the side files
the database file's mode) and tightened to 0600 on every open.

Creating files durably: a new file's name is in its directory, which is
not on disk until that directory is fsynced -- a power cut right after the
first ``bastion serve`` could lose the database's entry, or the whole data
directory's. So every directory ``open`` makes, and the database file when
it makes it, is followed by an fsync of the directory holding it. SQLite
itself fsyncs the directory after creating a ``-wal`` (or ``-journal``)
file (its unix VFS, unless built with ``SQLITE_DISABLE_DIRSYNC``), which
each open after a clean close does; the ``-shm`` index holds nothing that
the WAL does not, and is rebuilt from it if lost.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import os
import sqlite3
import time
from collections import deque
from collections.abc import Awaitable, Callable, Mapping
from pathlib import Path
from typing import Any, TypeVar

from bastion.durable import fsync_dir
from bastion.exceptions import BastionError, InternalError, InvalidArgument, Unavailable, UsageError
from bastion.store import observe
from bastion.store._access import BatchFn
from bastion.store.base import Store
from bastion.store.credentials_sqlite import SQLiteCredentials
from bastion.store.files_sqlite import SQLiteFiles
from bastion.store.idempotency import SQLiteIdempotency
from bastion.store.jobs import SQLiteJobs
from bastion.store.kv_sqlite import SQLiteKV
from bastion.store.mail_sqlite import SQLiteMail
from bastion.store.migrations import MIGRATIONS, Migration, apply_migrations
from bastion.store.restore_journal import refuse_if_interrupted
from bastion.store.sqlite_readers import Readers
from bastion.store.sqlite_writer import Outcome, _run_together, _runs, _Write, _WriterThread
from bastion.store.topics import SQLiteTopics

__all__ = ["SQLiteStore"]

T = TypeVar("T")

FILE_MODE = 0o600
_SIDE_FILES = ("", "-wal", "-shm")
# After a group that had to run again, this many groups run isolated (see the module docstring).
_ISOLATED_GROUPS = 16


# Identity adapters: see "Parameters" in the module docstring. (Process-wide, and the same values result;
# never in place of an adapter the application registered itself.) Both are C methods, not Python
# functions, so adapting a value runs no Python frame: ``bytes.__bytes__(b)`` is ``b`` itself (adapters
# are looked up by exact type), and an empty dictionary's ``get`` answers None for any key.
_NOTHING: dict[object, None] = {}
if (bytes, sqlite3.PrepareProtocol) not in sqlite3.adapters:
    sqlite3.register_adapter(bytes, bytes.__bytes__)
if (type(None), sqlite3.PrepareProtocol) not in sqlite3.adapters:
    sqlite3.register_adapter(type(None), _NOTHING.get)


class _Aborted(Exception):
    """SQLite ended the transaction inside a write: the whole group fails (``__cause__``: why)."""


class SQLiteStore(
    SQLiteCredentials, SQLiteKV, SQLiteFiles, SQLiteJobs, SQLiteIdempotency, SQLiteMail, SQLiteTopics, Store
):
    """The SQLite backend. ``readers``: reader connections (and threads);
    ``busy_timeout``: seconds to wait for another process's write lock;
    ``max_batch``: most writes committed in one transaction."""

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        readers: int = 4,
        busy_timeout: float = 5.0,
        max_batch: int = 1024,
        migrations: tuple[Migration, ...] = MIGRATIONS,
    ) -> None:
        if readers < 1 or max_batch < 1 or busy_timeout < 0:
            raise UsageError("SQLiteStore needs readers >= 1, max_batch >= 1 and busy_timeout >= 0")
        self.path = Path(path)
        self._readers = readers
        self._busy_timeout = busy_timeout
        self._max_batch = max_batch
        self._migrations = migrations
        self._state = "new"  # new -> open -> closing -> closed (-> open again)
        self._version = 0
        self._stats = {"commits": 0, "writes": 0, "failed_commits": 0, "largest_batch": 0, "rerun_groups": 0}
        self._writer: sqlite3.Connection | None = None
        self._writer_thread: _WriterThread | None = None
        self._reader_pool: Readers | None = None  # while open
        self._reader_conns: list[sqlite3.Connection] = []
        self._queue: deque[_Write | None] = deque()
        self._wakeup: asyncio.Future[None] | None = None  # set while the writer task waits for work
        self._writer_task: asyncio.Task[None] | None = None
        self._loop: asyncio.AbstractEventLoop | None = None  # the writer task's, while open
        self._tx_serial = 0  # transactions begun on the writer connection (see the module docstring)
        self._before_commit: dict[str, Callable[[sqlite3.Connection], None]] = {}  # this transaction's hooks
        self._isolated_groups = 0  # groups still to run isolated before trying the optimistic mode again

    def __repr__(self) -> str:
        return f"SQLiteStore({str(self.path)!r}, {self._state})"

    @property
    def schema_version(self) -> int:
        return self._version

    @property
    def stats(self) -> Mapping[str, int]:
        return dict(self._stats)

    # -- lifecycle ------------------------------------------------------------------------

    async def open(self) -> None:
        if self._state in ("open", "closing"):
            raise UsageError(f"{self!r} is already open")
        loop = asyncio.get_running_loop()
        self._writer_thread = _WriterThread("bastion-store-writer")
        try:
            self._version = await self._writer_thread.run(self._open_files)
            self._reader_pool = Readers(self._reader_conns, loop, _translate)
        except BaseException:
            await self._release()
            raise
        self._queue = deque()
        self._loop = loop
        self._writer_task = loop.create_task(self._write_loop(), name=f"bastion-store-writer {self.path}")
        self._state = "open"

    async def close(self) -> None:
        if self._state != "open":
            return
        self._state = "closing"
        assert self._writer_task is not None
        self._enqueue(None)  # after every write already queued
        try:
            await self._writer_task  # cancelling close() abandons the queued writes (they fail)
        finally:
            await self._release()
            self._state = "closed"
            self._loop = None

    def _open_files(self) -> int:
        """On the writer thread: create the file 0600, connect, migrate, open the readers."""
        refuse_if_interrupted(self.path)  # else a half-done restore: no database (a new empty one), or a mix
        _make_dirs(self.path.parent)
        _create_file(self.path)
        try:
            # A bigger statement cache than sqlite3's 128: kv puts alone use up to 56 multi-row
            # statements (kv_rows.py), each costly to prepare again if evicted by the other writes'.
            self._writer = self._connect(cached_statements=512)
            mode = self._writer.execute("PRAGMA journal_mode=WAL").fetchone()[0]
            if str(mode).lower() != "wal":
                raise UsageError(f"store {self.path}: the file system does not support WAL mode ({mode})")
            version = apply_migrations(self._writer, self._migrations, label=f"store {self.path}")
            # Statement journals (and savepoints) in memory, not in a temporary file past 64 KiB: a
            # multi-row kv put writes one of some hundred KiB per commit (see kv_sqlite.py's put_rows).
            # Set after the migrations, whose index builds and table copies may sort more than fits.
            self._writer.execute("PRAGMA temp_store=MEMORY")
            for _ in range(self._readers):
                reader = self._connect()
                reader.execute("PRAGMA query_only=ON")
                self._reader_conns.append(reader)
        except sqlite3.DatabaseError as exc:
            raise UsageError(f"cannot open store {self.path}: {exc}") from exc
        for suffix in _SIDE_FILES:
            side = self.path.with_name(self.path.name + suffix)
            if side.exists():
                os.chmod(side, FILE_MODE)
        return version

    def _connect(self, cached_statements: int = 128) -> sqlite3.Connection:
        # isolation_level=None: no implicit transactions; we issue BEGIN ourselves.
        conn = sqlite3.connect(
            self.path,
            timeout=self._busy_timeout,
            isolation_level=None,
            check_same_thread=False,
            cached_statements=cached_statements,
        )
        conn.execute(f"PRAGMA busy_timeout={int(self._busy_timeout * 1000)}")
        conn.execute("PRAGMA synchronous=FULL")
        conn.execute("PRAGMA foreign_keys=ON")
        return conn

    async def _release(self) -> None:
        if self._reader_pool is not None:
            # Reads already queued run first; their connections are then idle.
            await self._reader_pool.stop()
            self._reader_pool = None
        for conn in self._reader_conns:
            conn.close()
        self._reader_conns.clear()
        if self._writer_thread is not None:
            if self._writer is not None:
                await self._writer_thread.run(self._writer.close)
                self._writer = None
            await self._writer_thread.stop()
            self._writer_thread = None

    def _check_open(self) -> None:
        if self._state != "open":
            raise UsageError(f"{self!r} is not open")

    # -- the write path: queue -> writer task -> group commit on the writer thread -------

    async def _write(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        result: T = await _Write(self, fn, None, None)
        return result

    def _write_batched(self, batch: BatchFn, item: Any) -> Awaitable[Any]:
        """``item``, written by ``batch`` with its neighbours in the group (see the module docstring).

        The write itself, an awaitable (``_Write.__await__``), not a coroutine as ``_write``: the
        caller's await goes straight to the write's future, with no coroutine frame to create and to
        pass through on resumption -- this is every kv put's path.
        """
        return _Write(self, None, batch, item)

    def _submit(self, write: _Write) -> asyncio.Future[Any]:
        """Queue ``write`` (being awaited); its future."""
        if self._state != "open":
            raise UsageError(f"{self!r} is not open")
        assert self._writer_task is not None and self._loop is not None
        if self._writer_task.done():
            raise Unavailable("the store's writer has stopped")
        if write.started:
            raise RuntimeError("a store write can be awaited only once")
        future = write.future = self._loop.create_future()
        write.started = time.perf_counter()
        self._queue.append(write)  # _enqueue, inline: every kv put comes this way
        wakeup = self._wakeup
        if wakeup is not None and not wakeup.done():
            wakeup.set_result(None)
        return future

    def _enqueue(self, item: _Write | None) -> None:
        self._queue.append(item)
        wakeup = self._wakeup
        if wakeup is not None and not wakeup.done():
            wakeup.set_result(None)

    async def _next_write(self) -> _Write | None:
        """The oldest queued item, waiting for one if need be."""
        while not self._queue:
            assert self._loop is not None
            self._wakeup = self._loop.create_future()
            try:
                await self._wakeup
            finally:
                self._wakeup = None
        return self._queue.popleft()

    async def _write_loop(self) -> None:
        writer = self._writer_thread
        assert writer is not None
        group: list[_Write] = []
        try:
            while True:
                first = await self._next_write()
                if first is None:
                    return
                group, stop = self._take_group(first)
                if group:
                    committed, outcomes = await writer.run(functools.partial(self._commit, group))
                    self._resolve(group, committed, outcomes)
                group = []
                if stop:
                    return
        finally:
            # Only reached with writes pending if this task was cancelled (the loop is
            # going away): the group in flight may or may not have committed.
            for write in group:
                if not write.future.done():
                    write.future.set_exception(Unavailable("the store closed during this write; it may not be saved"))
            while self._queue:
                item = self._queue.popleft()
                if item is not None and not item.future.done():
                    item.future.set_exception(Unavailable("the store closed before this write"))

    def _take_group(self, first: _Write) -> tuple[list[_Write], bool]:
        """``first`` and every write queued behind it (up to max_batch); True if close was asked."""
        group = [first]
        queued = self._queue
        while queued and len(group) < self._max_batch:
            item = queued.popleft()
            if item is None:
                return [w for w in group if not w.future.done()], True
            group.append(item)
        return [w for w in group if not w.future.done()], False  # done: the caller was cancelled

    def _commit(self, writes: list[_Write]) -> tuple[bool, list[Outcome]]:
        """On the writer thread: run ``writes`` in one transaction (see the module docstring).

        Returns whether the transaction committed, and per write (ok, result or exception).
        Only reads the writes' functions and items: their futures belong to the event loop.
        """
        conn = self._writer
        assert conn is not None
        try:
            if self._isolated_groups:
                self._isolated_groups -= 1
            else:
                outcomes = self._transaction(conn, writes, isolated=False)
                if outcomes is not None:
                    return True, outcomes
                self._isolated_groups = _ISOLATED_GROUPS
                self._stats["rerun_groups"] += 1  # the writer thread is this counter's only writer
            outcomes = self._transaction(conn, writes, isolated=True)
            assert outcomes is not None
            return True, outcomes
        except Exception as exc:  # the group fails, the writer carries on
            self._before_commit.clear()
            if conn.in_transaction:
                with contextlib.suppress(sqlite3.Error):  # if even this fails, SQLite rolls back on its own
                    conn.execute("ROLLBACK")
            aborted = isinstance(exc, _Aborted)
            cause = exc.__cause__ if aborted and exc.__cause__ is not None else exc
            kind = Unavailable if aborted or isinstance(cause, sqlite3.Error) else InternalError
            error = kind(f"store write failed, nothing saved: {cause}")
            error.__cause__ = cause
            return False, [(False, error)] * len(writes)

    def _transaction(self, conn: sqlite3.Connection, writes: list[_Write], isolated: bool) -> list[Outcome] | None:
        """One transaction over ``writes``, committed; None if an optimistic run met a write that raised
        (the transaction is then rolled back). Raises if the transaction itself fails."""
        self._tx_serial += 1
        conn.execute("BEGIN IMMEDIATE")
        if isolated:
            outcomes = [self._run_isolated(conn, write) for write in writes]
        else:
            outcomes = []
            for run in _runs(writes):
                try:
                    values = _run_together(conn, run)
                except Exception as exc:
                    if not conn.in_transaction:  # SQLite abandoned the whole transaction (disk full, I/O)
                        raise _Aborted from exc
                    self._before_commit.clear()
                    conn.execute("ROLLBACK")
                    return None
                if not conn.in_transaction:  # the write swallowed an error that ended the transaction
                    raise _Aborted from sqlite3.OperationalError("the transaction ended inside a write")
                outcomes += [(True, value) for value in values]
        hooks = self._before_commit
        if hooks:
            for hook in list(hooks.values()):
                hook(conn)
            hooks.clear()
        conn.execute("COMMIT")
        return outcomes

    @staticmethod
    def _run_isolated(conn: sqlite3.Connection, write: _Write) -> Outcome:
        conn.execute("SAVEPOINT write")
        try:
            value = write.run(conn)
        except Exception as exc:
            if not conn.in_transaction:  # SQLite abandoned the whole transaction (disk full, I/O)
                raise _Aborted from exc
            conn.execute("ROLLBACK TO write")
            conn.execute("RELEASE write")
            return False, _translate(exc)
        conn.execute("RELEASE write")
        return True, value

    def _resolve(self, group: list[_Write], committed: bool, outcomes: list[Outcome]) -> None:
        if committed:
            self._stats["commits"] += 1
            self._stats["writes"] += len(group)
            self._stats["largest_batch"] = max(self._stats["largest_batch"], len(group))
        else:
            self._stats["failed_commits"] += 1
        for write, (ok, value) in zip(group, outcomes, strict=True):
            if write.future.done():
                continue
            if ok:
                write.future.set_result(value)
            else:
                write.future.set_exception(value)
        if observe.observer is not None:
            for write in group:
                observe.done("write", write.started)

    # -- the read path: query_only connections on reader threads (sqlite_readers) ----------

    def _read(self, fn: Callable[[sqlite3.Connection], T]) -> Awaitable[T]:
        """``fn(conn)`` on a reader connection, handed over with this loop turn's other reads; its future."""
        if self._state != "open":
            raise UsageError(f"{self!r} is not open")
        assert self._reader_pool is not None
        return self._reader_pool.read(fn)


def _make_dirs(directory: Path) -> None:
    """Make ``directory`` (0700) and its missing parents, each one's entry fsynced into its parent."""
    missing = [d for d in (directory, *directory.parents) if not d.exists()]
    for made in reversed(missing):  # outermost first
        try:
            made.mkdir(mode=0o700 if made == directory else 0o777)
        except FileExistsError:
            continue  # made meanwhile by someone else, who syncs it
        fsync_dir(made.parent)


def _create_file(path: Path) -> bool:
    """Create ``path`` (mode 0600) if it is not there, its directory then fsynced; whether it was created."""
    try:
        os.close(os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, FILE_MODE))
    except FileExistsError:
        return False
    fsync_dir(path.parent)
    return True


def _translate(exc: Exception) -> Exception:
    """bastion errors pass through; SQLite's become bastion's, so no SQL error escapes the store.

    A StopIteration (``next()`` on a cursor with no row) becomes an InternalError: a future
    refuses it, and the writer, setting it on a write's future, would stop for good. An
    OverflowError is the sqlite3 module refusing an integer past SQLite's 64 bits (a caller's
    id or offset of 2**63): INVALID_ARGUMENT, as PostgreSQL's refusal of the same value is.
    """
    if isinstance(exc, StopIteration):
        stopped = InternalError(f"store: a store function raised {exc!r}")
        stopped.__cause__ = exc
        return stopped
    if isinstance(exc, OverflowError):
        rejected = InvalidArgument(f"store: value rejected: {exc}")
        rejected.__cause__ = exc
        return rejected
    if isinstance(exc, BastionError) or not isinstance(exc, sqlite3.Error):
        return exc
    if isinstance(exc, sqlite3.OperationalError):  # busy, locked, I/O, disk full: try again later
        error: Exception = Unavailable(f"store: {exc}")
    else:
        error = InternalError(f"store: {exc}")
    error.__cause__ = exc
    return error
