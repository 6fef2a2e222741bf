"""The files service's on-disk layer: paths and blocking I/O under the files directory.

Contents live under the files directory, outside the database:

* ``blobs/<sha256[:2]>/<sha256>`` -- immutable, content-addressed, 0600 in
  0700 directories; files with equal contents share one blob;
* ``uploads/<upload id>`` -- uploads in progress (and, for a moment while
  one is put in place over a blob of the same contents, ``<upload id>.blob``).

An upload file is written by one call at a time (an exclusive ``flock``);
chunks are appended with ``pwrite`` and fed into a running SHA-256, kept
between calls (``_Hashes``); a resumed upload whose hash this process does
not hold re-hashes the part already on disk in bounded blocks.
A finished upload is fsynced, then hard-linked into place as its blob and
the blob's directory fsynced (and ``blobs/`` too when that directory is
new), so an acknowledged upload survives a crash; its upload file goes once
the file is recorded. The directories made at start are fsynced into their
parents likewise.
Everything here blocks: the service calls it through ``_in_thread``.

The disk failing (full, read-only, not permitted, I/O error) is the
operator's to mend, not the caller's fault: ``_disk_error`` logs it and makes
it RESOURCE_EXHAUSTED (no space: gRPC's "the entire file system is out of
space") or UNAVAILABLE (try again later), never INTERNAL.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import fcntl
import hashlib
import logging
import os
import re
from collections import OrderedDict
from collections.abc import AsyncGenerator, Callable
from pathlib import Path
from typing import Any, TypeVar

from bastion.durable import fsync_dir
from bastion.exceptions import CallError, DataLoss, FailedPrecondition, ResourceExhausted, Unavailable

T = TypeVar("T")

log = logging.getLogger("bastion.files")

_HASH_BLOCK = 1024 * 1024
_UPLOAD_ID = re.compile(r"^u-[0-9a-f]{32}\Z")
#: The suffix of an upload's spare link (``_Disk.spare``).
_SPARE = ".blob"


async def _in_thread(fn: Callable[..., T], *args: Any) -> T:
    """Run blocking I/O in a thread; if the caller is cancelled, still wait for the thread,
    so no file descriptor is closed under a read or write in progress."""
    future = asyncio.get_running_loop().run_in_executor(None, fn, *args)
    try:
        return await asyncio.shield(future)
    except asyncio.CancelledError:
        with contextlib.suppress(Exception):
            await future
        raise


def _disk_error(exc: OSError, what: str, then: str = "try again later", *, writing: bool = True) -> CallError:
    """A coded error for the files directory failing under ``what`` (logged for the operator)."""
    reason = os.strerror(exc.errno).lower() if exc.errno else str(exc)
    log.error("files directory failed: %s: %s (%s)", what, reason, exc.filename)
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return ResourceExhausted(f"{what}: the server's file storage is full ({reason}); {then}")
    verb = "write" if writing else "read"
    return Unavailable(f"{what}: the server cannot {verb} its files directory ({reason}); {then}")


class _Hashes:
    """The running SHA-256 of the uploads this process last wrote, so a resumed upload need not re-read
    and re-hash all it holds: without it one tiny call (an empty stream, a byte) cost a read and a hash of
    up to a whole quota. Reused only for an upload file of exactly the length hashed; the least recently
    kept go first."""

    def __init__(self, limit: int = 4096) -> None:
        self._kept: OrderedDict[str, tuple[int, Any]] = OrderedDict()
        self._limit = limit

    async def take(self, upload_id: str, fd: int, length: int) -> Any:
        """A SHA-256 of the first ``length`` bytes of ``fd``: the one kept if it is that far, else re-read."""
        kept = self._kept.pop(upload_id, None)
        if kept is not None and kept[0] == length:
            return kept[1]
        return await _in_thread(_hash_prefix, fd, length)

    def keep(self, upload_id: str, length: int, hasher: Any) -> None:
        self._kept[upload_id] = (length, hasher)
        if len(self._kept) > self._limit:
            self._kept.popitem(last=False)


class _Disk:
    """Paths and blocking file operations under the files directory (called via ``_in_thread``)."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.blobs = directory / "blobs"
        self.uploads = directory / "uploads"

    def prepare(self) -> None:
        for path in (self.directory, self.blobs, self.uploads):
            _make_dirs(path)

    def blob(self, sha256: str) -> Path:
        return self.blobs / sha256[:2] / sha256

    def upload(self, upload_id: str) -> Path:
        return self.uploads / upload_id

    def create_upload(self, upload_id: str) -> None:
        os.close(os.open(self.upload(upload_id), os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))

    def spare(self, upload_id: str) -> Path:
        """Where ``place`` links an upload's bytes before renaming them over a blob: among the uploads, so a
        link a crash left there goes with its upload."""
        return self.uploads / f"{upload_id}{_SPARE}"

    def remove_upload(self, upload_id: str) -> None:
        for path in (self.upload(upload_id), self.spare(upload_id)):
            with contextlib.suppress(FileNotFoundError):
                path.unlink()

    def remove_blob(self, sha256: str) -> None:
        with contextlib.suppress(FileNotFoundError):
            self.blob(sha256).unlink()

    def place(self, upload_id: str, sha256: str) -> None:
        """Put a finished (fsynced, verified) upload in place as blob ``sha256``, durably.

        A hard link: the upload file stays (``remove_upload`` once the file is recorded), so a failure to
        record it loses no bytes. ``FileNotFoundError``: the upload file is gone (cancelled, expired)."""
        source, target = self.upload(upload_id), self.blob(sha256)
        if not target.parent.is_dir():
            with contextlib.suppress(FileExistsError):  # made meanwhile by another upload: sync it all the same
                target.parent.mkdir(mode=0o700)
            fsync_dir(self.blobs)  # the new directory's entry is durable before a file names a blob in it
        try:
            os.link(source, target)
        except FileExistsError:
            # These contents are there already (same SHA-256) -- or were: a blob decays in place (a flipped
            # bit, a torn write) keeping its size and name. The upload's bytes were just verified, so they
            # take the name, atomically (readers keep the file they opened): a link and a rename, where
            # checking the old copy would read it all.
            spare = self.spare(upload_id)  # not beside the blob: a crash would leave it where no sweep looks
            with contextlib.suppress(FileNotFoundError):
                os.unlink(spare)  # left by an earlier attempt that failed between its link and its rename
            try:
                os.link(source, spare)
            except OSError as exc:
                if exc.errno not in _NO_LINKS:
                    raise
                os.replace(source, target)
            else:
                try:
                    os.replace(spare, target)
                except BaseException:
                    with contextlib.suppress(OSError):
                        os.unlink(spare)
                    raise
        except OSError as exc:
            if exc.errno not in _NO_LINKS:
                raise
            os.replace(source, target)  # a file system without hard links: move it (the bytes go with it)
        fsync_dir(target.parent)

    def orphans(self, known: Callable[[str], bool], older_than: float) -> list[str]:
        """The ids of upload files (and spares) older than ``older_than`` that ``known`` does not claim.

        A file removed between the listing and its stat (a commit, a cancel) is skipped: it is no orphan."""
        out = set()
        with os.scandir(self.uploads) as entries:
            for entry in entries:
                upload_id = entry.name.removesuffix(_SPARE)
                if not _UPLOAD_ID.match(upload_id):
                    continue
                try:
                    mtime = entry.stat().st_mtime
                except FileNotFoundError:
                    continue
                if mtime < older_than and not known(upload_id):
                    out.add(upload_id)
        return sorted(out)


#: errno of a file system that has no hard links (or no more for this file): the upload is moved instead.
_NO_LINKS = (errno.EPERM, errno.EOPNOTSUPP, errno.EXDEV, errno.EMLINK)


def _make_dirs(directory: Path) -> None:
    """Make ``directory`` (0700) and its missing parents, each one's entry fsynced into its parent."""
    missing = [d for d in (directory, *directory.parents) if not d.is_dir()]
    for made in reversed(missing):  # outermost first
        with contextlib.suppress(FileExistsError):
            made.mkdir(mode=0o700 if made == directory else 0o777)
        fsync_dir(made.parent)


def _hash_prefix(fd: int, length: int) -> Any:
    """A SHA-256 of the first ``length`` bytes of ``fd``, read in bounded blocks."""
    hasher = hashlib.sha256()
    position = 0
    while position < length:
        block = os.pread(fd, min(_HASH_BLOCK, length - position), position)
        if not block:
            break
        hasher.update(block)
        position += len(block)
    return hasher


def _append(fd: int, chunk: bytes, position: int, hasher: Any) -> bool:
    """Write ``chunk`` at ``position`` and hash it; False (nothing written) if the upload file is no longer
    linked: cancelled, expired or discarded meanwhile, its reservation released -- bytes taken after that
    would fill the disk outside every quota until the call's next mark of activity."""
    if os.fstat(fd).st_nlink == 0:
        return False
    view = memoryview(chunk)
    written = 0
    while written < len(view):
        written += os.pwrite(fd, view[written:], position + written)
    hasher.update(chunk)
    return True


def _open_upload(path: Path) -> tuple[int, int]:
    """Open an upload file for writing, exclusively (another call writing it: ``FailedPrecondition``)."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as exc:
        os.close(fd)
        if exc.errno in (errno.EAGAIN, errno.EWOULDBLOCK):
            raise FailedPrecondition(f"upload {path.name} is being written by another call") from None
        raise
    return fd, os.fstat(fd).st_size


async def _read_blob(path: Path, file_id: str, offset: int, size: int, chunk_bytes: int) -> AsyncGenerator[bytes, None]:
    """The contents of file ``file_id`` (blob ``path``, ``size`` bytes) from ``offset``, a chunk at a time."""
    what = f"download of {file_id}"
    try:
        fd = await _in_thread(os.open, path, os.O_RDONLY)
    except FileNotFoundError:
        log.error("blob %s of file %s is missing", path.name, file_id)
        raise DataLoss(f"the contents of file {file_id} are missing on the server") from None
    except OSError as exc:
        raise _disk_error(exc, what, writing=False) from None
    try:
        position = offset
        while position < size:
            try:
                chunk = await _in_thread(os.pread, fd, min(chunk_bytes, size - position), position)
            except OSError as exc:
                raise _disk_error(exc, what, f"continue from offset {position}", writing=False) from None
            if not chunk:
                raise DataLoss(f"the contents of file {file_id} are truncated on the server")
            position += len(chunk)
            yield chunk
    finally:
        await _in_thread(os.close, fd)
