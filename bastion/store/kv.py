"""The ``kv`` storage domain: interface, SQLite mixin, PostgreSQL mixin.

Theory of operation
-------------------

Keys live in *namespaces*. A user's personal namespace is ``~<user>``
(``personal_namespace``) and exists implicitly; shared namespaces are rows of
``kv_namespaces`` carrying their access lists. The store does not check
access: the service does, before it calls the store.

Revisions, as in etcd. One counter per store (``kv_meta.revision``) counts
every change to every key; each changed key takes the next value, and a
key's ``version`` is the revision of its last change, so versions are unique
across the store and grow with time. Compare-and-swap compares a caller's
``expected_version`` with the key's version (0: the key must not exist) in
the same transaction that writes it; a mismatch raises ``Aborted``.

The change log (``kv_log``) holds one row per change -- ``put`` with the new
value, or ``delete`` (explicit, by namespace deletion, by a user's data being
handed over, or by expiry) -- keyed by revision. It is what ``watch``
replays, and what the service's hub tails to feed live watchers, so
watchers see exactly the committed changes, in revision order, without gaps.
``kv_compact`` trims it to the newest ``keep`` changes and records the
highest revision removed (``compacted``).

Revision allocation is race-free on both backends because every kv write
reads and advances the counter inside its own transaction: SQLite has one
writer; PostgreSQL takes the counter row ``FOR UPDATE`` first, which
serialises kv writers across replicas, so revisions commit in order and a
rolled-back transaction leaves no gap.

Expiry: a key with ``expires_at <= now`` is invisible to every read at
once; ``kv_expire`` (the service's sweep) deletes such keys and logs each
as a ``delete``. A put over an expired key first logs its expiry.

Every time is a float UNIX timestamp passed in by the caller (``now``), so
the store has no clock of its own.
"""

from __future__ import annotations

import functools
import json
import sqlite3
import time
from abc import ABC, abstractmethod
from collections.abc import Awaitable, Callable, Sequence
from typing import TYPE_CHECKING, Any

import msgspec

from bastion.exceptions import Aborted
from bastion.store._access import Notifying, PostgresAccess, SQLiteAccess

if TYPE_CHECKING:
    import asyncpg

__all__ = [
    "POSTGRES_SCHEMA",
    "SQLITE_SCHEMA",
    "KVChange",
    "KVEntry",
    "KVNamespace",
    "KVRevisions",
    "KVStore",
    "KVWrite",
    "PostgresKV",
    "SQLiteKV",
    "personal_namespace",
    "prefix_end",
]

PERSONAL_PREFIX = "~"
PUT, DELETE = "put", "delete"

# Schema migration statements of this domain (its migration version is fixed in migrations.py).
SQLITE_SCHEMA: tuple[str, ...] = (
    """CREATE TABLE kv_namespaces (
        name       TEXT PRIMARY KEY,
        readers    TEXT NOT NULL DEFAULT '[]',      -- JSON array of "user:NAME" / "role:NAME"
        writers    TEXT NOT NULL DEFAULT '[]',
        created_at REAL NOT NULL,
        created_by TEXT NOT NULL DEFAULT ''
    ) WITHOUT ROWID""",
    """CREATE TABLE kv_keys (
        namespace    TEXT NOT NULL,
        key          TEXT NOT NULL,
        value        BLOB NOT NULL,
        content_type TEXT NOT NULL DEFAULT '',
        version      INTEGER NOT NULL,             -- revision of the last change
        expires_at   REAL,
        PRIMARY KEY (namespace, key)
    )""",
    "CREATE INDEX kv_keys_expiry ON kv_keys (expires_at) WHERE expires_at IS NOT NULL",
    """CREATE TABLE kv_log (
        revision     INTEGER PRIMARY KEY,
        namespace    TEXT NOT NULL,
        key          TEXT NOT NULL,
        op           TEXT NOT NULL CHECK (op IN ('put', 'delete')),
        value        BLOB,                          -- the new value of a put
        content_type TEXT NOT NULL DEFAULT '',
        at           REAL NOT NULL
    )""",
    """CREATE TABLE kv_meta (
        id        INTEGER PRIMARY KEY CHECK (id = 1),
        revision  INTEGER NOT NULL,                 -- the latest revision handed out
        compacted INTEGER NOT NULL                  -- log rows up to this revision are gone
    )""",
    "INSERT INTO kv_meta (id, revision, compacted) VALUES (1, 0, 0)",
)
POSTGRES_SCHEMA: tuple[str, ...] = (
    """CREATE TABLE kv_namespaces (
        name       TEXT COLLATE "C" PRIMARY KEY,
        readers    TEXT NOT NULL DEFAULT '[]',
        writers    TEXT NOT NULL DEFAULT '[]',
        created_at DOUBLE PRECISION NOT NULL,
        created_by TEXT NOT NULL DEFAULT ''
    )""",
    """CREATE TABLE kv_keys (
        namespace    TEXT COLLATE "C" NOT NULL,
        key          TEXT COLLATE "C" NOT NULL,    -- byte order, as SQLite: prefix ranges and cursors agree
        value        BYTEA NOT NULL,
        content_type TEXT NOT NULL DEFAULT '',
        version      BIGINT NOT NULL,
        expires_at   DOUBLE PRECISION,
        PRIMARY KEY (namespace, key)
    )""",
    "CREATE INDEX kv_keys_expiry ON kv_keys (expires_at) WHERE expires_at IS NOT NULL",
    """CREATE TABLE kv_log (
        revision     BIGINT PRIMARY KEY,
        namespace    TEXT COLLATE "C" NOT NULL,
        key          TEXT COLLATE "C" NOT NULL,
        op           TEXT NOT NULL CHECK (op IN ('put', 'delete')),
        value        BYTEA,
        content_type TEXT NOT NULL DEFAULT '',
        at           DOUBLE PRECISION NOT NULL
    )""",
    """CREATE TABLE kv_meta (
        id        INTEGER PRIMARY KEY CHECK (id = 1),
        revision  BIGINT NOT NULL,
        compacted BIGINT NOT NULL
    )""",
    "INSERT INTO kv_meta (id, revision, compacted) VALUES (1, 0, 0)",
    # Tell the other replicas' watch feeds (Store.listen("kv")) that the log grew; delivered
    # at commit, once per transaction, with the schema as payload.
    """CREATE FUNCTION kv_log_notify() RETURNS trigger LANGUAGE plpgsql AS $$
    BEGIN
        PERFORM pg_notify('bastion_kv', current_schema());
        RETURN NULL;
    END $$""",
    "CREATE TRIGGER kv_log_notify AFTER INSERT ON kv_log FOR EACH STATEMENT EXECUTE FUNCTION kv_log_notify()",
)


def personal_namespace(user: str) -> str:
    """The name of ``user``'s personal namespace."""
    return PERSONAL_PREFIX + user


def prefix_end(prefix: str) -> str | None:
    """The smallest string greater than every string starting with ``prefix`` (None: no bound)."""
    chars = list(prefix)
    while chars:
        code = ord(chars.pop()) + 1
        if 0xD800 <= code <= 0xDFFF:  # surrogates cannot be stored: skip past them
            code = 0xE000
        if code <= 0x10FFFF:
            return "".join(chars) + chr(code)
    return None


# -- records --------------------------------------------------------------------------------


class KVEntry(msgspec.Struct, frozen=True):
    """A live key: its value and the revision of its last change."""

    key: str
    value: bytes
    version: int
    content_type: str = ""
    expires_at: float | None = None


class KVWrite(msgspec.Struct, frozen=True):
    """One key to put. ``expected_version``: None (any), 0 (must not exist) or the current version."""

    key: str
    value: bytes
    content_type: str = ""
    expected_version: int | None = None
    expires_at: float | None = None


class KVChange(msgspec.Struct, frozen=True):
    """One row of the change log. ``value`` is None for a delete."""

    revision: int
    namespace: str
    key: str
    op: str
    value: bytes | None
    content_type: str
    at: float


class KVNamespace(msgspec.Struct, frozen=True):
    """A shared namespace and its access lists ("user:NAME" or "role:NAME" entries)."""

    name: str
    readers: list[str] = []
    writers: list[str] = []
    created_at: float = 0.0
    created_by: str = ""


class KVRevisions(msgspec.Struct, frozen=True):
    """``current``: the latest revision (0: no change yet); log rows up to ``compacted`` are gone."""

    current: int
    compacted: int


def _mismatch(key: str, expected: int, actual: int) -> Aborted:
    found = f"version {actual}" if actual else "no such key"
    want = "no such key" if expected == 0 else f"version {expected}"
    return Aborted(
        f"compare-and-swap failed on {key!r}: expected {want}, found {found}",
        details={"key": key, "expected_version": expected, "version": actual},
    )


def _check(key: str, expected: int | None, actual: int) -> None:
    if expected is not None and expected != actual:
        raise _mismatch(key, expected, actual)


# -- the interface --------------------------------------------------------------------------


class KVStore(Notifying, ABC):
    """What every backend offers for kv. Every write is one transaction; see the module docstring."""

    @abstractmethod
    async def kv_get_many(self, namespace: str, keys: Sequence[str], now: float) -> list[KVEntry | None]:
        """The live entry of each key (None: absent or expired), in the order asked."""

    @abstractmethod
    def kv_put(self, namespace: str, writes: Sequence[KVWrite], now: float) -> Awaitable[list[int]]:
        """Put every write atomically (all or none); the new version of each.

        A compare-and-swap mismatch raises ``Aborted`` and writes nothing.
        (An awaitable rather than a coroutine, so SQLite can hand back its
        queued write's future; PostgreSQL's is a coroutine.)
        """

    @abstractmethod
    async def kv_delete(self, namespace: str, key: str, expected_version: int | None, now: float) -> int:
        """Delete ``key``; the revision of the delete, 0 if there was no live key (and none was expected).

        ``expected_version`` as for ``KVWrite``; a mismatch raises ``Aborted``.
        """

    @abstractmethod
    async def kv_list(self, namespace: str, prefix: str, after: str | None, limit: int, now: float) -> list[KVEntry]:
        """Live entries whose key starts with ``prefix`` and sorts after ``after``, by key (bytewise)."""

    @abstractmethod
    async def kv_revisions(self) -> KVRevisions: ...

    @abstractmethod
    async def kv_changes(
        self, after: int, upto: int | None, limit: int, namespace: str | None = None, prefix: str = ""
    ) -> list[KVChange]:
        """Logged changes with ``after < revision <= upto`` (no upper bound: None), by revision."""

    @abstractmethod
    async def kv_expire(self, now: float, limit: int) -> int:
        """Delete up to ``limit`` keys expired at ``now``, logging each; how many."""

    @abstractmethod
    async def kv_compact(self, keep: int) -> int:
        """Trim the change log to its newest ``keep`` changes; how many were removed."""

    @abstractmethod
    async def kv_create_namespace(self, namespace: KVNamespace) -> bool:
        """Insert; False if the name is taken."""

    @abstractmethod
    async def kv_get_namespace(self, name: str) -> KVNamespace | None: ...

    @abstractmethod
    async def kv_update_namespace(self, name: str, readers: list[str], writers: list[str]) -> KVNamespace | None:
        """Replace the access lists; the updated record, None if there is no such namespace."""

    @abstractmethod
    async def kv_delete_namespace(self, name: str, now: float) -> int | None:
        """Delete the namespace and every key in it (each logged); keys deleted, None if unknown."""

    @abstractmethod
    async def kv_list_namespaces(self) -> list[KVNamespace]:
        """Every shared namespace, by name."""

    @abstractmethod
    async def kv_reassign_owner(self, old: str, new: str | None) -> int:
        """Hand user ``old``'s data to ``new`` (or delete it when None); items changed.

        Keys of ``~old`` move to ``~new`` under ``from-<old>/`` (replacing any
        key already there), each move logged as a delete and a put; access
        list entries ``user:old`` become ``user:new`` (or are dropped).
        Repeating it after an interruption finishes the job.
        """


def _heir_key(old: str, key: str) -> str:
    return f"from-{old}/{key}"


def _acl_replace(entries: list[str], old: str, new: str | None) -> list[str]:
    gone = f"user:{old}"
    out = [e for e in entries if e != gone]
    if new is not None and len(out) != len(entries) and f"user:{new}" not in out:
        out.append(f"user:{new}")
    return sorted(out)


# -- SQLite ---------------------------------------------------------------------------------

_ENTRY_COLUMNS = "key, value, version, content_type, expires_at"
_LIVE = "(expires_at IS NULL OR expires_at > ?)"
_LOG_COLUMNS = "revision, namespace, key, op, value, content_type, at"
_LOG_INSERT = f"INSERT INTO kv_log ({_LOG_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?)"
# A put's log row, its op written into the statement: one parameter fewer to bind per put (a text
# parameter is copied into a fresh allocation by SQLite).
_LOG_INSERT_PUT = f"INSERT INTO kv_log ({_LOG_COLUMNS}) VALUES (?, ?, ?, '{PUT}', ?, ?, ?)"
_KEY_UPSERT = (
    "INSERT INTO kv_keys (namespace, key, value, content_type, version, expires_at) VALUES (?, ?, ?, ?, ?, ?) "
    "ON CONFLICT (namespace, key) DO UPDATE SET value = excluded.value, content_type = excluded.content_type, "
    "version = excluded.version, expires_at = excluded.expires_at"
)
# As _KEY_UPSERT, but an expired key is left alone (no row changed); the 7th argument is ``now``.
_KEY_UPSERT_LIVE = f"{_KEY_UPSERT} WHERE kv_keys.expires_at IS NULL OR kv_keys.expires_at > ?"
# Whether any stored key has expired at ``?`` (the partial index kv_keys_expiry answers it).
_ANY_EXPIRED = "SELECT 1 FROM kv_keys WHERE expires_at <= ? LIMIT 1"


def _entry(row: tuple[Any, ...]) -> KVEntry:
    key, value, version, content_type, expires_at = row
    return KVEntry(key, bytes(value), int(version), content_type, expires_at)


def _change(row: tuple[Any, ...]) -> KVChange:
    revision, namespace, key, op, value, content_type, at = row
    return KVChange(int(revision), namespace, key, op, None if value is None else bytes(value), content_type, at)


def _namespace(row: tuple[Any, ...]) -> KVNamespace:
    name, readers, writers, created_at, created_by = row
    return KVNamespace(name, json.loads(readers), json.loads(writers), float(created_at), created_by)


def _range(prefix: str, after: str | None) -> tuple[str, str, list[Any]]:
    """SQL conditions (``?`` placeholders) for keys starting with ``prefix`` and after ``after``."""
    low = prefix if after is None or after < prefix else after
    op = ">" if after is not None and after >= prefix else ">="
    end = prefix_end(prefix)
    if end is None:
        return f"key {op} ?", "", [low]
    return f"key {op} ?", "AND key < ?", [low, end]


# One kv_put call in a batch: its namespace, its writes and its time.
_Puts = tuple[str, list[KVWrite], float]


class _SQLiteTx:
    """Changes made on the writer connection within one write: the counter and the log.

    The counter is read from ``kv_meta`` once per transaction (group commit),
    not once per write: ``counter`` caches it with the store's transaction
    serial, which is safe because the group holds the database's write lock
    from ``BEGIN IMMEDIATE`` to ``COMMIT`` (another process sharing the file
    reads it afresh in its own next transaction). ``finish`` advances the
    cache and registers the before-commit hook ``store_revision``, which
    writes the cache's final value to ``kv_meta`` once, just before the
    group's ``COMMIT`` (see bastion/store/sqlite.py). ``finish`` is each
    write's last step, so only a write that succeeds reaches it: a write that
    raises leaves the cache as it found it, as its savepoint's rollback leaves
    the tables. A write run again in a new transaction (a new serial) reads
    the counter afresh.
    """

    __slots__ = ("conn", "counter", "hooks", "now", "revision")

    def __init__(
        self,
        conn: sqlite3.Connection,
        now: float,
        counter: list[int],
        serial: int,
        hooks: dict[str, Callable[[sqlite3.Connection], None]],
    ) -> None:
        self.conn = conn
        self.now = now
        self.counter = counter  # [transaction serial, revision] of the store, shared by its writes
        self.hooks = hooks
        if counter[0] != serial:
            counter[0] = serial
            counter[1] = int(conn.execute("SELECT revision FROM kv_meta WHERE id = 1").fetchone()[0])
        self.revision = counter[1]

    def version(self, namespace: str, key: str) -> int:
        """The key's live version (0: absent); logs and removes it first if it has expired."""
        row = self.conn.execute(
            "SELECT version, expires_at FROM kv_keys WHERE namespace = ? AND key = ?", (namespace, key)
        ).fetchone()
        if row is None:
            return 0
        if row[1] is not None and row[1] <= self.now:
            self.delete(namespace, key)
            return 0
        return int(row[0])

    def put(self, namespace: str, w: KVWrite) -> int:
        """Write ``w`` over whatever ``namespace``/``w.key`` holds; its new version."""
        self.revision += 1
        self.conn.execute(_KEY_UPSERT, (namespace, w.key, w.value, w.content_type, self.revision, w.expires_at))
        self.conn.execute(_LOG_INSERT_PUT, (self.revision, namespace, w.key, w.value, w.content_type, self.now))
        return self.revision

    def put_unchecked(self, namespace: str, w: KVWrite) -> int:
        """``put`` for a write without ``expected_version``: no read first, unless the key has expired.

        The upsert leaves an expired key alone (its WHERE); then the expiry is
        logged first, as ``version`` would have, and the put follows it.
        """
        revision = self.revision + 1
        args = (namespace, w.key, w.value, w.content_type, revision, w.expires_at, self.now)
        if self.conn.execute(_KEY_UPSERT_LIVE, args).rowcount == 0:
            self.delete(namespace, w.key)
            return self.put(namespace, w)
        self.revision = revision
        self.conn.execute(_LOG_INSERT_PUT, (revision, namespace, w.key, w.value, w.content_type, self.now))
        return revision

    def none_expired(self, puts: list[_Puts]) -> bool:
        """Whether no key ``puts`` write can have expired when they are written.

        True when no stored key has expired at the latest of their times and
        none of their own expiry times is as early: then every put of the
        batch finds its key live or absent, whatever the order.
        """
        latest = max(now for _, _, now in puts)
        for _, writes, _ in puts:
            for w in writes:
                if w.expires_at is not None and w.expires_at <= latest:
                    return False
        return self.conn.execute(_ANY_EXPIRED, (latest,)).fetchone() is None

    def put_rows(self, puts: list[_Puts]) -> list[list[int]]:
        """``put`` of every write of ``puts``, in order: one ``executemany`` per table; their versions.

        Only when ``none_expired(puts)``: no put has an expiry to log first.
        (One statement per row, not multi-row ``VALUES``: a statement that
        writes many rows makes SQLite keep a statement journal, which costs
        more than the statements it saves.)
        """
        keys: list[tuple[Any, ...]] = []
        log: list[tuple[Any, ...]] = []
        versions: list[list[int]] = []
        revision = self.revision
        for namespace, writes, now in puts:
            mine = []
            for w in writes:
                revision += 1
                keys.append((namespace, w.key, w.value, w.content_type, revision, w.expires_at))
                log.append((revision, namespace, w.key, w.value, w.content_type, now))
                mine.append(revision)
            versions.append(mine)
        self.conn.executemany(_KEY_UPSERT, keys)
        self.conn.executemany(_LOG_INSERT_PUT, log)
        self.revision = revision
        return versions

    def delete(self, namespace: str, key: str) -> int:
        self.revision += 1
        self.conn.execute("DELETE FROM kv_keys WHERE namespace = ? AND key = ?", (namespace, key))
        self.conn.execute(_LOG_INSERT, (self.revision, namespace, key, DELETE, None, "", self.now))
        return self.revision

    def finish(self) -> None:
        if self.revision != self.counter[1]:
            self.counter[1] = self.revision
            if "kv" not in self.hooks:
                self.hooks["kv"] = self.store_revision

    def store_revision(self, conn: sqlite3.Connection) -> None:
        """The before-commit hook: the transaction's last revision into ``kv_meta``."""
        conn.execute("UPDATE kv_meta SET revision = ? WHERE id = 1", (self.counter[1],))


class SQLiteKV(SQLiteAccess, KVStore):
    """kv on SQLite: every write is one function on the writer thread (one savepoint of a group commit)."""

    _kv_counter: list[int]  # see _SQLiteTx; set by _kv_tx on first use

    def _kv_tx(self, conn: sqlite3.Connection, now: float) -> _SQLiteTx:
        """On the writer thread, inside a write: the counter and log of this write."""
        try:
            counter = self._kv_counter
        except AttributeError:
            counter = self._kv_counter = [-1, 0]
        return _SQLiteTx(conn, now, counter, self._tx_serial, self._before_commit)

    async def kv_get_many(self, namespace: str, keys: Sequence[str], now: float) -> list[KVEntry | None]:
        wanted = list(dict.fromkeys(keys))
        marks = ", ".join("?" * len(wanted))
        sql = f"SELECT {_ENTRY_COLUMNS} FROM kv_keys WHERE namespace = ? AND key IN ({marks}) AND {_LIVE}"
        rows = await self._read(lambda c: c.execute(sql, (namespace, *wanted, now)).fetchall()) if wanted else []
        found = {entry.key: entry for entry in map(_entry, rows)}
        return [found.get(key) for key in keys]

    def kv_put(self, namespace: str, writes: Sequence[KVWrite], now: float) -> Awaitable[list[int]]:
        # Not a coroutine: the caller awaits the queued write itself (see SQLiteStore._write_batched).
        writes = list(writes)
        for w in writes:
            if w.expected_version is not None:
                return self._write(functools.partial(self._kv_put_checked, namespace, writes, now))
        versions: Awaitable[list[int]] = self._write_batched(self._kv_put_unchecked, (namespace, writes, now))
        return versions

    def _kv_put_checked(self, namespace: str, writes: list[KVWrite], now: float, conn: sqlite3.Connection) -> list[int]:
        """The write of ``kv_put`` calls with compare-and-swap: each key's version read first."""
        tx = self._kv_tx(conn, now)
        versions = []
        for w in writes:
            if w.expected_version is None:
                versions.append(tx.put_unchecked(namespace, w))
            else:
                _check(w.key, w.expected_version, tx.version(namespace, w.key))
                versions.append(tx.put(namespace, w))
        tx.finish()
        return versions

    def _kv_put_unchecked(self, conn: sqlite3.Connection, puts: list[_Puts]) -> list[list[int]]:
        """The batched write of ``kv_put`` calls without compare-and-swap: each one's versions.

        Usually one ``executemany`` per table for the whole batch (``put_rows``);
        when some key may have expired, each put the careful way instead
        (``put_unchecked``: an expired key's expiry is logged first).
        """
        tx = self._kv_tx(conn, puts[-1][2])
        if tx.none_expired(puts):
            versions = tx.put_rows(puts)
        else:
            versions = []
            for namespace, writes, now in puts:
                tx.now = now
                versions.append([tx.put_unchecked(namespace, w) for w in writes])
        tx.finish()
        return versions

    async def kv_delete(self, namespace: str, key: str, expected_version: int | None, now: float) -> int:
        def delete(conn: sqlite3.Connection) -> int:
            tx = self._kv_tx(conn, now)
            current = tx.version(namespace, key)
            _check(key, expected_version, current)
            revision = tx.delete(namespace, key) if current else 0
            tx.finish()
            return revision

        return await self._write(delete)

    async def kv_list(self, namespace: str, prefix: str, after: str | None, limit: int, now: float) -> list[KVEntry]:
        low, high, args = _range(prefix, after)
        sql = (
            f"SELECT {_ENTRY_COLUMNS} FROM kv_keys WHERE namespace = ? AND {low} {high} AND {_LIVE} "
            "ORDER BY key LIMIT ?"
        )
        rows = await self._read(lambda c: c.execute(sql, (namespace, *args, now, limit)).fetchall())
        return [_entry(row) for row in rows]

    async def kv_revisions(self) -> KVRevisions:
        row = await self._read(lambda c: c.execute("SELECT revision, compacted FROM kv_meta WHERE id = 1").fetchone())
        return KVRevisions(int(row[0]), int(row[1]))

    async def kv_changes(
        self, after: int, upto: int | None, limit: int, namespace: str | None = None, prefix: str = ""
    ) -> list[KVChange]:
        where: list[str] = ["revision > ?"]
        args: list[Any] = [after]
        if upto is not None:
            where.append("revision <= ?")
            args.append(upto)
        if namespace is not None:
            low, high, bounds = _range(prefix, None)
            where.append(f"namespace = ? AND {low} {high}")
            args += [namespace, *bounds]
        sql = f"SELECT {_LOG_COLUMNS} FROM kv_log WHERE {' AND '.join(where)} ORDER BY revision LIMIT ?"
        rows = await self._read(lambda c: c.execute(sql, (*args, limit)).fetchall())
        return [_change(row) for row in rows]

    async def kv_expire(self, now: float, limit: int) -> int:
        def expire(conn: sqlite3.Connection) -> int:
            rows = conn.execute(
                "SELECT namespace, key FROM kv_keys WHERE expires_at IS NOT NULL AND expires_at <= ? LIMIT ?",
                (now, limit),
            ).fetchall()
            tx = self._kv_tx(conn, now)
            for namespace, key in rows:
                tx.delete(namespace, key)
            tx.finish()
            return len(rows)

        return await self._write(expire)

    async def kv_compact(self, keep: int) -> int:
        def compact(conn: sqlite3.Connection) -> int:
            revision = self._kv_tx(conn, 0.0).revision  # kv_meta's is stored only at commit
            compacted = conn.execute("SELECT compacted FROM kv_meta WHERE id = 1").fetchone()[0]
            cutoff = revision - keep
            if cutoff <= compacted:
                return 0
            removed = conn.execute("DELETE FROM kv_log WHERE revision <= ?", (cutoff,)).rowcount
            conn.execute("UPDATE kv_meta SET compacted = ? WHERE id = 1", (cutoff,))
            return int(removed)

        return await self._write(compact)

    async def kv_create_namespace(self, namespace: KVNamespace) -> bool:
        row = (
            namespace.name, json.dumps(sorted(namespace.readers)), json.dumps(sorted(namespace.writers)),
            namespace.created_at, namespace.created_by,
        )  # fmt: skip
        sql = (
            "INSERT INTO kv_namespaces (name, readers, writers, created_at, created_by) VALUES (?, ?, ?, ?, ?) "
            "ON CONFLICT (name) DO NOTHING"
        )
        return bool(await self._write(lambda c: c.execute(sql, row).rowcount == 1))

    async def kv_get_namespace(self, name: str) -> KVNamespace | None:
        sql = "SELECT name, readers, writers, created_at, created_by FROM kv_namespaces WHERE name = ?"
        row = await self._read(lambda c: c.execute(sql, (name,)).fetchone())
        return None if row is None else _namespace(row)

    async def kv_update_namespace(self, name: str, readers: list[str], writers: list[str]) -> KVNamespace | None:
        sql = "UPDATE kv_namespaces SET readers = ?, writers = ? WHERE name = ?"
        args = (json.dumps(sorted(readers)), json.dumps(sorted(writers)), name)
        if not await self._write(lambda c: c.execute(sql, args).rowcount == 1):
            return None
        return await self.kv_get_namespace(name)

    async def kv_delete_namespace(self, name: str, now: float) -> int | None:
        def delete(conn: sqlite3.Connection) -> int | None:
            if conn.execute("DELETE FROM kv_namespaces WHERE name = ?", (name,)).rowcount == 0:
                return None
            keys = conn.execute("SELECT key FROM kv_keys WHERE namespace = ?", (name,)).fetchall()
            tx = self._kv_tx(conn, now)
            for (key,) in keys:
                tx.delete(name, key)
            tx.finish()
            return len(keys)

        return await self._write(delete)

    async def kv_list_namespaces(self) -> list[KVNamespace]:
        sql = "SELECT name, readers, writers, created_at, created_by FROM kv_namespaces ORDER BY name"
        return [_namespace(row) for row in await self._read(lambda c: c.execute(sql).fetchall())]

    async def kv_reassign_owner(self, old: str, new: str | None) -> int:
        now = time.time()
        source = personal_namespace(old)

        def reassign(conn: sqlite3.Connection) -> int:
            rows = conn.execute(
                "SELECT key, value, content_type, expires_at FROM kv_keys WHERE namespace = ?", (source,)
            ).fetchall()
            tx = self._kv_tx(conn, now)
            for key, value, content_type, expires_at in rows:
                tx.delete(source, key)
                if new is not None:
                    tx.put(personal_namespace(new), KVWrite(_heir_key(old, key), value, content_type, None, expires_at))
            changed = len(rows)
            for name, readers, writers in conn.execute(
                "SELECT name, readers, writers FROM kv_namespaces ORDER BY name"
            ).fetchall():
                r, w = json.loads(readers), json.loads(writers)
                r2, w2 = _acl_replace(r, old, new), _acl_replace(w, old, new)
                if (r2, w2) != (sorted(r), sorted(w)):
                    conn.execute(
                        "UPDATE kv_namespaces SET readers = ?, writers = ? WHERE name = ?",
                        (json.dumps(r2), json.dumps(w2), name),
                    )
                    changed += 1
            tx.finish()  # last: nothing after it may fail, or the counter would run ahead of the log
            return changed

        return await self._write(reassign)


# -- PostgreSQL -----------------------------------------------------------------------------

_PG_LOG_INSERT = f"INSERT INTO kv_log ({_LOG_COLUMNS}) VALUES ($1, $2, $3, $4, $5, $6, $7)"
_PG_KEY_UPSERT = (
    "INSERT INTO kv_keys (namespace, key, value, content_type, version, expires_at) VALUES ($1, $2, $3, $4, $5, $6) "
    "ON CONFLICT (namespace, key) DO UPDATE SET value = excluded.value, content_type = excluded.content_type, "
    "version = excluded.version, expires_at = excluded.expires_at"
)


# One statement for a put without expected_version: lock and advance the counter, upsert the key
# unless an expired key is in the way (the upsert's WHERE: then no version comes back), log the put.
# The upsert acts on the newest committed row whatever the statement's snapshot, so nothing here
# reads a stale key. Returns the revision taken and the new version (NULL: an expired key was left alone).
_PG_PUT_LIVE = (
    "WITH m AS (UPDATE kv_meta SET revision = revision + 1 WHERE id = 1 RETURNING revision), "
    "up AS (INSERT INTO kv_keys (namespace, key, value, content_type, version, expires_at) "
    "SELECT $1::text, $2::text, $3::bytea, $4::text, m.revision, $5::float8 FROM m "
    "ON CONFLICT (namespace, key) DO UPDATE SET value = excluded.value, content_type = excluded.content_type, "
    "version = excluded.version, expires_at = excluded.expires_at "
    "WHERE kv_keys.expires_at IS NULL OR kv_keys.expires_at > $6::float8 RETURNING version), "
    f"lg AS (INSERT INTO kv_log ({_LOG_COLUMNS}) SELECT version, $1, $2, 'put', $3, $4, $6 FROM up) "
    "SELECT (SELECT revision FROM m), (SELECT version FROM up)"
)


def _pg_range(prefix: str, after: str | None, first: int) -> tuple[str, list[Any]]:
    """As ``_range``, with ``$n`` placeholders numbered from ``first``."""
    low, high, args = _range(prefix, after)
    sql = f"{low} {high}"
    for i in range(len(args)):
        sql = sql.replace("?", f"${first + i}", 1)
    return sql, args


class _PostgresTx:
    """As ``_SQLiteTx``, on an asyncpg connection inside ``conn.transaction()``.

    ``start`` locks the counter row: kv writers on every replica queue here, so
    revisions are handed out and committed in order.
    """

    def __init__(self, conn: asyncpg.Connection[Any], now: float) -> None:
        self.conn = conn
        self.now = now
        self.revision = 0

    async def start(self) -> None:
        self.revision = int(await self.conn.fetchval("SELECT revision FROM kv_meta WHERE id = 1 FOR UPDATE"))

    async def version(self, namespace: str, key: str) -> int:
        row = await self.conn.fetchrow(
            "SELECT version, expires_at FROM kv_keys WHERE namespace = $1 AND key = $2", namespace, key
        )
        if row is None:
            return 0
        if row[1] is not None and row[1] <= self.now:
            await self.delete(namespace, key)
            return 0
        return int(row[0])

    async def put(self, namespace: str, w: KVWrite) -> int:
        self.revision += 1
        await self.conn.execute(_PG_KEY_UPSERT, namespace, w.key, w.value, w.content_type, self.revision, w.expires_at)
        await self.conn.execute(_PG_LOG_INSERT, self.revision, namespace, w.key, PUT, w.value, w.content_type, self.now)
        return self.revision

    async def delete(self, namespace: str, key: str) -> int:
        self.revision += 1
        await self.conn.execute("DELETE FROM kv_keys WHERE namespace = $1 AND key = $2", namespace, key)
        await self.conn.execute(_PG_LOG_INSERT, self.revision, namespace, key, DELETE, None, "", self.now)
        return self.revision

    async def finish(self) -> None:
        await self.conn.execute("UPDATE kv_meta SET revision = $1 WHERE id = 1", self.revision)


class PostgresKV(PostgresAccess, KVStore):
    """kv on PostgreSQL: every write is one transaction that first locks the revision counter."""

    async def kv_get_many(self, namespace: str, keys: Sequence[str], now: float) -> list[KVEntry | None]:
        sql = (
            f"SELECT {_ENTRY_COLUMNS} FROM kv_keys WHERE namespace = $1 AND key = ANY($2::text[]) "
            "AND (expires_at IS NULL OR expires_at > $3)"
        )
        rows = await self._call(lambda c: c.fetch(sql, namespace, list(set(keys)), now))
        found = {entry.key: entry for entry in (_entry(tuple(r)) for r in rows)}
        return [found.get(key) for key in keys]

    async def kv_put(self, namespace: str, writes: Sequence[KVWrite], now: float) -> list[int]:
        if all(w.expected_version is None for w in writes):
            return await self._kv_put_unchecked(namespace, writes, now)

        async def put(conn: asyncpg.Connection[Any]) -> list[int]:
            async with conn.transaction():
                tx = _PostgresTx(conn, now)
                await tx.start()
                versions = []
                for w in writes:
                    _check(w.key, w.expected_version, await tx.version(namespace, w.key))
                    versions.append(await tx.put(namespace, w))
                await tx.finish()
                return versions

        result: list[int] = await self._call(put)
        return result

    async def _kv_put_unchecked(self, namespace: str, writes: Sequence[KVWrite], now: float) -> list[int]:
        """``kv_put`` without compare-and-swap: one statement per write (``_PG_PUT_LIVE``)."""

        async def put(conn: asyncpg.Connection[Any]) -> list[int]:
            async with conn.transaction():
                versions = []
                for w in writes:
                    taken, version = await conn.fetchrow(
                        _PG_PUT_LIVE, namespace, w.key, w.value, w.content_type, w.expires_at, now
                    )
                    if version is None:  # an expired key: log its expiry at the revision taken, then put
                        tx = _PostgresTx(conn, now)
                        tx.revision = int(taken) - 1
                        await tx.delete(namespace, w.key)
                        version = await tx.put(namespace, w)
                        await tx.finish()
                    versions.append(int(version))
                return versions

        result: list[int] = await self._call(put)
        return result

    async def kv_delete(self, namespace: str, key: str, expected_version: int | None, now: float) -> int:
        async def delete(conn: asyncpg.Connection[Any]) -> int:
            async with conn.transaction():
                tx = _PostgresTx(conn, now)
                await tx.start()
                current = await tx.version(namespace, key)
                _check(key, expected_version, current)
                revision = await tx.delete(namespace, key) if current else 0
                await tx.finish()
                return revision

        return int(await self._call(delete))

    async def kv_list(self, namespace: str, prefix: str, after: str | None, limit: int, now: float) -> list[KVEntry]:
        cond, args = _pg_range(prefix, after, 2)
        n = 2 + len(args)
        sql = (
            f"SELECT {_ENTRY_COLUMNS} FROM kv_keys WHERE namespace = $1 AND {cond} "
            f"AND (expires_at IS NULL OR expires_at > ${n}) ORDER BY key LIMIT ${n + 1}"
        )
        rows = await self._call(lambda c: c.fetch(sql, namespace, *args, now, limit))
        return [_entry(tuple(r)) for r in rows]

    async def kv_revisions(self) -> KVRevisions:
        row = await self._call(lambda c: c.fetchrow("SELECT revision, compacted FROM kv_meta WHERE id = 1"))
        return KVRevisions(int(row[0]), int(row[1]))

    async def kv_changes(
        self, after: int, upto: int | None, limit: int, namespace: str | None = None, prefix: str = ""
    ) -> list[KVChange]:
        where: list[str] = ["revision > $1"]
        args: list[Any] = [after]
        if upto is not None:
            args.append(upto)
            where.append(f"revision <= ${len(args)}")
        if namespace is not None:
            args.append(namespace)
            cond, bounds = _pg_range(prefix, None, len(args) + 1)
            where.append(f"namespace = ${len(args)} AND {cond}")
            args += bounds
        args.append(limit)
        sql = f"SELECT {_LOG_COLUMNS} FROM kv_log WHERE {' AND '.join(where)} ORDER BY revision LIMIT ${len(args)}"
        rows = await self._call(lambda c: c.fetch(sql, *args))
        return [_change(tuple(r)) for r in rows]

    async def kv_expire(self, now: float, limit: int) -> int:
        async def expire(conn: asyncpg.Connection[Any]) -> int:
            async with conn.transaction():
                tx = _PostgresTx(conn, now)
                await tx.start()
                rows = await conn.fetch(
                    "SELECT namespace, key FROM kv_keys WHERE expires_at IS NOT NULL AND expires_at <= $1 LIMIT $2",
                    now,
                    limit,
                )
                for namespace, key in rows:
                    await tx.delete(namespace, key)
                await tx.finish()
                return len(rows)

        return int(await self._call(expire))

    async def kv_compact(self, keep: int) -> int:
        async def compact(conn: asyncpg.Connection[Any]) -> int:
            async with conn.transaction():
                row = await conn.fetchrow("SELECT revision, compacted FROM kv_meta WHERE id = 1 FOR UPDATE")
                cutoff = int(row[0]) - keep
                if cutoff <= int(row[1]):
                    return 0
                status = await conn.execute("DELETE FROM kv_log WHERE revision <= $1", cutoff)
                await conn.execute("UPDATE kv_meta SET compacted = $1 WHERE id = 1", cutoff)
                return int(status.split()[-1])

        return int(await self._call(compact))

    async def kv_create_namespace(self, namespace: KVNamespace) -> bool:
        sql = (
            "INSERT INTO kv_namespaces (name, readers, writers, created_at, created_by) VALUES ($1, $2, $3, $4, $5) "
            "ON CONFLICT (name) DO NOTHING"
        )
        args = (
            namespace.name, json.dumps(sorted(namespace.readers)), json.dumps(sorted(namespace.writers)),
            namespace.created_at, namespace.created_by,
        )  # fmt: skip
        status = await self._call(lambda c: c.execute(sql, *args))
        return bool(status == "INSERT 0 1")

    async def kv_get_namespace(self, name: str) -> KVNamespace | None:
        sql = "SELECT name, readers, writers, created_at, created_by FROM kv_namespaces WHERE name = $1"
        row = await self._call(lambda c: c.fetchrow(sql, name))
        return None if row is None else _namespace(tuple(row))

    async def kv_update_namespace(self, name: str, readers: list[str], writers: list[str]) -> KVNamespace | None:
        sql = "UPDATE kv_namespaces SET readers = $1, writers = $2 WHERE name = $3"
        status = await self._call(
            lambda c: c.execute(sql, json.dumps(sorted(readers)), json.dumps(sorted(writers)), name)
        )
        if status != "UPDATE 1":
            return None
        return await self.kv_get_namespace(name)

    async def kv_delete_namespace(self, name: str, now: float) -> int | None:
        async def delete(conn: asyncpg.Connection[Any]) -> int | None:
            async with conn.transaction():
                tx = _PostgresTx(conn, now)
                await tx.start()
                if await conn.execute("DELETE FROM kv_namespaces WHERE name = $1", name) == "DELETE 0":
                    return None
                keys = await conn.fetch("SELECT key FROM kv_keys WHERE namespace = $1 ORDER BY key", name)
                for (key,) in keys:
                    await tx.delete(name, key)
                await tx.finish()
                return len(keys)

        result: int | None = await self._call(delete)
        return result

    async def kv_list_namespaces(self) -> list[KVNamespace]:
        sql = "SELECT name, readers, writers, created_at, created_by FROM kv_namespaces ORDER BY name"
        return [_namespace(tuple(r)) for r in await self._call(lambda c: c.fetch(sql))]

    async def kv_reassign_owner(self, old: str, new: str | None) -> int:
        now = time.time()
        source = personal_namespace(old)

        async def reassign(conn: asyncpg.Connection[Any]) -> int:
            async with conn.transaction():
                tx = _PostgresTx(conn, now)
                await tx.start()
                rows = await conn.fetch(
                    "SELECT key, value, content_type, expires_at FROM kv_keys WHERE namespace = $1 ORDER BY key",
                    source,
                )
                for key, value, content_type, expires_at in rows:
                    await tx.delete(source, key)
                    if new is not None:
                        heir = KVWrite(_heir_key(old, key), bytes(value), content_type, None, expires_at)
                        await tx.put(personal_namespace(new), heir)
                await tx.finish()
                changed = len(rows)
                for name, readers, writers in await conn.fetch(
                    "SELECT name, readers, writers FROM kv_namespaces ORDER BY name FOR UPDATE"
                ):
                    r, w = json.loads(readers), json.loads(writers)
                    r2, w2 = _acl_replace(r, old, new), _acl_replace(w, old, new)
                    if (r2, w2) != (sorted(r), sorted(w)):
                        await conn.execute(
                            "UPDATE kv_namespaces SET readers = $1, writers = $2 WHERE name = $3",
                            json.dumps(r2), json.dumps(w2), name,
                        )  # fmt: skip
                        changed += 1
                return changed

        return int(await self._call(reassign))
