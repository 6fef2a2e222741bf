"""The ``kv`` storage domain on SQLite (``SQLiteKV``): see kv.py for how it works."""

from __future__ import annotations

import functools
import json
import sqlite3
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

import msgspec

from bastion.store._access import SQLiteAccess
from bastion.store.kv import (
    DELETE,
    ENTRY_COLUMNS,
    LOG_COLUMNS,
    LOG_ENTRY_BYTES,
    NAMESPACE_EXISTS,
    OWNER_EXISTS,
    PERSONAL_PREFIX,
    PUT,
    KVChange,
    KVEntry,
    KVNamespace,
    KVQuota,
    KVRevisions,
    KVStore,
    KVUsage,
    KVWrite,
    acl_replace,
    change_of,
    check_version,
    entries_within,
    entry_of,
    heir_key,
    key_range,
    namespace_of,
    no_namespace,
    no_owner,
    over_quota,
    personal_namespace,
    quota_error,
    text_bytes,
    usage_of,
)
from bastion.store.kv_rows import COPY_MAX, KEY_UPSERT_HEAD, KEY_UPSERT_TAIL, MAX_CHUNK_BYTES, MAX_ROWS, rows_sql

__all__ = ["SQLiteKV"]

_LIVE = "(expires_at IS NULL OR expires_at > ?)"
_ENTRY_BYTES = LOG_ENTRY_BYTES["sqlite"]
_LOG_INSERT = f"INSERT INTO kv_log ({LOG_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?)"
# A put's log row, its op written into the statement: one parameter fewer to bind per put (a text
# parameter is copied into a fresh allocation by SQLite).
_LOG_INSERT_PUT = f"INSERT INTO kv_log ({LOG_COLUMNS}) VALUES (?, ?, ?, '{PUT}', ?, ?, ?)"
_KEY_UPSERT = f"{KEY_UPSERT_HEAD}(?, ?, ?, ?, ?, ?){KEY_UPSERT_TAIL}"
# As _KEY_UPSERT, but an expired key is left alone (no row changed); the 7th argument is ``now``.
_KEY_UPSERT_LIVE = f"{_KEY_UPSERT} WHERE kv_keys.expires_at IS NULL OR kv_keys.expires_at > ?"
_NAMESPACE_EXISTS = NAMESPACE_EXISTS.format("?")
_OWNER_EXISTS = OWNER_EXISTS.format("?")
# Whether all of several owners (a JSON array, ?2, of ?1 names) have rows, or the store keeps no users.
_OWNERS_EXIST = (
    "SELECT count(*) = ? OR NOT EXISTS (SELECT 1 FROM users) FROM users WHERE name IN (SELECT value FROM json_each(?))"
)
_GET_ONE = f"SELECT {ENTRY_COLUMNS} FROM kv_keys WHERE namespace = ? AND key = ? AND {_LIVE}"
# Whether any stored key has expired at ``?`` (the partial index kv_keys_expiry answers it).
_ANY_EXPIRED = "SELECT 1 FROM kv_keys WHERE expires_at <= ? LIMIT 1"


# One kv_put call in a batch: its namespace, its writes, its time and its namespace's quota.
_Puts = tuple[str, list[KVWrite], float, KVQuota | None]
_USAGE = "SELECT keys, bytes FROM kv_usage WHERE namespace = ?"


class _NearQuota(Exception):
    """A batch of puts may take a namespace over its quota: run each alone (see ``_kv_put_unchecked``)."""


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

    def check(self, namespace: str, userless: bool) -> None:
        """``NotFound`` unless ``namespace`` exists: a shared one's row, a personal one's user (unless
        ``userless``, the store's ``userless_owners``). A delete may have come first (see kv.py)."""
        if namespace.startswith(PERSONAL_PREFIX):
            if not userless and self.conn.execute(_OWNER_EXISTS, (namespace[1:],)).fetchone() is None:
                raise no_owner(namespace[1:])
        elif self.conn.execute(_NAMESPACE_EXISTS, (namespace,)).fetchone() is None:
            raise no_namespace(namespace)

    def check_all(self, namespaces: set[str], userless: bool) -> None:
        """``check`` each of ``namespaces``; the users of several personal ones in one statement (a group of
        puts of many users: one lookup per put otherwise, about a sixth of a put's work on the writer)."""
        owners = [] if userless else [ns[1:] for ns in namespaces if ns.startswith(PERSONAL_PREFIX)]
        if len(owners) > 1 and self.conn.execute(_OWNERS_EXIST, (len(owners), json.dumps(owners))).fetchone()[0]:
            userless = True  # all of them are there: check the shared ones alone
        for namespace in namespaces:
            self.check(namespace, userless)

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
        latest = max(now for _, _, now, _ in puts)
        for _, writes, _, _ in puts:
            for w in writes:
                if w.expires_at is not None and w.expires_at <= latest:
                    return False
        return self.conn.execute(_ANY_EXPIRED, (latest,)).fetchone() is None

    def put_rows(self, puts: list[_Puts]) -> list[list[int]]:
        """``put`` of every write of ``puts``, in order, in a few multi-row statements; their versions.

        Only when ``none_expired(puts)``: no put has an expiry to log first.
        Each table takes the rows in chunks of up to ``MAX_ROWS`` (powers of
        two) and ``MAX_CHUNK_BYTES`` of values (a chunk over it is halved, down
        to one row: the statement journal of an upsert overwriting them is in
        memory), one statement each: SQLite pays its per-statement work (a
        statement journal for the upsert, whose trigger may abort it; cursors
        on every table and index it touches) once per chunk instead of once
        per row, and each page the chunk changes goes into that journal once.
        The rows of one chunk are written in order, so a key put twice ends
        with the later value, as with one statement per row. When no write
        has a content type or an expiry (the usual put), the statements hold
        ``''`` and ``NULL`` instead of binding them; when every put of the
        group is to one namespace (one user's own, or a busy shared one), the
        statements bind it once, not twice per row; and since a chunk's
        revisions follow each other, each row's is the chunk's first plus its
        place, written into the statement (kv_rows.py). A small value is
        bound as a ``bytearray`` copy: ``sqlite3`` binds one directly, where
        ``bytes`` takes an adapter lookup (see bastion/store/sqlite.py), twice
        per put.
        """
        versions: list[list[int]] = []
        keys: list[Any] = []
        log: list[Any] = []
        revision = self.revision
        plain = True
        shared: str | None = puts[0][0]
        total = 0  # value bytes
        for namespace, writes, now, _ in puts:
            if namespace != shared:
                shared = None
            mine = []
            for w in writes:
                revision += 1
                value: bytes | bytearray = w.value
                size = len(value)
                total += size
                if size <= COPY_MAX:
                    value = bytearray(value)
                if plain and (w.content_type or w.expires_at is not None):
                    plain = False
                keys += (namespace, w.key, value, w.content_type, w.expires_at)
                log += (namespace, w.key, value, w.content_type, now)
                mine.append(revision)
            versions.append(mine)
        # Drop what the statements hold or bind once: the content types and expiries of plain puts,
        # the namespace of a group that shares one.
        key_width = log_width = 5
        if plain:
            del keys[3::5], keys[3::4]
            del log[3::5]
            key_width, log_width = 3, 4
        if shared is not None:
            del keys[0::key_width]
            del log[0::log_width]
            key_width, log_width = key_width - 1, log_width - 1
        rows, done = revision - self.revision, 0
        execute = self.conn.execute
        sizes = [len(w.value) for _, writes, _, _ in puts for w in writes] if total > MAX_CHUNK_BYTES else None
        while done < rows:
            n = min(MAX_ROWS, 1 << ((rows - done).bit_length() - 1))
            if sizes is not None:
                while n > 1 and sum(sizes[done : done + n]) > MAX_CHUNK_BYTES:
                    n >>= 1
            key_sql, log_sql = rows_sql(n, plain, shared is not None)
            first = [self.revision + done + 1] if shared is None else [self.revision + done + 1, shared]
            execute(key_sql, first + keys[done * key_width : (done + n) * key_width])
            execute(log_sql, first + log[done * log_width : (done + n) * log_width])
            done += n
        self.revision = revision
        return versions

    def usage(self, namespace: str) -> KVUsage:
        row = self.conn.execute(_USAGE, (namespace,)).fetchone()
        return usage_of(row)

    def fits(self, puts: list[_Puts]) -> bool:
        """Whether every namespace ``puts`` write to stays within its quota even if each write adds a key.

        Then no quota check is needed after writing them: the usual case, one read per namespace.
        """
        incoming: dict[str, list[Any]] = {}
        for namespace, writes, _, quota in puts:
            if quota is not None:
                grows = incoming.get(namespace)
                if grows is None:
                    grows = incoming[namespace] = [quota, 0, 0]
                grows[1] += len(writes)
                size = grows[2]
                for w in writes:  # write_bytes, inline: no call per put (an ASCII key's length is its size)
                    key = w.key
                    size += len(w.value) + (len(key) if key.isascii() else text_bytes(key))
                    if w.content_type:
                        size += text_bytes(w.content_type)
                grows[2] = size
        for namespace, (quota, keys, size) in incoming.items():
            usage = self.usage(namespace)
            if over_quota(KVUsage(usage.keys + keys, usage.bytes + size), quota):
                return False
        return True

    def check_quota(self, namespace: str, quota: KVQuota) -> None:
        """After writing: ``ResourceExhausted`` if ``namespace`` now holds more than ``quota`` allows."""
        usage = self.usage(namespace)
        if over_quota(usage, quota):
            raise quota_error(namespace, usage, quota)

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

    def kv_get_many(
        self, namespace: str, keys: Sequence[str], now: float, max_bytes: int | None = None
    ) -> Awaitable[list[KVEntry | None]]:
        if max_bytes is None and len(keys) == 1:  # kv.get's: one constant statement, the read's future itself
            args = (namespace, keys[0], now)
            return self._read(lambda c: [_entry_or_none(c.execute(_GET_ONE, args).fetchone())])
        return self._kv_get_many(namespace, keys, now, max_bytes)

    async def _kv_get_many(
        self, namespace: str, keys: Sequence[str], now: float, max_bytes: int | None
    ) -> list[KVEntry | None]:
        wanted = list(dict.fromkeys(keys))
        if not wanted:
            return []
        marks = ", ".join("?" * len(wanted))
        where = f"namespace = ? AND key IN ({marks}) AND {_LIVE}"
        args = (namespace, *wanted, now)
        if max_bytes is None:
            sql = f"SELECT {ENTRY_COLUMNS} FROM kv_keys WHERE {where}"
            rows = await self._read(lambda c: c.execute(sql, args).fetchall())
            found = {entry.key: entry for entry in map(entry_of, rows)}
        else:  # length() of a BLOB column reads its size, not its content
            sql = (
                "SELECT key, CASE WHEN t.total <= ? THEN value END, version, content_type, expires_at, t.total "
                f"FROM kv_keys, (SELECT coalesce(sum(length(value)), 0) AS total FROM kv_keys WHERE {where}) AS t "
                f"WHERE {where}"
            )
            rows = await self._read(lambda c: c.execute(sql, (max_bytes, *args, *args)).fetchall())
            found = {entry.key: entry for entry in entries_within(rows, max_bytes)}
        return [found.get(key) for key in keys]

    def kv_put(
        self, namespace: str, writes: Sequence[KVWrite], now: float, quota: KVQuota | None = None
    ) -> Awaitable[list[int]]:
        # Not a coroutine: the caller awaits the queued write itself (see SQLiteStore._write_batched).
        writes = list(writes)
        for w in writes:
            if w.expected_version is not None:
                return self._write(functools.partial(self._kv_put_checked, (namespace, writes, now, quota)))
        versions: Awaitable[list[int]] = self._write_batched(self._kv_put_unchecked, (namespace, writes, now, quota))
        return versions

    def _kv_put_checked(self, put: _Puts, conn: sqlite3.Connection) -> list[int]:
        """The write of ``kv_put`` calls with compare-and-swap: each key's version read first."""
        namespace, writes, now, quota = put
        tx = self._kv_tx(conn, now)
        tx.check(namespace, self.userless_owners)
        exact = not tx.fits([put])
        versions = []
        for w in writes:
            if w.expected_version is None:
                versions.append(tx.put_unchecked(namespace, w))
            else:
                check_version(w.key, w.expected_version, tx.version(namespace, w.key))
                versions.append(tx.put(namespace, w))
        if exact and quota is not None:
            tx.check_quota(namespace, quota)
        tx.finish()
        return versions

    def _kv_put_unchecked(self, conn: sqlite3.Connection, puts: list[_Puts]) -> list[list[int]]:
        """The batched write of ``kv_put`` calls without compare-and-swap: each one's versions.

        Usually a few multi-row statements per table for the whole batch (``put_rows``);
        when some key may have expired, each put the careful way instead
        (``put_unchecked``: an expired key's expiry is logged first).

        Quotas: when the batch plainly fits (``fits``), nothing more. Otherwise
        a batch of several calls raises, so that the store runs each alone in
        its own savepoint, and a call alone writes, then checks its
        namespace's usage and raises (its savepoint undone) if it is over.
        """
        tx = self._kv_tx(conn, puts[-1][2])
        # Each namespace once, however many puts; one gone fails the batch: each put is then run alone.
        tx.check_all({namespace for namespace, _, _, _ in puts}, self.userless_owners)
        exact = not tx.fits(puts)
        if exact and len(puts) > 1:
            raise _NearQuota
        if tx.none_expired(puts):
            versions = tx.put_rows(puts)
        else:
            versions = []
            for namespace, writes, now, _ in puts:
                tx.now = now
                versions.append([tx.put_unchecked(namespace, w) for w in writes])
        if exact:
            namespace, _, _, quota = puts[0]
            if quota is not None:
                tx.check_quota(namespace, quota)
        tx.finish()
        return versions

    async def kv_delete(self, namespace: str, key: str, expected_version: int | None, now: float) -> int:
        def delete(conn: sqlite3.Connection) -> int:
            tx = self._kv_tx(conn, now)
            if namespace.startswith(PERSONAL_PREFIX):  # refused as a put is (a shared one gone holds no key)
                tx.check(namespace, self.userless_owners)
            current = tx.version(namespace, key)
            check_version(key, expected_version, current)
            revision = tx.delete(namespace, key) if current else 0
            tx.finish()
            return revision

        return await self._write(delete)

    async def kv_usage(self, namespace: str) -> KVUsage:
        row = await self._read(lambda c: c.execute(_USAGE, (namespace,)).fetchone())
        return usage_of(row)

    async def kv_list(
        self,
        namespace: str,
        prefix: str,
        after: str | None,
        limit: int,
        now: float,
        max_bytes: int | None = None,
        keys_only: bool = False,
    ) -> list[KVEntry]:
        low, high, args = key_range(prefix, after)
        columns = ENTRY_COLUMNS.replace("value", "X''") if keys_only else ENTRY_COLUMNS
        sql = f"SELECT {columns} FROM kv_keys WHERE namespace = ? AND {low} {high} AND {_LIVE} ORDER BY key LIMIT ?"
        bound = None if keys_only else max_bytes

        def read(c: sqlite3.Connection) -> list[KVEntry]:
            entries, total = [], 0
            for row in c.execute(sql, (namespace, *args, now, limit)):  # row by row: values only as needed
                entry = entry_of(row)
                if bound is not None and total > bound:
                    entries.append(msgspec.structs.replace(entry, value=b""))
                    break
                total += len(entry.value)
                entries.append(entry)
            return entries

        return await self._read(read)

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
            low, high, bounds = key_range(prefix, None)
            where.append(f"namespace = ? AND {low} {high}")
            args += [namespace, *bounds]
        sql = f"SELECT {LOG_COLUMNS} FROM kv_log WHERE {' AND '.join(where)} ORDER BY revision LIMIT ?"
        rows = await self._read(lambda c: c.execute(sql, (*args, limit)).fetchall())
        return [change_of(row) for row in rows]

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

    async def kv_log_bytes(self, after: int, upto: int) -> int:
        sql = f"SELECT sum({_ENTRY_BYTES}) FROM kv_log WHERE revision > ? AND revision <= ?"
        return int(await self._read(lambda c: c.execute(sql, (after, upto)).fetchone()[0] or 0))

    async def kv_log_sizes(self, after: int, limit: int) -> list[tuple[int, int]]:
        sql = f"SELECT revision, {_ENTRY_BYTES} FROM kv_log WHERE revision > ? ORDER BY revision LIMIT ?"
        rows = await self._read(lambda c: c.execute(sql, (after, limit)).fetchall())
        return [(int(revision), int(size)) for revision, size in rows]

    async def kv_compact(self, keep: int | None = None, through: int = 0) -> int:
        def compact(conn: sqlite3.Connection) -> int:
            revision = self._kv_tx(conn, 0.0).revision  # kv_meta's is stored only at commit
            compacted = conn.execute("SELECT compacted FROM kv_meta WHERE id = 1").fetchone()[0]
            cutoff = min(through if keep is None else revision - keep, revision)
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
        return None if row is None else namespace_of(row)

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
        return [namespace_of(row) for row in await self._read(lambda c: c.execute(sql).fetchall())]

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
                    tx.put(personal_namespace(new), KVWrite(heir_key(old, key), value, content_type, None, expires_at))
            changed = len(rows)
            for name, readers, writers in conn.execute(
                "SELECT name, readers, writers FROM kv_namespaces ORDER BY name"
            ).fetchall():
                r, w = json.loads(readers), json.loads(writers)
                r2, w2 = acl_replace(r, old, new), acl_replace(w, old, new)
                if (r2, w2) != (sorted(r), sorted(w)):
                    conn.execute(
                        "UPDATE kv_namespaces SET readers = ?, writers = ? WHERE name = ?",
                        (json.dumps(r2), json.dumps(w2), name),
                    )
                    changed += 1
            tx.finish()  # last: nothing after it may fail, or the counter would run ahead of the log
            return changed

        return await self._write(reassign)


def _entry_or_none(row: tuple[Any, ...] | None) -> KVEntry | None:
    return None if row is None else entry_of(row)
