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
N`` each have their own ``Backups``; ``bastion backup`` takes it too).

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
it ``…-scheduled-<owner>.bbk`` and then deletes all but the newest
``backup.keep`` scheduled archives *of that owner* (on-demand archives are
never deleted; nor are scheduled ones dated in the future -- taken while the
clock was ahead -- which would otherwise outrank, by name, every archive
taken after it was set right; a warning names them). A failure is
logged and counted (``stats``, and ``counters``, which ``bastion serve``
points at the server's counters: ``bastion_backups_total{trigger,result}``
on /metrics), never fatal; the next attempt comes at the next interval.

Owners: a backup directory may be shared by several servers (replicas, or
data directories pointing at one directory), so retention deletes only the
archives this data directory's server took. The owner is 16 random hex
digits written once to ``<data_dir>/backup-owner`` (``backup_owner``) and
put in each scheduled archive's name. It lives beside the database, not in
it, so a store restored from another's archive keeps its own owner; a data
directory *copied* to start a second server copies it too (delete the copy's
``backup-owner`` file). Scheduled archives of older versions carry no owner:
they could be anyone's, so retention never deletes them (a warning says
how many there are, to be deleted by hand); they still count for when the
next scheduled backup is due.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import fcntl
import logging
import os
import secrets
import time
from pathlib import Path

from bastion.config import BackupConfig
from bastion.durable import fsync_dir
from bastion.exceptions import FailedPrecondition, InvalidArgument, Unavailable
from bastion.store import archive
from bastion.store.backup import backup_postgres, backup_sqlite
from bastion.store.base import Store
from bastion.store.leftovers import partial_name
from bastion.store.postgres import PostgresStore
from bastion.store.sqlite import SQLiteStore

__all__ = ["LOCK_FILE", "OWNER_FILE", "Backups", "backup_owner", "hold_lock"]

log = logging.getLogger("bastion.backup")


#: In the backup directory: held (flock) by whichever process is taking a backup there.
LOCK_FILE = ".backup.lock"
#: In the data directory: the owner named in this server's scheduled archives (made once, then only read).
OWNER_FILE = "backup-owner"


class _Running(Unavailable):
    """Refused: a backup is being taken already (here, or by another worker)."""


def hold_lock(directory: Path) -> int | None:
    """Take the backup directory's lock: its file descriptor (closing it lets go), or None if another
    process holds it. ``bastion backup`` takes it too."""
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


def backup_owner(data_dir: Path) -> str:
    """The owner of the scheduled archives of the server on ``data_dir``: read from its ``backup-owner``
    file, which is made (16 random hex digits, 0600) the first time. Two processes making it at once
    agree: each links a finished temporary into place, and the second link fails."""
    path = data_dir / OWNER_FILE
    try:
        if not os.path.lexists(path):
            _make_owner(path)
        text = path.read_text(encoding="ascii", errors="replace").strip()
    except OSError as exc:
        raise FailedPrecondition(f"cannot read or make the backup owner file {path}: {exc.strerror}") from exc
    if not archive.OWNER.fullmatch(text):
        raise FailedPrecondition(
            f"{path} does not hold a backup owner (16 hex digits): delete it to make a new one (the scheduled "
            "archives named with the old one are then left alone by retention: delete them by hand)"
        )
    return text


def _make_owner(path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    tmp = path.with_name(partial_name(path.name))
    with contextlib.suppress(FileNotFoundError):
        os.unlink(tmp)  # left by a process of ours that was killed
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
    try:
        with os.fdopen(fd, "w") as f:
            f.write(secrets.token_hex(8) + "\n")
            f.flush()
            os.fsync(f.fileno())
        with contextlib.suppress(FileExistsError):  # another process made it first: that one stands
            os.link(tmp, path)
    finally:
        os.unlink(tmp)
    fsync_dir(path.parent)


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
        self._owner: str | None = None  # read from the data directory at the first scheduled backup
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
                held = await asyncio.to_thread(hold_lock, self.directory)
                if held is None:
                    raise _Running("a backup is already running (in another worker); try again when it has finished")
                if scheduled and self._owner is None:
                    self._owner = await asyncio.to_thread(backup_owner, self.data_dir)
                name = archive.archive_name(time.time(), scheduled=scheduled, owner=self._owner if scheduled else None)
                log.info("%s backup %s started", trigger.replace("_", "-"), name)
                started = time.monotonic()
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
            log.info(
                "backup %s written: %d bytes, %s members, in %.1f s",
                info.name, info.size, info.members, time.monotonic() - started,
            )  # fmt: skip
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
        ahead = [a.name for a in self.list() if a.owner is not None and a.owner == self._owner and a.created_at > now]
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
        ours = [a for a in self.list() if archive.is_scheduled(a.name) and a.owner in (None, self._owner)]
        unowned = sum(1 for a in ours if a.owner is None)
        if unowned:
            log.warning(
                "backup retention: %d scheduled archives in %s were taken by an older bastion (no owner in their "
                "names) and could be another server's, so they are never deleted: delete them by hand when not "
                "needed", unowned, self.directory,
            )  # fmt: skip
        taken = [a.created_at for a in ours]
        newest = max(taken, default=now - interval)
        return interval if newest > now else max(0.0, newest + interval - now)

    async def _schedule(self) -> None:
        try:
            self._owner = await asyncio.to_thread(backup_owner, self.data_dir)
            delay = await asyncio.to_thread(self._first_delay)
        except OSError as exc:
            log.warning("cannot list the backup directory %s: %s", self.directory, exc.strerror or exc)
            delay = self.config.interval
        except FailedPrecondition as exc:  # names what could not be read, and why
            log.warning("backup schedule: %s", exc)
            delay = self.config.interval
        while True:
            self.next_due = time.time() + delay
            await asyncio.sleep(delay)
            delay = self.config.interval
            try:
                await self.backup(scheduled=True)
                self.stats["scheduled_total"] += 1
                owner = self._owner
                assert owner is not None  # set by the scheduled backup just taken
                removed = await asyncio.to_thread(
                    archive.prune_scheduled, self.directory, self.config.keep, owner=owner
                )
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
