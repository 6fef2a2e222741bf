"""The ``kv`` storage domain on PostgreSQL (``PostgresKV``): see kv.py for how it works."""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from bastion.store._access import USER_LOCK_SHARED_KEPT, PostgresAccess
from bastion.store.kv import (
    DELETE,
    ENTRY_COLUMNS,
    LOG_COLUMNS,
    LOG_ENTRY_BYTES,
    NAMESPACE_EXISTS,
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
    usage_of,
)

if TYPE_CHECKING:
    import asyncpg

__all__ = ["PostgresKV"]

_ENTRY_BYTES = LOG_ENTRY_BYTES["postgresql"]
_PG_LOG_INSERT = f"INSERT INTO kv_log ({LOG_COLUMNS}) VALUES ($1, $2, $3, $4, $5, $6, $7)"
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
    f"lg AS (INSERT INTO kv_log ({LOG_COLUMNS}) SELECT version, $1, $2, 'put', $3, $4, $6 FROM up) "
    "SELECT (SELECT revision FROM m), (SELECT version FROM up)"
)


_PG_USAGE = "SELECT keys, bytes FROM kv_usage WHERE namespace = $1"
_KEYS_ONLY = ENTRY_COLUMNS.replace("value", "''::bytea")
#: In a page of kv_list: the bytes of the values of the entries up to ``{0}`` before this one.
_BEFORE = "coalesce(sum(octet_length(value)) OVER (ORDER BY key ROWS BETWEEN UNBOUNDED PRECEDING AND {0} PRECEDING), 0)"


async def _check_quota(conn: asyncpg.Connection[Any], namespace: str, quota: KVQuota | None) -> None:
    """After a put's writes, in its transaction: ``ResourceExhausted`` (undoing them) if over ``quota``.

    Every kv writer holds the ``kv_meta`` row lock by now, so the usage read is the latest.
    """
    if quota is None:
        return
    row = await conn.fetchrow(_PG_USAGE, namespace)
    usage = usage_of(row)
    if over_quota(usage, quota):
        raise quota_error(namespace, usage, quota)


async def _check_shared(conn: asyncpg.Connection[Any], namespace: str) -> None:
    """In a put's transaction, once it holds the ``kv_meta`` row lock (as ``kv_delete_namespace`` does
    before it deletes): ``NotFound`` unless the shared ``namespace`` exists. A statement of its own, so
    its snapshot is taken after the lock was granted and sees a deletion committed before that."""
    if await conn.fetchval(NAMESPACE_EXISTS.format("$1"), namespace) is None:
        raise no_namespace(namespace)


# Whether user $1 has a row, or the store kept no users as the lock's statement ($2) read it, before any wait.
_PG_OWNER_EXISTS = "SELECT 1 WHERE EXISTS (SELECT 1 FROM users WHERE name = $1) OR NOT CAST($2 AS BOOLEAN)"


async def _check_owner(conn: asyncpg.Connection[Any], namespace: str) -> None:
    """First in a write's transaction to the personal ``namespace`` ~NAME: ``NotFound`` unless user NAME has
    a row (or the store keeps none). Race-free against ``delete_user``, which takes NAME's advisory lock
    exclusive before its ``DELETE``, while this takes it shared (to the write's commit) before checking, in
    a statement of its own. A deletion that comes second waits for the write's commit, so its keys are there
    for the hand-over pass ``auth.delete_user`` runs after the row is gone; one that came first is waited for
    if not yet committed, and the check -- READ COMMITTED, its snapshot taken once the lock was granted --
    sees the row gone (or back, on rollback). Not a ``FOR KEY SHARE`` row lock: that wrote to the users row
    (xmax, MultiXacts under concurrency) on every put. First, before the counter's lock: a write waiting on
    a deletion holds no lock other writers need. Whether the store keeps users at all (one with none serves
    another authenticator's principals: not checked) is read in the lock's own statement, before any wait
    (``USER_LOCK_SHARED_KEPT``): a put for the *last* user, waiting for its deletion, would otherwise find
    no users left and pass."""
    kept = bool((await conn.fetchrow(USER_LOCK_SHARED_KEPT, namespace[1:]))[1])
    if await conn.fetchval(_PG_OWNER_EXISTS, namespace[1:], kept) is None:
        raise no_owner(namespace[1:])


def _pg_range(prefix: str, after: str | None, first: int) -> tuple[str, list[Any]]:
    """As ``key_range``, with ``$n`` placeholders numbered from ``first``."""
    low, high, args = key_range(prefix, after)
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

    async def kv_get_many(
        self, namespace: str, keys: Sequence[str], now: float, max_bytes: int | None = None
    ) -> list[KVEntry | None]:
        where = "namespace = $1 AND key = ANY($2::text[]) AND (expires_at IS NULL OR expires_at > $3)"
        if max_bytes is None:
            sql = f"SELECT {ENTRY_COLUMNS} FROM kv_keys WHERE {where}"
            rows = await self._call(lambda c: c.fetch(sql, namespace, list(set(keys)), now))
            found = {entry.key: entry for entry in (entry_of(tuple(r)) for r in rows)}
        else:  # octet_length() of a stored value reads its size from the toast header, not the value
            sql = (
                "SELECT key, CASE WHEN t.total <= $4 THEN value END, version, content_type, expires_at, t.total "
                "FROM kv_keys, (SELECT coalesce(sum(octet_length(value)), 0) AS total "
                f"FROM kv_keys WHERE {where}) AS t WHERE {where}"
            )
            rows = await self._call(lambda c: c.fetch(sql, namespace, list(set(keys)), now, max_bytes))
            found = {entry.key: entry for entry in entries_within([tuple(r) for r in rows], max_bytes)}
        return [found.get(key) for key in keys]

    async def kv_put(
        self, namespace: str, writes: Sequence[KVWrite], now: float, quota: KVQuota | None = None
    ) -> list[int]:
        if all(w.expected_version is None for w in writes):
            return await self._kv_put_unchecked(namespace, writes, now, quota)
        owned = namespace.startswith(PERSONAL_PREFIX) and not self.userless_owners

        async def put(conn: asyncpg.Connection[Any]) -> list[int]:
            async with conn.transaction():
                if owned:
                    await _check_owner(conn, namespace)
                tx = _PostgresTx(conn, now)
                await tx.start()
                if not namespace.startswith(PERSONAL_PREFIX):
                    await _check_shared(conn, namespace)
                versions = []
                for w in writes:
                    check_version(w.key, w.expected_version, await tx.version(namespace, w.key))
                    versions.append(await tx.put(namespace, w))
                await tx.finish()
                await _check_quota(conn, namespace, quota)
                return versions

        result: list[int] = await self._call(put)
        return result

    async def _kv_put_unchecked(
        self, namespace: str, writes: Sequence[KVWrite], now: float, quota: KVQuota | None
    ) -> list[int]:
        """``kv_put`` without compare-and-swap: one statement per write (``_PG_PUT_LIVE``)."""

        owned = namespace.startswith(PERSONAL_PREFIX) and not self.userless_owners

        async def put(conn: asyncpg.Connection[Any]) -> list[int]:
            async with conn.transaction():
                if owned:
                    await _check_owner(conn, namespace)
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
                if not namespace.startswith(PERSONAL_PREFIX):  # after the first put took the counter's lock
                    await _check_shared(conn, namespace)
                await _check_quota(conn, namespace, quota)
                return versions

        result: list[int] = await self._call(put)
        return result

    async def kv_delete(self, namespace: str, key: str, expected_version: int | None, now: float) -> int:
        owned = namespace.startswith(PERSONAL_PREFIX) and not self.userless_owners

        async def delete(conn: asyncpg.Connection[Any]) -> int:
            async with conn.transaction():
                if owned:  # refused as a put is
                    await _check_owner(conn, namespace)
                tx = _PostgresTx(conn, now)
                await tx.start()
                current = await tx.version(namespace, key)
                check_version(key, expected_version, current)
                revision = await tx.delete(namespace, key) if current else 0
                await tx.finish()
                return revision

        return int(await self._call(delete))

    async def kv_usage(self, namespace: str) -> KVUsage:
        row = await self._call(lambda c: c.fetchrow(_PG_USAGE, namespace))
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
        cond, args = _pg_range(prefix, after, 2)
        n = 2 + len(args)
        where = (
            f"FROM kv_keys WHERE namespace = $1 AND {cond} "
            f"AND (expires_at IS NULL OR expires_at > ${n}) ORDER BY key LIMIT ${n + 1}"
        )
        extra: list[Any] = []
        if keys_only:
            sql = f"SELECT {_KEYS_ONLY} {where}"
        elif max_bytes is None:
            sql = f"SELECT {ENTRY_COLUMNS} {where}"
        else:
            # The sizes of the values before each entry, from its toast header (no value is read for them):
            # a value is read while those come to at most max_bytes, then one entry follows without.
            sql = (
                f"SELECT key, CASE WHEN before <= ${n + 2} THEN value ELSE ''::bytea END, version, content_type, "
                f"expires_at FROM (SELECT {ENTRY_COLUMNS}, {_BEFORE.format(1)} AS before, "
                f"{_BEFORE.format(2)} AS before2 {where}) AS page WHERE before2 <= ${n + 2} ORDER BY key"
            )
            extra.append(max_bytes)
        rows = await self._call(lambda c: c.fetch(sql, namespace, *args, now, limit, *extra))
        return [entry_of(tuple(r)) for r in rows]

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
        sql = f"SELECT {LOG_COLUMNS} FROM kv_log WHERE {' AND '.join(where)} ORDER BY revision LIMIT ${len(args)}"
        rows = await self._call(lambda c: c.fetch(sql, *args))
        return [change_of(tuple(r)) for r in rows]

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

    async def kv_log_bytes(self, after: int, upto: int) -> int:
        sql = f"SELECT sum({_ENTRY_BYTES}) FROM kv_log WHERE revision > $1 AND revision <= $2"
        return int(await self._call(lambda c: c.fetchval(sql, after, upto)) or 0)

    async def kv_log_sizes(self, after: int, limit: int) -> list[tuple[int, int]]:
        sql = f"SELECT revision, {_ENTRY_BYTES} FROM kv_log WHERE revision > $1 ORDER BY revision LIMIT $2"
        rows = await self._call(lambda c: c.fetch(sql, after, limit))
        return [(int(revision), int(size)) for revision, size in rows]

    async def kv_compact(self, keep: int | None = None, through: int = 0) -> int:
        async def compact(conn: asyncpg.Connection[Any]) -> int:
            async with conn.transaction():
                row = await conn.fetchrow("SELECT revision, compacted FROM kv_meta WHERE id = 1 FOR UPDATE")
                cutoff = min(through if keep is None else int(row[0]) - keep, int(row[0]))
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
        return None if row is None else namespace_of(tuple(row))

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
        return [namespace_of(tuple(r)) for r in await self._call(lambda c: c.fetch(sql))]

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
                        heir = KVWrite(heir_key(old, key), bytes(value), content_type, None, expires_at)
                        await tx.put(personal_namespace(new), heir)
                await tx.finish()
                changed = len(rows)
                for name, readers, writers in await conn.fetch(
                    "SELECT name, readers, writers FROM kv_namespaces ORDER BY name FOR UPDATE"
                ):
                    r, w = json.loads(readers), json.loads(writers)
                    r2, w2 = acl_replace(r, old, new), acl_replace(w, old, new)
                    if (r2, w2) != (sorted(r), sorted(w)):
                        await conn.execute(
                            "UPDATE kv_namespaces SET readers = $1, writers = $2 WHERE name = $3",
                            json.dumps(r2), json.dumps(w2), name,
                        )  # fmt: skip
                        changed += 1
                return changed

        return int(await self._call(reassign))
