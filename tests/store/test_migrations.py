"""Schema migrations (bastion/store/migrations.py) on real SQLite files.

A new database gets every migration; reopening applies none again; a later
migration list applies only what is new; a database from a newer bastion is
refused; a migration that fails leaves the database as it was.
"""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest

from bastion.exceptions import UsageError
from bastion.security.credentials import User
from bastion.store import SQLiteStore
from bastion.store.migrations import LATEST, MIGRATIONS, Migration, apply_migrations


def recorded(db: Path) -> list[tuple[int, float]]:
    with sqlite3.connect(db) as conn:
        return conn.execute("SELECT version, applied_at FROM schema_version ORDER BY version").fetchall()


def tables(db: Path) -> set[str]:
    with sqlite3.connect(db) as conn:
        return {row[0] for row in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}


def test_the_migration_list_is_numbered_from_one_without_gaps() -> None:
    assert [m.version for m in MIGRATIONS] == list(range(1, LATEST + 1))
    assert all(m.description and m.statements for m in MIGRATIONS)


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


async def test_a_database_from_a_newer_bastion_is_refused(tmp_path: Path) -> None:
    db = tmp_path / "a.db"
    async with SQLiteStore(db) as store:
        assert await store.create_user(User("ada"))
    with sqlite3.connect(db) as conn:
        conn.execute("INSERT INTO schema_version VALUES (?, 'from the future', 0)", (LATEST + 1,))
    store = SQLiteStore(db)
    with pytest.raises(UsageError, match=rf"schema version {LATEST + 1}, newer than this bastion knows \({LATEST}\)"):
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
