"""Schema migrations (bastion/store/migrations.py) on real SQLite files.

A new database gets every migration; reopening applies none again; a later
migration list applies only what is new; a database from a newer bastion is
opened when its recorded compatibility allows this code (a rolling upgrade)
and refused otherwise; a migration that fails leaves the database as it was.
"""

from __future__ import annotations

import logging
import sqlite3
from pathlib import Path

import pytest

from bastion.exceptions import UsageError
from bastion.security.credentials import User
from bastion.store import SQLiteStore
from bastion.store.migrations import LATEST, MIGRATIONS, Migration, apply_migrations, compatible_from
from bastion.store.postgres import POSTGRES_MIGRATIONS


def recorded(db: Path) -> list[tuple[int, float]]:
    with sqlite3.connect(db) as conn:
        return conn.execute("SELECT version, applied_at FROM schema_version ORDER BY version").fetchall()


def tables(db: Path) -> set[str]:
    with sqlite3.connect(db) as conn:
        return {row[0] for row in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}


def test_the_migration_list_is_numbered_from_one_without_gaps() -> None:
    assert [m.version for m in MIGRATIONS] == list(range(1, LATEST + 1))
    assert all(m.description for m in MIGRATIONS)
    # A SQLite migration may be empty only to keep in step with one PostgreSQL needs (9: collations).
    assert all(m.statements or pg.statements for m, pg in zip(MIGRATIONS, POSTGRES_MIGRATIONS, strict=True))


async def test_a_new_database_gets_the_latest_schema(tmp_path: Path) -> None:
    db = tmp_path / "a.db"
    async with SQLiteStore(db) as store:
        assert store.schema_version == LATEST
    assert [v for v, _ in recorded(db)] == list(range(1, LATEST + 1))
    assert {"users", "tokens", "lockouts", "schema_version"} <= tables(db)


async def test_reopening_applies_nothing_again(tmp_path: Path) -> None:
    db = tmp_path / "a.db"
    async with SQLiteStore(db) as store:
        assert await store.create_user(User("ada"))
    first = recorded(db)
    for _ in range(2):
        async with SQLiteStore(db) as store:
            assert store.schema_version == LATEST
            assert await store.get_user("ada") == User("ada")
    assert recorded(db) == first  # same rows, same applied_at


async def test_a_new_migration_is_applied_to_an_old_database_keeping_its_data(tmp_path: Path) -> None:
    db = tmp_path / "a.db"
    async with SQLiteStore(db) as store:
        assert await store.create_user(User("ada"))
    later = Migration(LATEST + 1, "notes", ("CREATE TABLE notes (id INTEGER PRIMARY KEY, body TEXT)",))
    async with SQLiteStore(db, migrations=(*MIGRATIONS, later)) as store:
        assert store.schema_version == LATEST + 1
        assert await store.get_user("ada") == User("ada")
    assert [v for v, _ in recorded(db)] == list(range(1, LATEST + 2))
    assert "notes" in tables(db)


def compat(db: Path) -> int | None:
    with sqlite3.connect(db) as conn:
        row = conn.execute("SELECT min_version FROM schema_compat").fetchone()
        return None if row is None else int(row[0])


#: A later schema: one more table (additive, so the code before it still works) ...
NOTES = Migration(LATEST + 1, "notes", ("CREATE TABLE notes (id INTEGER PRIMARY KEY, body TEXT)",), compatible=True)


def breaking(version: int) -> Migration:
    """... and one that code before it must not use (a dropped column, say)."""
    return Migration(version, "tokens lose their label", ("ALTER TABLE tokens DROP COLUMN label",))


def test_compatibility_is_the_last_incompatible_migration() -> None:
    def m(version: int, compatible: bool) -> Migration:
        return Migration(version, f"v{version}", ("SELECT 1",), compatible=compatible)

    chain = (m(1, True), m(2, True), m(3, False), m(4, True), m(5, True))
    assert [compatible_from(chain, v) for v in range(1, 6)] == [1, 1, 3, 3, 3]  # the first migration counts as one
    assert [m.compatible for m in MIGRATIONS] == [False] + [True] * (LATEST - 1)  # so far only new tables
    assert compatible_from(MIGRATIONS, LATEST) == 1


async def test_a_new_database_records_the_oldest_code_that_may_use_it(tmp_path: Path) -> None:
    db = tmp_path / "a.db"
    async with SQLiteStore(db):
        pass
    assert compat(db) == 1
    async with SQLiteStore(db, migrations=(*MIGRATIONS, NOTES)):
        pass
    assert compat(db) == 1  # still: notes only adds a table
    async with SQLiteStore(db, migrations=(*MIGRATIONS, NOTES, breaking(LATEST + 2))):
        pass
    assert compat(db) == LATEST + 2


async def test_a_database_migrated_before_compatibility_was_recorded_gets_the_record(tmp_path: Path) -> None:
    db = tmp_path / "a.db"
    async with SQLiteStore(db, migrations=MIGRATIONS[:5]) as store:  # bastion before migration 6
        assert store.schema_version == 5
        assert await store.create_user(User("ada"))
    assert "schema_compat" not in tables(db)
    async with SQLiteStore(db) as store:
        assert store.schema_version == LATEST
        assert await store.get_user("ada") == User("ada")
    assert compat(db) == 1


async def test_a_newer_compatible_database_is_used_by_older_code_with_a_warning(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    db = tmp_path / "a.db"
    async with SQLiteStore(db, migrations=(*MIGRATIONS, NOTES)) as new:  # replica N+1 migrates first
        assert await new.create_user(User("ada"))
    before = recorded(db)
    with caplog.at_level(logging.WARNING, logger="bastion.store"):
        async with SQLiteStore(db) as old:  # replica N (re)starts on the N+1 schema
            assert old.schema_version == LATEST + 1
            assert await old.get_user("ada") == User("ada")
            assert await old.create_user(User("bob"))
    [warning] = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert f"has schema version {LATEST + 1}, newer than this bastion knows ({LATEST})" in warning.getMessage()
    assert "code of schema version 1 and later compatible" in warning.getMessage()
    assert recorded(db) == before  # the old code migrated nothing, recorded nothing
    assert compat(db) == 1
    async with SQLiteStore(db, migrations=(*MIGRATIONS, NOTES)) as new:
        assert await new.get_user("bob") == User("bob")


async def test_a_newer_incompatible_database_is_refused(tmp_path: Path) -> None:
    db = tmp_path / "a.db"
    async with SQLiteStore(db) as store:
        assert await store.create_user(User("ada"))
    async with SQLiteStore(db, migrations=(*MIGRATIONS, breaking(LATEST + 1))) as store:
        assert store.schema_version == LATEST + 1
    assert compat(db) == LATEST + 1
    store = SQLiteStore(db)
    with pytest.raises(
        UsageError,
        match=rf"schema version {LATEST + 1}, newer than this bastion knows \({LATEST}\) "
        rf"and needs code of schema version {LATEST + 1} or later; upgrade bastion",
    ):
        await store.open()
    with pytest.raises(UsageError):
        await store.get_user("ada")  # it did not half-open
    assert [v for v, _ in recorded(db)][-1] == LATEST + 1  # and left the file alone
    assert compat(db) == LATEST + 1


async def test_a_newer_database_without_a_compatibility_record_is_refused(tmp_path: Path) -> None:
    db = tmp_path / "a.db"
    async with SQLiteStore(db) as store:
        assert await store.create_user(User("ada"))
    with sqlite3.connect(db) as conn:  # as a bastion that does not record compatibility leaves it
        conn.execute("INSERT INTO schema_version VALUES (?, 'from the future', 0)", (LATEST + 1,))
        conn.execute("DELETE FROM schema_compat")
    store = SQLiteStore(db)
    with pytest.raises(UsageError, match=rf"schema version {LATEST + 1}, newer than this bastion knows \({LATEST}\);"):
        await store.open()
    with pytest.raises(UsageError):
        await store.get_user("ada")  # it did not half-open
    assert [v for v, _ in recorded(db)][-1] == LATEST + 1  # and left the file alone


async def test_a_failing_migration_leaves_the_database_as_it_was(tmp_path: Path) -> None:
    db = tmp_path / "a.db"
    async with SQLiteStore(db):
        pass
    broken = Migration(LATEST + 1, "broken", ("CREATE TABLE half (x INTEGER)", "THIS IS NOT SQL"))
    with pytest.raises(UsageError, match="cannot open store"):
        await SQLiteStore(db, migrations=(*MIGRATIONS, broken)).open()
    assert [v for v, _ in recorded(db)] == list(range(1, LATEST + 1))
    assert "half" not in tables(db)
    async with SQLiteStore(db) as store:
        assert store.schema_version == LATEST


def test_migrations_out_of_order_are_refused(tmp_path: Path) -> None:
    conn = sqlite3.connect(tmp_path / "a.db", isolation_level=None)
    try:
        with pytest.raises(UsageError, match="numbered"):
            apply_migrations(conn, (MIGRATIONS[0], Migration(3, "gap", ("SELECT 1",))))
    finally:
        conn.close()
