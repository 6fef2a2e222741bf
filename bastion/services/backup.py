"""Backups of a running server: on demand (``admin.backup``) and on a schedule.

Theory of operation
-------------------

``Backups`` is a component: ``bastion serve`` starts it once the store is
open and closes it before the store closes. It owns the backup directory
(``backup.directory``, default ``<data_dir>/backups``, mode 0700) and one
lock, so at most one backup runs at a time, whoever asked: a call to
``backup()`` while another runs is refused with ``Unavailable`` rather than
queued. The lock is an asyncio lock within the process and an ``flock`` on
``<directory>/.backup.lock`` across processes (the workers of ``--workers
N`` each have their own ``Backups``).

The archive itself is made by ``bastion.store.backup`` (in the format of
``bastion.store.archive``): for SQLite in a worker thread (the online backup
API, never through the store's writer), for PostgreSQL with ``pg_dump`` in a
snapshot exported by a repeatable-read transaction on a connection from the
store's pool (held for the length of the dump; the blobs to archive are
listed in that same snapshot). Archives are written 0600 under a temporary
name and renamed when complete, so the directory only ever holds finished
archives.

Scheduling: with ``backup.interval`` > 0, a background task takes a backup
every ``interval`` seconds (the first one ``interval`` after the newest
scheduled archive -- at once if that is overdue or there is none, so a
server restarted more often than its interval still takes them; ``interval``
after start when it is dated in the future), names
it ``…-scheduled.bbk`` and then deletes all but the newest ``backup.keep``
scheduled archives (on-demand archives are never deleted; nor are scheduled
ones dated in the future -- taken while the clock was ahead -- which would
otherwise outrank, by name, every archive taken after it was set right; a
warning names them). A failure is
logged and counted (``stats``, and ``counters``, which ``bastion serve``
points at the server's counters: ``bastion_backups_total{trigger,result}``
on /metrics), never fatal; the next attempt comes at the next interval.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import fcntl
import logging
import os
import time
from pathlib import Path

from bastion.config import BackupConfig
from bastion.exceptions import FailedPrecondition, InvalidArgument, Unavailable
from bastion.store import archive
from bastion.store.backup import backup_postgres, backup_sqlite
from bastion.store.base import Store
from bastion.store.postgres import PostgresStore
from bastion.store.sqlite import SQLiteStore

__all__ = ["Backups"]

log = logging.getLogger("bastion.backup")


#: In the backup directory: held (flock) by whichever process is taking a backup there.
LOCK_FILE = ".backup.lock"


class _Running(Unavailable):
    """Refused: a backup is being taken already (here, or by another worker)."""


def _hold(directory: Path) -> int | None:
    """Take the backup directory's lock: its file descriptor, or None if another process holds it."""
    directory.mkdir(parents=True, exist_ok=True, mode=0o700)
    fd = os.open(directory / LOCK_FILE, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        return None
    except BaseException:
        os.close(fd)
        raise
    return fd


class Backups:
    """Backups of ``store`` and the blobs under ``files_dir``.

    ``passphrase`` (from ``BASTION_BACKUP_PASSPHRASE`` or
    ``backup.passphrase_file``) encrypts every archive when given.
    """

    def __init__(
        self, store: Store, *, data_dir: Path, files_dir: Path, config: BackupConfig | None = None,
        passphrase: bytes | None = None, leader: bool = True,
    ) -> None:  # fmt: skip
        """``leader``: take the scheduled backups here (with several workers, only worker 0 does)."""
        self.store = store
        self.leader = leader
        self.data_dir = data_dir
        self.files_dir = files_dir
        self.config = config or BackupConfig()
        self.passphrase = passphrase
        self.directory = Path(self.config.directory) if self.config.directory else data_dir / "backups"
        #: Key-derivation cost (scrypt log2 n) for encrypted archives; tests lower it.
        self.scrypt_log_n = archive.DEFAULT_SCRYPT_LOG_N
        self.stats = {"backups_total": 0, "backups_failed": 0, "scheduled_total": 0, "scheduled_failed": 0}
        self.last: archive.ArchiveInfo | None = None
        #: When the next scheduled backup is due (wall clock), once the schedule has started.
        self.next_due: float | None = None
        #: Where /metrics reads its counts (``backups_<trigger>_<result>``): the server's counters, once set.
        self.counters: collections.Counter[str] = collections.Counter()
        self._lock = asyncio.Lock()
        self._task: asyncio.Task[None] | None = None
        if self.config.interval < 0 or self.config.keep < 1:
            raise InvalidArgument("backup.interval must be >= 0 and backup.keep >= 1")

    @property
    def running(self) -> bool:
        """Whether a backup is being taken right now."""
        return self._lock.locked()

    async def start(self) -> None:
        if self.leader and self.config.interval > 0 and self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._schedule(), name="bastion-backup-scheduler")

    async def aclose(self) -> None:
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    async def backup(self, *, scheduled: bool = False) -> archive.ArchiveInfo:
        """Take a backup now; the finished archive. ``Unavailable`` if one is already running."""
        if self._lock.locked():
            raise _Running("a backup is already running; try again when it has finished")
        async with self._lock:
            trigger = "scheduled" if scheduled else "on_demand"
            held: int | None = None
            try:
                held = await asyncio.to_thread(_hold, self.directory)
                if held is None:
                    raise _Running("a backup is already running (in another worker); try again when it has finished")
                name = archive.archive_name(time.time(), scheduled=scheduled)
                info = await self._take(self.directory / name)
            except _Running:
                raise
            except BaseException as exc:
                self.stats["backups_failed"] += 1
                self.counters[f"backups_{trigger}_failed"] += 1
                if isinstance(exc, OSError):  # e.g. the directory cannot be created or written: the operator's
                    raise FailedPrecondition(f"cannot write a backup into {self.directory}: {exc.strerror}") from exc
                raise
            finally:
                if held is not None:
                    os.close(held)  # lets go of the lock
            self.stats["backups_total"] += 1
            self.counters[f"backups_{trigger}_ok"] += 1
            self.last = info
            log.info("backup %s written: %d bytes, %s members", info.name, info.size, info.members)
            return info

    def list(self) -> list[archive.ArchiveInfo]:
        """The archives in the backup directory, oldest first."""
        return archive.list_archives(self.directory)

    async def _take(self, out: Path) -> archive.ArchiveInfo:
        store = self.store
        if isinstance(store, SQLiteStore):
            return await asyncio.to_thread(
                backup_sqlite, store.path, self.files_dir, out, self.passphrase, scrypt_log_n=self.scrypt_log_n
            )
        if isinstance(store, PostgresStore):
            return await backup_postgres(store, self.files_dir, out, self.passphrase, scrypt_log_n=self.scrypt_log_n)
        raise Unavailable(f"backups of {type(store).__name__} are not supported")

    def _warn_future_dated(self) -> None:
        """Retention leaves scheduled archives dated in the future alone (the clock went back): say so."""
        now = time.time()
        ahead = [a.name for a in self.list() if a.name.endswith("-scheduled.bbk") and a.created_at > now]
        if ahead:
            log.warning(
                "backup retention: %d scheduled archives are dated in the future (was the clock ahead?) and are "
                "kept until that time passes; delete them by hand if they are not needed: %s",
                len(ahead), ", ".join(ahead[:3]),
            )  # fmt: skip

    def _first_delay(self) -> float:
        """Seconds until the first scheduled backup: an interval after the newest scheduled archive, so a
        server restarted more often than its interval still takes them (at once when one is overdue, or
        there is none); a whole interval when that archive is dated in the future (the clock went back)."""
        interval, now = self.config.interval, time.time()
        taken = [a.created_at for a in self.list() if a.name.endswith("-scheduled.bbk")]
        newest = max(taken, default=now - interval)
        return interval if newest > now else max(0.0, newest + interval - now)

    async def _schedule(self) -> None:
        try:
            delay = await asyncio.to_thread(self._first_delay)
        except OSError as exc:
            log.warning("cannot list the backup directory %s: %s", self.directory, exc.strerror)
            delay = self.config.interval
        while True:
            self.next_due = time.time() + delay
            await asyncio.sleep(delay)
            delay = self.config.interval
            try:
                await self.backup(scheduled=True)
                self.stats["scheduled_total"] += 1
                removed = await asyncio.to_thread(archive.prune_scheduled, self.directory, self.config.keep)
                if removed:
                    log.info("backup retention: deleted %s", ", ".join(removed))
                await asyncio.to_thread(self._warn_future_dated)
            except asyncio.CancelledError:
                raise
            except _Running:  # an on-demand one is being written: it serves, nothing failed
                log.info("scheduled backup skipped: a backup is already running")
            except Exception as exc:
                self.stats["scheduled_failed"] += 1
                log.error("scheduled backup failed: %s", exc)
