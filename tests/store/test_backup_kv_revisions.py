"""A restore never sets kv's revision counter back (bastion/store/restore_kv.py), on SQLite and PostgreSQL."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from bastion.exceptions import Aborted
from bastion.store import Store, backup, open_store
from bastion.store.kv import KVRevisions, KVWrite
from bastion.store.sqlite import SQLiteStore
from tests.store.test_backup import FAST, pg_cleanup, schema_of
from tests.support.stores import store_location

__all__ = ["pg_cleanup"]  # the fixture, imported to be used here

NS = "~ada"
NOW = 1000.0


async def write_after_the_backup(store: Store) -> tuple[int, KVRevisions]:
    """Changes the backup does not hold, then a compaction; the version a client last saw of "k", and the
    store's revisions."""
    await store.kv_put(NS, [KVWrite("k", b"after 1")], NOW)
    (seen,) = await store.kv_put(NS, [KVWrite("k", b"after 2")], NOW)
    await store.kv_put(NS, [KVWrite("other", b"x")], NOW)
    await store.kv_compact(keep=1)
    return seen, await store.kv_revisions()


async def check_versions_go_on(store: Store, seen: int, replaced: KVRevisions) -> None:
    # The counter used to be the archive's again: the versions handed out since the backup were handed
    # out anew, to other values, and a compare-and-swap with one a client kept could then succeed.
    revisions = await store.kv_revisions()
    assert revisions == KVRevisions(replaced.current, replaced.current)
    assert await store.kv_changes(0, None, 100) == []  # what the log held is gone: a watch starts afresh
    (entry,) = await store.kv_get_many(NS, ["k"], NOW)
    assert entry is not None and entry.value == b"backed up"
    versions = [(await store.kv_put(NS, [KVWrite("k", b"new %d" % i)], NOW))[0] for i in range(3)]
    assert min(versions) > replaced.current
    with pytest.raises(Aborted):
        await store.kv_put(NS, [KVWrite("k", b"stale", expected_version=seen)], NOW)


def test_restoring_an_older_sqlite_backup_keeps_kv_versions_going_forward(tmp_path: Path) -> None:
    data = tmp_path / "data"
    data.mkdir()
    db, files, out = data / "bastion.db", data / "files", tmp_path / "a.bbk"

    async def before() -> None:
        async with SQLiteStore(db) as store:
            await store.kv_put(NS, [KVWrite("k", b"backed up")], NOW)

    async def after() -> tuple[int, KVRevisions]:
        async with SQLiteStore(db) as store:
            return await write_after_the_backup(store)

    async def restored(path: Path) -> KVRevisions:
        async with SQLiteStore(path) as store:
            return await store.kv_revisions()

    asyncio.run(before())
    backup.backup_sqlite(db, files, out, None, scrypt_log_n=FAST)
    seen, replaced = asyncio.run(after())
    backup.restore_sqlite(out, db, files, None)

    async def check() -> None:
        async with SQLiteStore(db) as store:
            await check_versions_go_on(store, seen, replaced)

    asyncio.run(check())
    # Into a fresh data directory there is no counter to carry over: the archive's (docs/operations.md).
    fresh = tmp_path / "fresh"
    fresh.mkdir()
    backup.restore_sqlite(out, fresh / "bastion.db", fresh / "files", None)
    assert asyncio.run(restored(fresh / "bastion.db")) == KVRevisions(1, 0)


async def test_restoring_an_older_postgres_backup_keeps_kv_versions_going_forward(
    tmp_path: Path, pg_cleanup: list[str]
) -> None:
    dsn = store_location("postgresql", tmp_path, "live")
    pg_cleanup.append(schema_of(dsn) + "_")
    out = tmp_path / "a.bbk"
    async with open_store(dsn) as store:
        await store.kv_put(NS, [KVWrite("k", b"backed up")], NOW)
        await backup.backup_postgres(store, tmp_path / "files", out, None, scrypt_log_n=FAST)
        seen, replaced = await write_after_the_backup(store)
    await backup.restore_postgres(out, dsn, tmp_path / "files-restored", None, force=True)
    async with open_store(dsn) as store:
        await check_versions_go_on(store, seen, replaced)
