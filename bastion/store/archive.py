"""The ``.bbk`` backup archive format: write one, read it back checking every byte.

This module knows nothing of databases: it frames, seals and checks a tar
stream of members that ``bastion.store.backup`` gathers (a database copy or
dump, and blobs) and hands back, extracted into a staging directory, only
what passes every check.

Theory of operation
-------------------

An archive is one file. Inside, a tar stream holds ``manifest.json`` first,
then the members it lists, each with its size and SHA-256:

* ``db/bastion.db`` (a SQLite store) or ``db/postgres.dump`` (a PostgreSQL
  schema, ``pg_dump --format=custom``) -- exactly one of them, as the
  manifest's ``backend`` says;
* ``files/blobs/<sha[:2]>/<sha>`` -- file contents, each named by its own
  SHA-256 (the manifest's ``blobs`` says whether these are the blobs the
  snapshot refers to or every blob found).

The tar stream is compressed (zlib), cut into chunks and framed so that
*every byte of the file* is checked, and sealed with a passphrase's key when
there is one: bastion/store/archive_framing.py.

Writing goes to a new 0600 temporary beside the target (``.<name>.<host>-<pid>.partial``,
removed by the next backup there if this process is killed; never through a
file or symlink already there), fsynced and linked into place at the end --
never over an existing file -- so a directory of archives only ever holds
finished ones;
each member's size and SHA-256 are checked as it is copied in. Reading
(``read_archive``) never trusts the archive before it has read all of it:
members are extracted into a staging directory (only the paths a manifest
may name, regular files only, sizes and hashes checked as they are
written) and the framing is read to its authenticated last chunk. Checking
what a member holds (a database's own integrity) is the caller's part.
Reading is in bastion/store/archive_read.py.
"""

from __future__ import annotations

import calendar
import contextlib
import errno
import hashlib
import io
import logging
import os
import re
import stat
import tarfile
import time
from pathlib import Path
from typing import IO, Any

import msgspec

from bastion._version import __version__
from bastion.durable import fsync_dir
from bastion.exceptions import DataLoss, FailedPrecondition, ResourceExhausted, Unavailable
from bastion.store.archive_framing import (  # noqa: F401 - CHUNK_SIZE: named here before the framing moved out
    _FLAG_ENCRYPTED,
    _HEADER,
    CHUNK_SIZE,
    FORMAT_VERSION,
    MAGIC,
    _FramedWriter,
)
from bastion.store.backup_progress import Meter, Progress
from bastion.store.leftovers import partial_name, remove_stale

__all__ = [
    "ARCHIVE_SUFFIX",
    "OWNER",
    "ArchiveInfo",
    "Manifest",
    "Member",
    "archive_name",
    "is_scheduled",
    "list_archives",
    "prune_scheduled",
    "refuse_existing",
    "write_archive",
]

log = logging.getLogger("bastion.backup")

FORMAT = "bastion-backup"
ARCHIVE_SUFFIX = ".bbk"
DEFAULT_SCRYPT_LOG_N = 17  # 128 MiB, ~0.5 s: the cost of one passphrase guess
MANIFEST = "manifest.json"
SQLITE_MEMBER = "db/bastion.db"
POSTGRES_MEMBER = "db/postgres.dump"
MAX_MANIFEST = 256 * 1024 * 1024
MAX_EXTENDED_HEADER = 64 * 1024  # a pax header bastion writes holds a size or a path: well under 1 KiB
FILE_MODE = 0o600
_FULL = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)  # the disk, a quota, or a file size limit ran out

#: The path of a blob in an archive: files/blobs/<sha[:2]>/<sha>.
BLOB_PATH = re.compile(r"files/blobs/([0-9a-f]{2})/([0-9a-f]{64})")
#: Who took a scheduled archive: 16 hex digits, made once per data directory (``services.backup.backup_owner``).
OWNER = re.compile(r"[0-9a-f]{16}")
_NAME = re.compile(r"bastion-backup-(\d{8}T\d{6}\.\d{6}Z)(-scheduled(?:-([0-9a-f]{16}))?)?" + re.escape(ARCHIVE_SUFFIX))


# -- records ------------------------------------------------------------------------------------


class Member(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """One archived file: its path in the archive, size in bytes and SHA-256 (hex)."""

    path: str
    size: int
    sha256: str


class Manifest(msgspec.Struct, frozen=True):
    """What an archive holds. ``blobs`` is "referenced" (the blobs the snapshot's
    files table names) or "all" (every blob found: the snapshot had no such table)."""

    format: str
    format_version: int
    bastion_version: str
    schema_version: int
    backend: str  # "sqlite" or "postgresql"
    created_at: float
    blobs: str
    members: list[Member]
    schema: str | None = None  # PostgreSQL: the schema dumped


class ArchiveInfo(msgspec.Struct, frozen=True):
    """A finished archive (``admin.backup``'s answer and ``admin.backups``' rows)."""

    name: str
    size: int
    sha256: str
    encrypted: bool
    created_at: float
    backend: str | None = None
    schema_version: int | None = None
    members: int | None = None
    blobs: int | None = None
    content_bytes: int | None = None  # sum of the member sizes (before compression)
    owner: str | None = None  # a scheduled archive: the owner its name carries (None: none, or an older one)


def archive_name(at: float, *, scheduled: bool = False, owner: str | None = None) -> str:
    """``bastion-backup-<UTC time to the microsecond>[-scheduled[-<owner>]].bbk``: names sort by time.

    Retention deletes only scheduled archives whose name carries its own ``owner``: a backup directory
    may be shared by several servers. (Scheduled names without an owner are those of older versions.)
    """
    if owner is not None and (not scheduled or not OWNER.fullmatch(owner)):
        raise ValueError(f"an owner is 16 hex digits, on scheduled archives only: {owner!r}")
    stamp = time.strftime("%Y%m%dT%H%M%S", time.gmtime(at)) + f".{int(at % 1 * 1e6):06d}Z"
    kind = ("-scheduled" if scheduled else "") + (f"-{owner}" if owner else "")
    return f"bastion-backup-{stamp}{kind}{ARCHIVE_SUFFIX}"


def is_scheduled(name: str) -> bool:
    """Whether ``name`` is that of a scheduled archive (whoever's, with an owner or without)."""
    match = _NAME.fullmatch(name)
    return match is not None and match[2] is not None


# -- writing ----------------------------------------------------------------------------------------


def write_archive(
    out_path: Path,
    *,
    backend: str,
    schema_version: int,
    created_at: float,
    db_member: tuple[str, Path],
    blobs: tuple[list[tuple[str, Path]], str],
    passphrase: bytes | None,
    schema: str | None = None,
    scrypt_log_n: int = DEFAULT_SCRYPT_LOG_N,
    progress: Progress | None = None,
) -> ArchiveInfo:
    """Write the archive to ``out_path`` (via a 0600 temporary beside it, renamed at the end).

    Blob sizes come from the file system and their hashes from their names;
    both are checked while the blob is copied in, so a damaged blob fails
    the backup instead of being archived. ``progress`` hears the ``archive``
    phase (bastion/store/backup_progress.py): the members' bytes as they go in.
    """
    members = [_member(db_member[0], db_member[1])]
    for path, file in blobs[0]:
        try:
            members.append(Member(path, file.stat().st_size, file.name))
        except FileNotFoundError:
            if blobs[1] != "referenced":  # found by listing the directory a moment ago
                raise Unavailable(f"blob {file.name} vanished while the backup ran; try again") from None
            # The snapshot refers to it, and the files service keeps a blob files.blob_grace after its last
            # file goes: lost, not swept meanwhile (retrying cannot help) -- unless the snapshot is older.
            age = time.time() - created_at
            raise DataLoss(
                f"blob {file.name}, which the store's files refer to, is missing from {file.parent.parent.parent}: "
                "its contents are lost (or were moved by hand); the backup was not written -- put the blob back, "
                "or delete the files that refer to it"
                + (f" (or, the snapshot being {age:.0f} s old, it outlived files.blob_grace)" if age > 60 else "")
            ) from None
    manifest = Manifest(
        FORMAT, FORMAT_VERSION, __version__, schema_version, backend, created_at, blobs[1], members, schema
    )
    refuse_existing(out_path)
    remove_stale(out_path.parent)  # partial archives of killed backups
    tmp = out_path.with_name(partial_name(out_path.name))
    fd = _create_private(tmp)
    meter = Meter(progress, "archive", sum(m.size for m in members))
    try:
        with os.fdopen(fd, "wb") as raw:
            framed = _FramedWriter(raw, passphrase, scrypt_log_n)
            stream = _Counted(framed, meter) if progress is not None else framed
            with tarfile.open(fileobj=stream, mode="w|", format=tarfile.PAX_FORMAT) as tar:
                data = msgspec.json.encode(manifest)
                tar.addfile(_tarinfo(MANIFEST, len(data), manifest.created_at), io.BytesIO(data))
                sources = [db_member[1], *(file for _, file in blobs[0])]
                for member, source in zip(members, sources, strict=True):
                    _add_checked(tar, member, source, manifest.created_at)
            framed.finish()
            raw.flush()
            os.fsync(raw.fileno())
        _publish(tmp, out_path)
        fsync_dir(out_path.parent)
    except BaseException as exc:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        if isinstance(exc, OSError) and exc.errno in _FULL:
            raise ResourceExhausted(
                f"no space left to write the backup in {out_path.parent} ({exc.strerror}); nothing was kept"
            ) from exc
        raise
    meter.finish()
    return _info(out_path.name, framed.size, framed.digest.hexdigest(), bool(passphrase), manifest)


class _Counted(io.RawIOBase):
    """The tar stream on its way into the framing, counted (its headers too: ``Meter`` stops at the total)."""

    def __init__(self, out: _FramedWriter, meter: Meter) -> None:
        self._out = out
        self._meter = meter

    def writable(self) -> bool:
        return True

    def write(self, data: Any) -> int:
        n = self._out.write(data)
        self._meter.add(n)
        return n


def refuse_existing(out_path: Path) -> None:
    """A backup never replaces a file: an older archive, or by a slip the live database (whose server
    would go on writing into the replaced file, losing every write made after)."""
    if os.path.lexists(out_path):
        raise FailedPrecondition(f"{out_path} exists: a backup never replaces a file; name a new one")


def _create_private(path: Path) -> int:
    """A new 0600 file at ``path``, opened for writing. Whatever is there already (a temporary left by
    a crash, or a symlink planted in a shared directory) is unlinked, never written through."""
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)
    return os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, FILE_MODE)


def _publish(tmp: Path, out_path: Path) -> None:
    """Give the finished temporary its name, atomically, unless that name was taken meanwhile."""
    try:
        os.link(tmp, out_path)
    except FileExistsError:
        refuse_existing(out_path)
        raise
    except OSError:  # a file system without hard links: check, then rename
        refuse_existing(out_path)
        os.rename(tmp, out_path)
        return
    os.unlink(tmp)


def _member(path: str, file: Path) -> Member:
    digest = hashlib.sha256()
    size = 0
    with open(file, "rb") as f:
        while block := f.read(1 << 20):
            digest.update(block)
            size += len(block)
    return Member(path, size, digest.hexdigest())


def _tarinfo(name: str, size: int, mtime: float) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.size = size
    info.mode = FILE_MODE
    info.mtime = int(mtime)
    return info


class _HashingReader:
    def __init__(self, f: IO[bytes]) -> None:
        self.f = f
        self.digest = hashlib.sha256()

    def read(self, n: int = -1) -> bytes:
        data = self.f.read(n)
        self.digest.update(data)
        return data


def _add_checked(tar: tarfile.TarFile, member: Member, source: Path, mtime: float) -> None:
    try:
        f = open(source, "rb")  # noqa: SIM115 - closed below
    except FileNotFoundError:
        raise Unavailable(f"{member.path} vanished while the backup ran; try again") from None
    with f:
        reader = _HashingReader(f)
        try:
            tar.addfile(_tarinfo(member.path, member.size, mtime), reader)
        except OSError as exc:  # shorter than its size said
            raise DataLoss(f"{member.path} changed while it was archived: {exc}") from exc
    if reader.digest.hexdigest() != member.sha256:
        raise DataLoss(f"{member.path} does not match its SHA-256 (a damaged blob?); the backup was not written")


def _info(name: str, size: int, sha256: str, encrypted: bool, manifest: Manifest) -> ArchiveInfo:
    blob_count = sum(1 for m in manifest.members if m.path.startswith("files/"))
    return ArchiveInfo(
        name, size, sha256, encrypted, manifest.created_at, manifest.backend, manifest.schema_version,
        len(manifest.members), blob_count, sum(m.size for m in manifest.members),
    )  # fmt: skip


# -- a directory of archives ---------------------------------------------------------------------------


def list_archives(directory: Path) -> list[ArchiveInfo]:
    """The archives in ``directory`` by name (so by time), read from their names and headers only.

    FAILED_PRECONDITION naming the directory and the cause if it cannot be read (another user's, mode 0700):
    one archive that cannot be read is skipped, but without the directory there is no listing at all."""
    if not directory.is_dir():
        return []
    try:
        paths = sorted(directory.iterdir())
    except OSError as exc:
        raise FailedPrecondition(f"cannot list the backup directory {directory}: {exc.strerror}") from None
    out = []
    for path in paths:
        match = _NAME.fullmatch(path.name)
        if not match or (opened := _read_header(path)) is None:
            continue
        header, size = opened
        encrypted = len(header) == _HEADER.size and header.startswith(MAGIC) and bool(header[9] & _FLAG_ENCRYPTED)
        stamp = time.strptime(match[1][:15], "%Y%m%dT%H%M%S")
        created = float(calendar.timegm(stamp)) + int(match[1][16:22]) / 1e6  # the name is UTC
        out.append(ArchiveInfo(path.name, size, "", encrypted, created, owner=match[3]))
    return out


_unreadable: set[str] = set()  # archives already warned about: once each per process, not every listing


def _read_header(path: Path) -> tuple[bytes, int] | None:
    """The start of the archive at ``path`` and its size; None if it is not a regular file, or is gone, or
    cannot be read (another user's, in a shared directory: skipped with a warning, never an error that
    would fail every listing and every retention run)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)  # O_NONBLOCK: a FIFO of that name must not hang us
    except FileNotFoundError:
        return None  # deleted meanwhile (another server's retention)
    except OSError as exc:
        _skip_unreadable(path, exc)
        return None
    with os.fdopen(fd, "rb") as f:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            return None
        try:
            return f.read(_HEADER.size), info.st_size
        except OSError as exc:
            _skip_unreadable(path, exc)
            return None


def _skip_unreadable(path: Path, exc: OSError) -> None:
    if str(path) not in _unreadable:
        if len(_unreadable) >= 1000:  # a long-lived server seeing others' new archives: bounded, then warn anew
            _unreadable.clear()
        _unreadable.add(str(path))
        log.warning(
            "cannot read %s in the backup directory %s (%s): it is left out of listings and retention",
            path.name, path.parent, exc.strerror,
        )  # fmt: skip


def prune_scheduled(directory: Path, keep: int, *, owner: str, now: float | None = None) -> list[str]:
    """Delete all but the newest ``keep`` scheduled archives named with ``owner``; the names deleted.

    Only ``owner``'s archives are counted or deleted: a directory shared by several servers (replicas,
    or data directories pointing at one backup directory) holds theirs too. Scheduled archives of older
    versions, whose names carry no owner, could be anyone's and are never deleted (nor counted).

    "Newest" is read from the names, which carry the wall clock of when each
    was taken. An archive dated after ``now`` (default: the clock now) was
    taken while the clock was ahead; it is neither deleted nor counted, since
    by name it would outrank every archive taken after the clock was set
    right, and those would be deleted as soon as they were written.
    """
    now = time.time() if now is None else now
    if not OWNER.fullmatch(owner):
        raise ValueError(f"an owner is 16 hex digits: {owner!r}")
    own = [a for a in list_archives(directory) if a.owner == owner]
    dated = [directory / a.name for a in own if a.created_at <= now]
    doomed = dated[: max(0, len(dated) - keep)]
    for path in doomed:
        path.unlink(missing_ok=True)
    return [p.name for p in doomed]
