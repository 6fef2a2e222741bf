"""What a backend's domain mixins may use of the backend core.

Each storage domain (``kv``, ``files``, ``jobs``) lives in its own module:
its interface, its SQLite mixin and its PostgreSQL mixin side by side, so the
two dialects of one domain are read and changed together. A mixin reaches its
database only through the few members declared here, which the backend core
(``SQLiteStore``, ``PostgresStore``) implements.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any, TypeVar

if TYPE_CHECKING:
    import asyncpg

__all__ = ["BatchFn", "Notifying", "PostgresAccess", "SQLiteAccess"]

T = TypeVar("T")
#: A batched write: ``batch(conn, items)``, one result per item (see ``SQLiteAccess``).
BatchFn = Callable[[sqlite3.Connection, list[Any]], list[Any]]


class SQLiteAccess:
    """Members of ``SQLiteStore`` a SQLite mixin may use.

    ``_write(fn)`` runs ``fn(conn)`` on the single writer connection as one
    write of a group commit and returns its result once the group is durably
    committed; an exception raised by ``fn`` fails only that write (nothing
    it did is saved). ``fn`` may be called more than once, each time in a new
    transaction, and only the last call's result counts: it must act only
    through ``conn`` (anything else it changes must be harmless to repeat,
    e.g. a cache keyed by ``_tx_serial``), and never commit, roll back or
    touch savepoints itself.
    ``_write_batched(batch, item)`` is ``_write`` for ``item`` of a batched
    write: ``batch(conn, items)`` writes the items of neighbouring writes of
    the same ``batch`` at once and returns one result per item, in order;
    alone (and after a batch raised) an item is written as ``batch(conn,
    [item])``. ``batch`` keeps the contract of ``fn``.
    ``_read(fn)`` runs ``fn(conn)`` on a ``query_only`` reader connection.
    ``_tx_serial`` counts transactions begun on the writer; a write may cache
    values it read inside the transaction under it (the group holds the
    write lock from ``BEGIN IMMEDIATE`` to ``COMMIT``).
    ``_before_commit`` maps a name to a hook ``hook(conn)`` that a write may
    register; each runs once, after the group's last write and just before
    its ``COMMIT``, and the map is emptied when the transaction ends. A hook
    runs even if the write that registered it failed after registering, so
    it must be right either way. See bastion/store/sqlite.py.
    ``_write_batched`` and ``_read`` return awaitables, not coroutines. All three raise
    ``UsageError`` when the store is not open. ``_data_dir`` is the
    directory the database lives in.
    """

    if TYPE_CHECKING:
        _tx_serial: int
        _before_commit: dict[str, Callable[[sqlite3.Connection], None]]

        async def _write(self, fn: Callable[[sqlite3.Connection], T]) -> T: ...

        def _write_batched(self, batch: BatchFn, item: Any) -> Awaitable[Any]: ...

        def _read(self, fn: Callable[[sqlite3.Connection], T]) -> Awaitable[T]: ...


#: PostgreSQL: user NAME's advisory lock, transaction-scoped (the second key is ``hashtext(NAME)``; the first
#: is this class, used for nothing else -- migrations use 0x0BA57104, files the ``hashtext`` of their names).
#: A write that must not commit for a user deleted meanwhile (kv to ``~NAME``, an upload, a share to NAME)
#: takes it shared, first in its transaction, then checks the row in a statement of its own (READ COMMITTED:
#: its snapshot is taken once the lock is granted); ``delete_user`` takes it exclusive before its ``DELETE``.
#: Unlike a ``FOR KEY SHARE`` row lock it writes nothing to the users row (no xmax, no MultiXact, no dirtied
#: page or WAL on a put or a share).
USER_LOCK_CLASS = 0x0BA5_7105
USER_LOCK_SHARED = f"SELECT pg_advisory_xact_lock_shared({USER_LOCK_CLASS}, hashtext($1))"
USER_LOCK = f"SELECT pg_advisory_xact_lock({USER_LOCK_CLASS}, hashtext($1))"
#: ``USER_LOCK_SHARED``, and whether the store kept any user as it began: its snapshot is taken before the wait
#: for a deletion. The check after it must not take "the store keeps no users" from a later snapshot: a write
#: for the *last* user that waited for its deletion would find no rows at all and pass (a store with no users
#: serves another authenticator's principals, whose writes are not checked).
USER_LOCK_SHARED_KEPT = f"{USER_LOCK_SHARED}, EXISTS (SELECT 1 FROM users)"


class PostgresAccess:
    """Members of ``PostgresStore`` a PostgreSQL mixin may use.

    ``_pool`` is the open ``asyncpg.Pool`` (every statement in autocommit
    unless the mixin opens ``conn.transaction()``); ``_call(coro_fn)`` runs
    ``coro_fn(conn)`` on a pooled connection and translates database errors
    into bastion's (``Unavailable``/``InternalError``), so mixins should
    prefer it over touching ``_pool`` directly. Pooled connections are not
    reset when released (it saves a round trip per call), so a mixin never
    leaves session state behind: no session-level ``SET``, session advisory
    locks, ``LISTEN`` or ``WITH HOLD`` cursors on a pooled connection (use
    ``SET LOCAL`` and ``pg_advisory_xact_lock`` inside a transaction).
    """

    if TYPE_CHECKING:
        _pool: asyncpg.Pool[Any]

        async def _call(self, fn: Callable[[asyncpg.Connection[Any]], Any]) -> Any: ...


class Notifying:
    """Notifications between processes sharing a store; part of every ``Store``."""

    async def listen(self, channel: str, callback: Callable[[], None]) -> Callable[[], Awaitable[None]] | None:
        """Call ``callback()`` whenever another process sharing this store notifies ``channel``.

        For changes made by other replicas, sooner than a poll would see them.
        Delivery is a hint, not a log: a notification can be lost (a dropped
        connection), so ``callback`` is also called after every reconnect, and
        users still read the durable state (e.g. kv's change log) and keep a
        slow poll. Returns how to stop listening, or None when this backend
        has no notifications (SQLite: poll).
        """
        return None
