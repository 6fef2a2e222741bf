"""A PostgreSQL restore over an existing schema (``--force``) is one transaction (bastion/store/backup.py,
bastion/store/backup_pg.py): killed or failing at any point, it leaves the old schema in place; finished, the
new one. Real PostgreSQL schemas, real pg_restore and psql processes, a real SIGKILL.

Skipped without BASTION_TEST_POSTGRES_DSN (tests/support/stores.py).
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

import asyncpg
import pytest

from bastion.exceptions import DataLoss, FailedPrecondition, Unavailable
from bastion.security.credentials import User
from bastion.store import backup, open_store
from bastion.store.backup_pg import VERSION_MISMATCH, _check_tool, pg_environment, restore_in_one_transaction
from bastion.store.postgres import PostgresStore
from tests.store.test_backup import (
    make_blob,
    pg_cleanup,
    pg_store_with_users,
    pg_users,
    schema_of,
    schemas_like,
    sql,
)
from tests.support.stores import postgres_dsn, store_location

#: Timing assertions, or effects on the whole PostgreSQL server: runs alone under
#: ``pytest -n`` (the "exclusive" marker, tests/conftest.py).
pytestmark = pytest.mark.exclusive

__all__ = ["pg_cleanup"]  # the fixture, used here

ROOT = Path(__file__).resolve().parents[2]

_RESTORE = """
import asyncio, sys
from pathlib import Path
from bastion.store import backup

asyncio.run(backup.restore_postgres(Path(sys.argv[1]), sys.argv[2], Path(sys.argv[3]), None, force=True))
"""


def blob_names(files: Path) -> set[str]:
    return {name for _, _, names in os.walk(files / "blobs") for name in names}


async def restore_backends() -> list[asyncpg.Record]:
    return await sql(
        "SELECT pid, wait_event_type FROM pg_stat_activity WHERE application_name = 'bastion-restore'"
        " AND pid <> pg_backend_pid()"
    )


async def until(condition: str, check: Callable[[], Awaitable[bool]], deadline: float = 30.0) -> None:
    """Poll ``check()`` until it holds, or fail naming ``condition``."""
    end = time.monotonic() + deadline
    while not await check():
        if time.monotonic() > end:
            raise AssertionError(f"timed out waiting for {condition}")
        await asyncio.sleep(0.02)


def test_a_forced_restore_killed_half_way_leaves_the_old_schema_in_place(tmp_path: Path, pg_cleanup: list[str]) -> None:
    """The old schema was renamed aside (committed), then pg_restore ran: killed between the two (a power cut,
    kill -9) there was no schema under the target's name -- neither the old data nor the new. The rename is
    now in the restore's own transaction. The files directory, swapped before it, keeps the old blobs beside
    the restored ones until it commits. The restore is stopped where it is midway for sure: this test holds
    an uncommitted CREATE SCHEMA of the archived name, on which the restore's own CREATE SCHEMA waits.

    Not an async test: those have 10 s, and this one starts a Python process and backs up and restores twice."""
    asyncio.run(asyncio.wait_for(killed_half_way(tmp_path, pg_cleanup), 90))


async def killed_half_way(tmp_path: Path, pg_cleanup: list[str]) -> None:
    dsn, files = await pg_store_with_users(tmp_path, 4)
    archived = schema_of(dsn)
    out = tmp_path / "a.bbk"
    await backup.backup_postgres(dsn, files, out, None)
    await sql(f'ALTER SCHEMA "{archived}" RENAME TO "{archived}_src"')  # the archived name must be free
    target = store_location("postgresql", tmp_path, "target")
    pg_cleanup.extend([archived, schema_of(target) + "_"])
    async with open_store(target) as store:
        for name in ("old-1", "old-2"):
            await store.create_user(User(name, frozenset(), None, 1.0))
    before = await pg_users(schema_of(target))
    target_files = tmp_path / "target-files"
    old_blob = make_blob(target_files, b"a blob of the old schema's files")

    blocker = await asyncpg.connect(postgres_dsn(), timeout=10)
    try:
        blocking = blocker.transaction()
        await blocking.start()
        await blocker.execute(f'CREATE SCHEMA "{archived}"')  # uncommitted: the restore's CREATE SCHEMA waits
        env = {**os.environ, "PYTHONPATH": str(ROOT)}
        args = [sys.executable, "-c", _RESTORE, str(out), target, str(target_files)]
        proc = await asyncio.create_subprocess_exec(
            *args, env=env, start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
        try:

            async def waiting() -> bool:
                return any(row["wait_event_type"] == "Lock" for row in await restore_backends())

            await until("the restore to wait on the archived schema's name", waiting)
        finally:
            os.killpg(proc.pid, signal.SIGKILL)  # the restore, pg_restore and psql: the power went out
            assert await proc.wait() == -signal.SIGKILL
        await blocking.rollback()
    finally:
        await blocker.close()

    async def gone() -> bool:
        return not await restore_backends()

    await until("the killed restore's connection to end", gone)
    assert await schemas_like(schema_of(target)) == [schema_of(target)]  # nothing renamed aside
    assert await pg_users(schema_of(target)) == before
    assert await schemas_like(archived) == [f"{archived}_src"]  # no half-restored schema left
    async with open_store(target) as store:  # a working store, as it was
        assert await store.get_user("old-1") is not None
    assert old_blob in blob_names(target_files)  # with its blobs, wherever the files directory was left

    # Run again to the end, it swaps: the archive's users in the target, the old schema kept aside.
    result = await backup.restore_postgres(out, target, target_files, None, force=True)
    aside = result.kept[0].removeprefix("schema ")
    assert await pg_users(aside) == before
    assert blob_names(target_files) == {hashlib.sha256(b"referenced " * 100).hexdigest()}  # the archive's
    assert old_blob in blob_names(Path(result.kept[-1]))  # the old files directory, aside
    assert await pg_users(schema_of(target)) == [f"u{i:06d}" for i in range(4)]
    assert await schemas_like(archived) == [f"{archived}_src"]


async def test_a_forced_restore_that_fails_midway_leaves_the_old_schema_intact_and_readable(
    tmp_path: Path, pg_cleanup: list[str]
) -> None:
    """A dump that verifies but fails in the middle of restoring (a token row whose user is missing, found
    when the foreign key is added after every table's rows are loaded): the old schema stays the target,
    readable, nothing is left aside, and the old files directory is moved back."""
    dsn, files = await pg_store_with_users(tmp_path, 3)
    schema = schema_of(dsn)
    pg_cleanup.append(schema + "_")
    conn = await asyncpg.connect(postgres_dsn(), timeout=10)
    try:  # with the foreign key's trigger not firing: a row the restore will refuse
        await conn.execute(
            f'SET session_replication_role = replica; INSERT INTO "{schema}".tokens (id, digest, username)'
            " VALUES ('t1', 'd1', 'nobody')"
        )
    finally:
        await conn.close()
    out = tmp_path / "a.bbk"
    await backup.backup_postgres(dsn, files, out, None)
    await sql(f"DELETE FROM \"{schema}\".tokens WHERE id = 't1'")
    async with open_store(dsn) as store:
        await store.create_user(User("late", frozenset(), None, 1.0))
    before = await pg_users(schema)
    blobs_before = sorted(p.relative_to(files) for p in files.rglob("*"))

    with pytest.raises(Unavailable, match=r"failed.*foreign key"):
        await backup.restore_postgres(out, dsn, files, None, force=True)
    assert await schemas_like(schema) == [schema]
    assert await pg_users(schema) == before and "late" in before
    assert sorted(p.relative_to(files) for p in files.rglob("*")) == blobs_before
    assert [name for name in os.listdir(tmp_path) if "pre-restore" in name] == []
    async with open_store(dsn) as store:
        assert await store.get_user("late") is not None


_UNRESTRICTED_PG_RESTORE = """#!/bin/sh
# pg_restore before 15.14 (and 13.22, 14.19, 16.10, 17.6): the SQL of a forged archive, no \\restrict line.
printf -- '--\\n-- PostgreSQL database dump\\n--\\n\\nSET lock_timeout = 0;\\n\\\\! touch %s\\n' "$MARKER"
"""


async def test_a_pg_restore_that_leaves_psql_unrestricted_is_refused_before_psql_reads_a_line(tmp_path: Path) -> None:
    """psql obeys meta-commands in what it runs (``\\!`` starts a shell): only SQL opened by ``\\restrict`` --
    what pg_restore writes since the fix for CVE-2025-8714 -- may reach it."""
    fake = tmp_path / "pg_restore"
    fake.write_text(_UNRESTRICTED_PG_RESTORE)
    fake.chmod(0o755)
    marker = tmp_path / "shell-ran"
    store = open_store(postgres_dsn())
    async with store:
        assert isinstance(store, PostgresStore)
        env = {**pg_environment(store), "MARKER": str(marker)}
    psql = shutil.which("psql")
    assert psql is not None
    with pytest.raises(FailedPrecondition, match=r"did not open its SQL with \\restrict"):
        await restore_in_one_transaction(str(fake), psql, env, tmp_path / "dump", None, "SELECT 1;", "SELECT 1;")
    assert not marker.exists()


_RESTRICTED_PG_RESTORE = """#!/bin/sh
printf -- '--\\n\\n\\\\restrict k1\\nSELECT 1;\\n\\\\unrestrict k1\\n'
"""


async def test_a_restore_cancelled_once_its_commit_is_sent_lets_the_commit_land(tmp_path: Path) -> None:
    """Killing psql after COMMIT was sent could land after the commit did, and the caller, told "not
    committed", would undo the files of a restore that went through: psql is left to finish instead."""
    fake = tmp_path / "pg_restore"
    fake.write_text(_RESTRICTED_PG_RESTORE)
    fake.chmod(0o755)
    table = f"public.cancel_probe_{os.getpid()}"
    store = open_store(postgres_dsn())
    async with store:
        assert isinstance(store, PostgresStore)
        env = pg_environment(store)
    psql = shutil.which("psql")
    assert psql is not None
    conn = await asyncpg.connect(postgres_dsn())
    try:
        await conn.execute(f"DROP TABLE IF EXISTS {table}")
        restore = asyncio.ensure_future(
            restore_in_one_transaction(
                str(fake), psql, env, tmp_path / "dump", None, f"CREATE TABLE {table} (x int);", "SELECT pg_sleep(1);"
            )
        )

        async def sleeping() -> bool:  # the statements after the dump's run: COMMIT is on its way
            query = (
                "SELECT count(*) FROM pg_stat_activity"
                " WHERE application_name = 'bastion-restore' AND query LIKE 'SELECT pg_sleep%'"
            )
            return bool(await conn.fetchval(query))

        await until("the restore to reach its last statements", sleeping)
        restore.cancel()
        with pytest.raises(asyncio.CancelledError):
            await restore
        assert await conn.fetchval(f"SELECT to_regclass('{table}') IS NOT NULL")  # committed
    finally:
        await conn.execute(f"DROP TABLE IF EXISTS {table}")
        await conn.close()


def test_the_restores_own_version_check_failing_is_data_loss() -> None:
    stderr = f"psql:<stdin>:9: ERROR:  {VERSION_MISMATCH} 3, the archive said 4\n".encode()
    with pytest.raises(DataLoss, match="the archive said 4"):
        _check_tool("psql", 3, stderr)
    with pytest.raises(Unavailable):
        _check_tool("psql", 2, b"psql: error: connection refused")
