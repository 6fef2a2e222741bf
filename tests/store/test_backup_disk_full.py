"""A disk that fills up while a backup or a restore runs (a real 1 MiB tmpfs: ``small_filesystem``, root only).

Whatever step runs out of space, the error says so (``ResourceExhausted``,
"no space left"), as writing the archive and unpacking it already did, and
nothing is kept or changed: a full disk is not a store that is unavailable
(retry at once) nor a crash with a traceback.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import sqlite3
from pathlib import Path

import pytest

from bastion.exceptions import ResourceExhausted
from bastion.store import PostgresStore, backup, open_store
from bastion.store.leftovers import STAGING_PREFIX
from bastion.store.sqlite import SQLiteStore
from bastion.store.topics import TopicHead
from tests.store.test_backup import FAST
from tests.support.stores import store_location


def big_store(db: Path, kib: int) -> None:
    """A SQLite store of about ``kib`` KiB (incompressible)."""
    with contextlib.closing(sqlite3.connect(db, isolation_level=None)) as conn:
        conn.execute("CREATE TABLE schema_version (version INTEGER NOT NULL)")
        conn.execute("INSERT INTO schema_version VALUES (1)")
        conn.execute("CREATE TABLE pad (b BLOB)")
        conn.executemany("INSERT INTO pad VALUES (?)", [(os.urandom(1024),) for _ in range(kib)])


def test_a_full_disk_while_the_sqlite_store_is_copied_is_resource_exhausted(
    small_filesystem: Path, tmp_path: Path
) -> None:
    data = small_filesystem / "data"
    data.mkdir()
    big_store(data / "bastion.db", 600)  # its copy, made beside it, cannot fit in the 1 MiB
    out = tmp_path / "backups" / "a.bbk"
    # It was Unavailable "cannot copy the SQLite store …: database or disk is full", as if to be retried.
    with pytest.raises(ResourceExhausted, match="no space left"):
        backup.backup_sqlite(data / "bastion.db", data / "files", out, None, scrypt_log_n=FAST)
    assert not out.exists()
    assert [p.name for p in data.iterdir() if p.name.startswith(STAGING_PREFIX)] == []  # the partial copy is gone


def test_a_full_disk_while_a_restore_carries_topics_over_is_resource_exhausted_and_changes_nothing(
    small_filesystem: Path, tmp_path: Path
) -> None:
    made = tmp_path / "made"
    made.mkdir()
    out = tmp_path / "a.bbk"

    async def publish(db: Path, count: int) -> TopicHead | None:
        async with SQLiteStore(db) as store:
            for _ in range(count):
                await store.topics_append("grew", True, "ada", os.urandom(1024), {}, 1.0)
            return await store.topics_head("grew")

    asyncio.run(publish(made / "bastion.db", 2))
    backup.backup_sqlite(made / "bastion.db", made / "files", out, None, scrypt_log_n=FAST)
    # 300 KiB more of "grew", which a restore copies into the restored store: more than the disk has left.
    assert asyncio.run(publish(made / "bastion.db", 300)) == TopicHead("grew", 1, 302)
    data = small_filesystem / "data"
    data.mkdir()
    db = data / "bastion.db"
    shutil.copyfile(made / "bastion.db", db)
    # It was a bare sqlite3.OperationalError "database or disk is full" (a traceback from bastion restore).
    with pytest.raises(ResourceExhausted, match="no space left"):
        backup.restore_sqlite(out, db, data / "files", None)
    assert sorted(p.name for p in data.iterdir()) == ["bastion.db"]  # nothing renamed aside, no staging left
    assert asyncio.run(publish(db, 0)) == TopicHead("grew", 1, 302)


async def test_a_full_disk_while_pg_dump_writes_is_resource_exhausted(small_filesystem: Path, tmp_path: Path) -> None:
    dsn = store_location("postgresql", tmp_path, "live")
    out = tmp_path / "a.bbk"
    async with open_store(dsn) as store:
        assert isinstance(store, PostgresStore)
        for _ in range(3):  # 1.5 MiB of incompressible values: their dump cannot fit in the 1 MiB
            await store.topics_append("big", True, "ada", os.urandom(512 * 1024), {}, 1.0)
        # The dump is written beside the files directory (in the data directory), here on the small disk.
        # It was Unavailable "pg_dump failed (exit status 1): … could not write to output file …".
        with pytest.raises(ResourceExhausted, match="no space left"):
            await backup.backup_postgres(store, small_filesystem / "files", out, None, scrypt_log_n=FAST)
    assert not out.exists()
    assert os.listdir(small_filesystem) == []  # the partial dump is gone
