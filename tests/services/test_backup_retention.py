"""Retention in a backup directory several servers share (bastion/services/backup.py, bastion/store/archive.py):
real SQLite stores in their own data directories, real scheduled backups into one directory."""

from __future__ import annotations

import asyncio
import contextlib
import sqlite3
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from bastion.config import BackupConfig
from bastion.security.credentials import User
from bastion.services.backup import OWNER_FILE, Backups, backup_owner
from bastion.store.archive import archive_name, list_archives
from bastion.store.backup import restore_sqlite
from bastion.store.sqlite import SQLiteStore


def run(coro: Any) -> Any:
    async def guarded() -> Any:
        async with asyncio.timeout(30):
            return await coro

    return asyncio.run(guarded())


async def until(predicate: Callable[[], bool], timeout: float = 15.0) -> None:
    async with asyncio.timeout(timeout):
        while not predicate():  # noqa: ASYNC110 - a counter, not an event, is what the component offers
            await asyncio.sleep(0.02)


async def schedule(data_dir: Path, shared: Path, user: str, backups_taken: int) -> None:
    """A server on ``data_dir`` (its store holding ``user``) taking scheduled backups into ``shared``."""
    async with SQLiteStore(data_dir / "bastion.db") as store:
        with contextlib.suppress(Exception):
            await store.create_user(User(user, frozenset(), None, 1.0))
        config = BackupConfig(directory=str(shared), interval=0.02, keep=2)
        backups = Backups(store, data_dir=data_dir, files_dir=data_dir / "files", config=config)
        await backups.start()
        try:
            await until(lambda: backups.stats["scheduled_total"] >= backups_taken)
        finally:
            await backups.aclose()
        assert backups.stats["scheduled_failed"] == 0


def users_of(archive: Path, scratch: Path) -> list[str]:
    """The users in the store ``archive`` holds (restored into a directory of its own)."""
    restore_sqlite(archive, scratch / "bastion.db", scratch / "files", None)
    with contextlib.closing(sqlite3.connect(scratch / "bastion.db")) as conn:
        return [row[0] for row in conn.execute("SELECT name FROM users ORDER BY name")]


def test_retention_in_a_shared_directory_deletes_only_its_own_servers_archives(tmp_path: Path) -> None:
    """Two data directories pointing their backups at one directory: retention counted and deleted every
    scheduled archive there, so the second server's schedule deleted all of the first one's backups. Each
    now deletes only the archives it named with its own owner."""
    shared = tmp_path / "shared-backups"
    run(schedule(tmp_path / "a", shared, "alice", 4))
    run(schedule(tmp_path / "b", shared, "bob", 4))
    kept = [a.name for a in list_archives(shared)]
    holders = {name: users_of(shared / name, tmp_path / f"restored-{i}") for i, name in enumerate(kept)}
    alice = [n for n, users in holders.items() if users == ["alice"]]
    bob = [n for n, users in holders.items() if users == ["bob"]]
    assert 2 <= len(alice) <= 3 and 2 <= len(bob) <= 3, holders  # keep=2 each (+1 written after the last prune)
    assert len(alice) + len(bob) == len(kept)
    owner_a, owner_b = backup_owner(tmp_path / "a"), backup_owner(tmp_path / "b")
    assert owner_a != owner_b
    assert all(name.endswith(f"-scheduled-{owner_a}.bbk") for name in alice)
    assert all(name.endswith(f"-scheduled-{owner_b}.bbk") for name in bob)


def test_archives_of_older_versions_without_an_owner_are_never_deleted(tmp_path: Path) -> None:
    """A scheduled archive named before owners existed could be another server's: retention leaves it."""
    shared = tmp_path / "shared-backups"
    shared.mkdir(mode=0o700)
    legacy = archive_name(time.time() - 86400, scheduled=True)
    (shared / legacy).write_bytes(b"written by an older bastion")
    run(schedule(tmp_path / "a", shared, "alice", 4))
    names = [a.name for a in list_archives(shared)]
    assert legacy in names
    assert 3 <= len(names) <= 4


def test_the_owner_is_made_once_and_kept(tmp_path: Path) -> None:
    first = backup_owner(tmp_path)
    assert backup_owner(tmp_path) == first
    assert (tmp_path / OWNER_FILE).stat().st_mode & 0o777 == 0o600
    assert [p.name for p in tmp_path.iterdir()] == [OWNER_FILE]  # no temporary left behind
