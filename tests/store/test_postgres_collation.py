"""Text ordering on PostgreSQL does not depend on the database's collation.

Listings and keyset pages (``files.list``, ``jobs.list``, shares, uploads)
must come out in code-point order -- SQLite's -- even in a database created
with a linguistic collation, where ``'a' < 'B'`` and ``'_' `` sorts first.
Each test here creates such a database (an ICU ``en-US`` one, or libc's
``en_US.utf8`` when the server lacks ICU) on the server of
``BASTION_TEST_POSTGRES_DSN`` and drops it afterwards; they skip when the
server offers neither.
"""

from __future__ import annotations

import hashlib
import secrets
import urllib.parse
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import asyncpg
import pytest

from bastion.security.credentials import User
from bastion.store import PostgresStore, Store, backup
from bastion.store.files import FileShare, UploadRecord
from bastion.store.jobs import JobRecord
from bastion.store.postgres import LATEST, POSTGRES_MIGRATIONS
from bastion.store.sqlite import SQLiteStore
from tests.support.stores import postgres_dsn, run_sync, with_search_path

#: The schema version before the one that set COLLATE "C" (9).
BEFORE = 8

BLOB = b"x"
SHA = hashlib.sha256(BLOB).hexdigest()
T0 = 1_000_000.0
#: Owners, names and ids whose code-point order differs from a linguistic one (case, '_', accents).
OWNERS = ["ada", "Bob", "_ops"]
NAMES = ["b", "B", "a", "A", "_x", "é", "e", "Z", "z1", "Z1"]
GRANTEES = ["bob", "Carl", "_x", "alice"]
JOB_IDS = ["a1", "B1", "_1", "A2", "b2"]


async def _admin(dsn: str, *statements: str) -> list[Any]:
    conn = await asyncpg.connect(dsn, timeout=10)
    try:
        rows: list[Any] = []
        for statement in statements:
            rows = list(await conn.fetch(statement))
        return rows
    finally:
        await conn.close()


def _with_database(dsn: str, database: str) -> str:
    parts = urllib.parse.urlsplit(dsn)
    return urllib.parse.urlunsplit(parts._replace(path=f"/{database}"))


@pytest.fixture
def linguistic_dsn() -> Iterator[str]:
    """A new database whose default collation is a linguistic English one; dropped after the test."""
    dsn = postgres_dsn()
    name = f"bt_collate_{secrets.token_hex(4)}"
    version = run_sync(lambda: _admin(dsn, "SHOW server_version_num"))[0][0]
    icu = run_sync(lambda: _admin(dsn, "SELECT collname FROM pg_collation WHERE collname = 'en-US-x-icu'"))
    libc = run_sync(lambda: _admin(dsn, "SELECT collname FROM pg_collation WHERE collname = 'en_US.utf8'"))
    base = f"CREATE DATABASE \"{name}\" TEMPLATE template0 ENCODING 'UTF8'"
    if icu and int(version) >= 150000:
        create = f"{base} LOCALE 'C.UTF-8' LOCALE_PROVIDER icu ICU_LOCALE 'en-US'"
    elif libc:
        create = f"{base} LC_COLLATE 'en_US.utf8' LC_CTYPE 'en_US.utf8'"
    else:
        pytest.skip("the PostgreSQL server has neither ICU collations nor en_US.utf8")
    run_sync(lambda: _admin(dsn, create))
    try:
        yield _with_database(dsn, name)
    finally:
        run_sync(lambda: _admin(dsn, f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))


async def fill(store: Store) -> None:
    """Files of several owners, shares, uploads with equal times and jobs, all with order-sensitive names."""
    n = 0
    for owner in OWNERS:
        await store.create_user(User(owner))  # uploads need their owners' rows, once the store keeps users
        for name in NAMES:
            n += 1
            upload = UploadRecord(f"u{n}", owner, owner, name, 1, SHA, None, False, T0, T0)
            await store.files_begin_upload(upload, quota=10**9)
            assert await store.files_pin_blob(SHA, 1, T0)
            await store.files_commit_upload(upload.id, f"f{n}", T0)
    for grantee in GRANTEES:
        await store.create_user(User(grantee))  # migration 18 drops the shares to names no user holds
        await store.files_share(FileShare("f1", "user", grantee, "read", T0))
    for name in ["p", "Q", "_r", "q"]:  # same created_at: ordered by id
        await store.files_begin_upload(
            UploadRecord(f"u-{name}", "ada", "ada", f"up{name}", 1, SHA, None, False, T0, T0), 10**9
        )
    for job_id in JOB_IDS:
        assert await store.jobs_submit(JobRecord(job_id, "ada", "echo", b"\x90", created_at=T0))


async def orders(store: Store) -> dict[str, list[Any]]:
    """What the store lists, paging two at a time where it pages (each page after the last key seen)."""
    files: list[tuple[str, str]] = []
    after: tuple[str, str] | None = None
    while page := await store.files_list(viewer=None, after=after, limit=2):
        files += [(f.owner, f.name) for f in page]
        after = files[-1]
    jobs: list[str] = []
    last: str | None = None
    while batch := await store.jobs_list(limit=2, after=last):
        jobs += [j.id for j in batch]
        last = jobs[-1]
    return {
        "files": files,
        "own": [f.name for f in await store.files_list(viewer="ada", owner="ada", limit=100)],
        "shares": [s.grantee for s in await store.files_shares("f1")],
        "uploads": [u.id for u in await store.files_list_uploads(None)],
        "jobs": jobs,
        "jobs after 'a'": [j.id for j in await store.jobs_list(after="a", limit=100)],
    }


#: This code's uploads read and write the column migration 19 added, and read the table migration 21 added; at
#: version 8 the tests add them for the time they write (the rows are the same as an older server's) and drop
#: them before migrating.
GUARD_SCHEMA = (
    (
        "ALTER TABLE file_uploads ADD COLUMN expected_sha256 TEXT",
        "CREATE TABLE file_counts (owner TEXT PRIMARY KEY, files BIGINT NOT NULL)",
    ),
    ("ALTER TABLE file_uploads DROP COLUMN expected_sha256", "DROP TABLE file_counts"),
)


def code_point_orders() -> dict[str, list[Any]]:
    return {
        "files": sorted((o, n) for o in OWNERS for n in NAMES),
        "own": sorted(NAMES),
        "shares": sorted(GRANTEES),
        "uploads": sorted(["u-p", "u-Q", "u-_r", "u-q"]),
        "jobs": sorted(JOB_IDS),
        "jobs after 'a'": sorted(j for j in JOB_IDS if j > "a"),
    }


async def test_the_premise_the_database_sorts_linguistically(linguistic_dsn: str) -> None:
    rows = await _admin(linguistic_dsn, "SELECT 'a' < 'B' AS ab, '_x' < 'A' AS ux")
    assert (rows[0]["ab"], rows[0]["ux"]) == (True, True)  # in code-point order both are false


async def test_listings_and_pages_are_in_code_point_order_as_on_sqlite(linguistic_dsn: str, tmp_path: Path) -> None:
    async with SQLiteStore(tmp_path / "bastion.db") as lite:
        await fill(lite)
        expected = await orders(lite)
    assert expected == code_point_orders()
    async with PostgresStore(linguistic_dsn) as store:
        assert store.schema_version == LATEST
        await fill(store)
        assert await orders(store) == expected


async def test_a_database_at_the_previous_version_is_migrated_to_code_point_order(linguistic_dsn: str) -> None:
    previous = POSTGRES_MIGRATIONS[:BEFORE]
    async with PostgresStore(linguistic_dsn, migrations=previous) as store:
        assert store.schema_version == BEFORE
        await _admin(linguistic_dsn, *GUARD_SCHEMA[0])
        await fill(store)
        before = await orders(store)
    await _admin(linguistic_dsn, *GUARD_SCHEMA[1])
    assert before["files"] != code_point_orders()["files"]  # the defect the migration mends
    async with PostgresStore(linguistic_dsn) as store:
        assert store.schema_version == LATEST
        assert await orders(store) == code_point_orders()
    columns = await _admin(
        linguistic_dsn,
        "SELECT table_name || '.' || column_name AS c FROM information_schema.columns "
        "WHERE table_schema = 'public' AND data_type = 'text' AND collation_name IS DISTINCT FROM 'C' "
        "AND (table_name, column_name) IN (('files', 'owner'), ('files', 'name'), ('file_shares', 'grantee'), "
        "('file_uploads', 'id'), ('jobs', 'id'))",
    )
    assert [row["c"] for row in columns] == []


async def test_an_archive_at_the_previous_version_restores_and_is_migrated_on_open(
    linguistic_dsn: str, tmp_path: Path
) -> None:
    dsn = with_search_path(linguistic_dsn, "old")
    await _admin(linguistic_dsn, 'CREATE SCHEMA "old"')
    async with PostgresStore(dsn, migrations=POSTGRES_MIGRATIONS[:BEFORE]) as store:
        await _admin(dsn, *GUARD_SCHEMA[0])
        await fill(store)
    await _admin(dsn, *GUARD_SCHEMA[1])
    blob = tmp_path / "files" / "blobs" / SHA[:2] / SHA
    blob.parent.mkdir(parents=True)
    blob.write_bytes(BLOB)
    out = tmp_path / "old.bbk"
    info = await backup.backup_postgres(dsn, tmp_path / "files", out, None)
    assert info.schema_version == BEFORE
    await _admin(linguistic_dsn, 'DROP SCHEMA "old" CASCADE')

    result = await backup.restore_postgres(out, dsn, tmp_path / "restored", None)
    assert result.manifest.schema_version == BEFORE
    async with PostgresStore(dsn) as store:
        assert store.schema_version == LATEST
        assert await orders(store) == code_point_orders()
