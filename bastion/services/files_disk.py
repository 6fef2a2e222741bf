"""The files service's on-disk layer: paths and blocking I/O under the files directory.

Contents live under the files directory, outside the database:

* ``blobs/<sha256[:2]>/<sha256>`` -- immutable, content-addressed, 0600 in
  0700 directories; files with equal contents share one blob;
* ``uploads/<upload id>`` -- uploads in progress.

An upload file is written by one call at a time (an exclusive ``flock``);
chunks are appended with ``pwrite`` and fed into a running SHA-256, and a
resumed upload first re-hashes the part already on disk in bounded blocks.
A finished upload is fsynced, then renamed into place as its blob and the
blob's directory fsynced, so an acknowledged upload survives a crash.
Everything here blocks: the service calls it through ``_in_thread``.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import fcntl
import hashlib
import os
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

from bastion.exceptions import FailedPrecondition

T = TypeVar("T")

_HASH_BLOCK = 1024 * 1024
_UPLOAD_ID = re.compile(r"^u-[0-9a-f]{32}\Z")


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


class _Disk:
    """Paths and blocking file operations under the files directory (called via ``_in_thread``)."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.blobs = directory / "blobs"
        self.uploads = directory / "uploads"

    def prepare(self) -> None:
        for path in (self.directory, self.blobs, self.uploads):
            path.mkdir(mode=0o700, parents=True, exist_ok=True)

    def blob(self, sha256: str) -> Path:
        return self.blobs / sha256[:2] / sha256

    def upload(self, upload_id: str) -> Path:
        return self.uploads / upload_id

    def create_upload(self, upload_id: str) -> None:
        os.close(os.open(self.upload(upload_id), os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))

    def remove_upload(self, upload_id: str) -> None:
        with contextlib.suppress(FileNotFoundError):
            self.upload(upload_id).unlink()

    def remove_blob(self, sha256: str) -> None:
        with contextlib.suppress(FileNotFoundError):
            self.blob(sha256).unlink()

    def place(self, upload_id: str, sha256: str) -> None:
        """Move a finished (fsynced) upload into place as blob ``sha256``, durably."""
        target = self.blob(sha256)
        target.parent.mkdir(mode=0o700, exist_ok=True)
        os.replace(self.upload(upload_id), target)  # equal contents: replacing an existing blob is harmless
        _fsync_dir(target.parent)

    def orphans(self, known: Callable[[str], bool], older_than: float) -> list[str]:
        """Upload files named like uploads, older than ``older_than``, that ``known`` does not claim."""
        out = []
        for entry in os.scandir(self.uploads):
            if _UPLOAD_ID.match(entry.name) and entry.stat().st_mtime < older_than and not known(entry.name):
                out.append(entry.name)
        return out


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


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


def _append(fd: int, chunk: bytes, position: int, hasher: Any) -> None:
    view = memoryview(chunk)
    written = 0
    while written < len(view):
        written += os.pwrite(fd, view[written:], position + written)
    hasher.update(chunk)


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
