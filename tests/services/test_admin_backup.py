"""admin.backup / admin.backups / admin.ready and the Backups component, over a real SQLite store."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
import sqlite3
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest

from bastion import PermissionDenied, Principal, ResourceExhausted, Unavailable
from bastion.config import BackupConfig
from bastion.security.credentials import User
from bastion.services.admin import create_service
from bastion.services.backup import Backups, backup_owner
from bastion.store.archive import ArchiveInfo, archive_name, is_scheduled, list_archives
from bastion.store.backup import verify_archive
from bastion.store.sqlite import SQLiteStore
from bastion.testing import ANONYMOUS, MemoryServer

OPS = Principal("olga", frozenset({"ops"}))


def run(coro: Any) -> Any:
    async def guarded() -> Any:
        async with asyncio.timeout(20):
            return await coro

    return asyncio.run(guarded())


async def until(predicate: Callable[[], bool], timeout: float = 10.0) -> None:
    """Poll ``predicate`` (counters of a background task) until true, failing after ``timeout``."""
    async with asyncio.timeout(timeout):
        while not predicate():  # noqa: ASYNC110 - a counter, not an event, is what the component offers
            await asyncio.sleep(0.02)


async def backup_between_scheduled(backups: Backups, timeout: float = 10.0) -> ArchiveInfo:
    """An on-demand backup, taken when no scheduled one is running (they run every few ms here):
    ``backup`` refuses UNAVAILABLE while one is, as documented, and a loaded machine hits it."""
    async with asyncio.timeout(timeout):
        while True:
            try:
                return await backups.backup()
            except Unavailable as exc:
                assert "already running" in exc.message, exc
                await asyncio.sleep(0.01)


@asynccontextmanager
async def hosted(tmp_path: Path, **config: Any) -> AsyncIterator[tuple[MemoryServer, Backups, SQLiteStore]]:
    async with SQLiteStore(tmp_path / "bastion.db") as store:
        backups = Backups(
            store, data_dir=tmp_path, files_dir=tmp_path / "files", config=BackupConfig(**config), passphrase=None
        )
        await backups.start()
        try:
            async with MemoryServer([create_service(backups)]) as server:
                yield server, backups, store
        finally:
            await backups.aclose()


def test_admin_backup_returns_a_verified_archive_and_backups_lists_it(tmp_path: Path) -> None:
    async def main() -> None:
        async with hosted(tmp_path) as (server, _, store):
            await store.create_user(User("ada", frozenset(), None, 1.0))
            client = server.client()
            info = await client.admin.backup()
            assert info["name"].startswith("bastion-backup-") and info["name"].endswith(".bbk")
            assert info["backend"] == "sqlite" and info["schema_version"] == store.schema_version
            assert info["encrypted"] is False and len(info["sha256"]) == 64
            path = tmp_path / "backups" / info["name"]
            assert path.stat().st_size == info["size"]
            manifest = verify_archive(path, None)
            assert manifest.members[0].path == "db/bastion.db"
            listed = await client.admin.backups()
            assert [a["name"] for a in listed] == [info["name"]]
            stats = await client.admin.stats()
            assert stats["backups_total"] == 1 and stats["backups_failed"] == 0

    run(main())


def test_backup_methods_need_the_admin_role_and_ready_is_public(tmp_path: Path) -> None:
    async def main() -> None:
        async with hosted(tmp_path) as (server, _, _):
            with pytest.raises(PermissionDenied):
                await server.client(principal=OPS).admin.backup()
            with pytest.raises(PermissionDenied):
                await server.client(principal=OPS).admin.backups()
            assert await server.client(principal=ANONYMOUS).admin.ready() == {"ready": True, "status": "ready"}

    run(main())


def test_only_one_backup_runs_at_a_time(tmp_path: Path) -> None:
    async def main() -> None:
        async with hosted(tmp_path) as (_, backups, _):
            first = asyncio.create_task(backups.backup())
            await asyncio.sleep(0)  # let it take the lock
            assert backups.running
            with pytest.raises(Unavailable, match="already running"):
                await backups.backup()
            await first
            assert not backups.running

    run(main())


def test_scheduled_backups_run_and_keep_only_the_newest(tmp_path: Path) -> None:
    async def main() -> None:
        async with hosted(tmp_path, interval=0.05, keep=2) as (_, backups, _):
            manual = await backup_between_scheduled(backups)  # on-demand archives are never pruned
            await until(lambda: backups.stats["scheduled_total"] >= 4)
        names = sorted(p.name for p in (tmp_path / "backups").iterdir())
        scheduled = [n for n in names if is_scheduled(n)]
        assert manual.name in names
        assert 1 <= len(scheduled) <= 3  # keep=2, plus perhaps one written after the last prune
        assert backups.stats["scheduled_failed"] == 0

    run(main())


def test_a_failing_scheduled_backup_is_counted_not_fatal(tmp_path: Path) -> None:
    async def main() -> None:
        blocker = tmp_path / "not-a-dir"
        blocker.write_text("a file where the backup directory should be")
        async with hosted(tmp_path, interval=0.05, directory=str(blocker)) as (_, backups, _):
            await until(lambda: backups.stats["scheduled_failed"] >= 2)
            assert backups._task is not None and not backups._task.done()

    run(main())


def test_retention_never_deletes_fresh_backups_when_the_clock_went_back(tmp_path: Path) -> None:
    """Scheduled archives written while the clock was a year ahead sort after every archive written once it
    was set right; retention by name alone then deleted each fresh archive as soon as it was written, leaving
    only the stale ones. Archives dated in the future are left alone (and not counted) instead."""
    directory = tmp_path / "backups"
    directory.mkdir(mode=0o700)
    ahead = time.time() + 365 * 86400
    stale = [archive_name(ahead + i, scheduled=True, owner=backup_owner(tmp_path)) for i in range(3)]
    for name in stale:
        (directory / name).write_bytes(b"written while the clock was wrong")

    async def main() -> None:
        async with hosted(tmp_path, interval=0.05, keep=2) as (_, backups, _):
            await until(lambda: backups.stats["scheduled_total"] >= 4)
        fresh = [a for a in list_archives(directory) if a.name not in stale]
        assert 1 <= len(fresh) <= 3, [a.name for a in list_archives(directory)]
        verify_archive(directory / fresh[-1].name, None)
        assert sorted(p.name for p in directory.iterdir() if p.name in stale) == stale
        assert backups.stats["scheduled_failed"] == 0

    run(main())


def test_a_full_disk_fails_the_backup_with_a_clear_error_and_leaves_nothing(
    tmp_path: Path, small_filesystem: Path
) -> None:
    """The backup directory's file system fills up half way: the caller got INTERNAL ("internal error"),
    with the reason only in the server's log. Now RESOURCE_EXHAUSTED says what ran out, no partial file
    is left, and the server and its store keep serving."""
    directory = small_filesystem / "backups"

    async def main() -> None:
        async with hosted(tmp_path, directory=str(directory)) as (server, backups, store):
            data = os.urandom(3_000_000)  # incompressible: cannot fit in 1 MiB
            digest = hashlib.sha256(data).hexdigest()
            blob = tmp_path / "files" / "blobs" / digest[:2] / digest
            blob.parent.mkdir(parents=True)
            blob.write_bytes(data)
            with contextlib.closing(sqlite3.connect(tmp_path / "bastion.db")) as conn, conn:
                conn.execute(
                    "INSERT INTO files (id, owner, name, size, sha256, created_at, updated_at) VALUES (?,?,?,?,?,?,?)",
                    ("f0", "ada", "big", len(data), digest, 1.0, 1.0),
                )
            client = server.client()
            with pytest.raises(ResourceExhausted, match="space"):
                await client.admin.backup()
            assert sorted(p.name for p in directory.iterdir() if p.name != ".backup.lock") == []
            assert backups.stats["backups_failed"] == 1
            await store.create_user(User("ada", frozenset(), None, 1.0))  # the store still takes writes
            assert (await client.admin.stats())["backups_failed"] == 1

    run(main())


def test_one_backup_at_a_time_holds_across_worker_processes(tmp_path: Path) -> None:
    """With ``--workers N`` each worker has its own Backups and its own asyncio lock, so ``admin.backup`` calls
    reaching two workers ran two backups at once in one directory (documented: one at a time, whoever asked).
    Two components over one data directory stand for two workers here; the lock is now a file lock."""
    data = os.urandom(40_000_000)  # a backup that takes a while
    digest = hashlib.sha256(data).hexdigest()
    blob = tmp_path / "files" / "blobs" / digest[:2] / digest
    blob.parent.mkdir(parents=True)
    blob.write_bytes(data)

    async def main() -> None:
        async with SQLiteStore(tmp_path / "bastion.db") as store:
            with contextlib.closing(sqlite3.connect(tmp_path / "bastion.db")) as conn, conn:
                conn.execute(
                    "INSERT INTO files (id, owner, name, size, sha256, created_at, updated_at) VALUES (?,?,?,?,?,?,?)",
                    ("f0", "ada", "big", len(data), digest, 1.0, 1.0),
                )
            workers = [Backups(store, data_dir=tmp_path, files_dir=tmp_path / "files") for _ in range(2)]
            first = asyncio.create_task(workers[0].backup())
            directory = tmp_path / "backups"
            await until(lambda: directory.is_dir() and any(p.name.endswith(".partial") for p in directory.iterdir()))
            with pytest.raises(Unavailable, match="already running"):
                await workers[1].backup()
            info = await first
            assert [a.name for a in list_archives(directory)] == [info.name]
            assert (await workers[1].backup()).name != info.name  # free again once the first is done

    run(main())


def test_a_restarted_server_takes_an_overdue_scheduled_backup_without_waiting_a_whole_interval(
    tmp_path: Path,
) -> None:
    """The first scheduled backup came one interval after start: a server restarted more often than its
    interval (a nightly deploy with a daily schedule, a crash loop) never took one. The schedule now
    continues from the newest scheduled archive: overdue, it runs at once."""
    directory = tmp_path / "backups"
    directory.mkdir(mode=0o700)
    (directory / archive_name(time.time() - 7200, scheduled=True)).write_bytes(b"two hours old")

    async def main() -> None:
        async with hosted(tmp_path, interval=3600, keep=5) as (_, backups, _):
            await until(lambda: backups.stats["scheduled_total"] >= 1, timeout=15)
        assert len(list_archives(directory)) == 2

    run(main())


def test_a_fresh_scheduled_archive_puts_the_next_one_an_interval_after_it(tmp_path: Path) -> None:
    """...and not sooner: a restart right after a scheduled backup does not take another one."""
    directory = tmp_path / "backups"
    directory.mkdir(mode=0o700)
    taken = time.time() - 1
    (directory / archive_name(taken, scheduled=True, owner=backup_owner(tmp_path))).write_bytes(b"just taken")

    async def main() -> None:
        async with hosted(tmp_path, interval=3600, keep=5) as (_, backups, _):
            await until(lambda: backups.next_due is not None)
            assert backups.next_due is not None and abs(backups.next_due - (taken + 3600)) < 1
            assert backups.stats["scheduled_total"] == 0 and not backups.running

    run(main())
