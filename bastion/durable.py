"""Making renames and new files durable: the one ``fsync`` of a directory every store and service uses,
and the one way to replace a file's contents whole (``replace_file``)."""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import re
import secrets
import stat
from pathlib import Path


def fsync_dir(path: Path, *, missing_ok: bool = False) -> None:
    """Make a rename or a new file in directory ``path`` durable (``missing_ok``: a directory gone is no error)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    except FileNotFoundError:
        if missing_ok:
            return
        raise
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def replace_file(path: Path, data: bytes, mode: int) -> None:
    """Make ``path`` a new file holding ``data``, with ``mode`` from the start: written to a temporary
    file beside it (``_new_temporary``: 0600, ``O_EXCL``), fsynced, renamed over it, and the rename
    fsynced. Whoever held the old file open, or reaches it by another name, keeps the old contents.

    A process killed between making the temporary and renaming it (SIGKILL, the OOM killer) leaves
    the temporary behind, holding ``data`` -- a token, a TLS key. So each temporary is named for its
    target, ``.<name>.<16 hex digits>.tmp``, and flocked by its writer for as long as it exists (the
    kernel lets go of the lock when the process dies, however it dies); every ``replace_file`` of
    ``path`` first removes those temporaries of ``path`` that are regular files of this user whose
    lock it can take: their writers are gone. A live writer's is locked, so left alone; nothing else
    in the directory matches the name. (A crash leaves one at most until the target's next write.)
    On a filesystem without locks ``path`` is still replaced, but a crash's temporary stays.
    """
    _remove_stale_temporaries(path)
    fd, temporary = _new_temporary(path)
    try:
        with os.fdopen(fd, "wb") as file:  # closed (and so unlocked) only once renamed
            os.fchmod(fd, mode)
            file.write(data)
            file.flush()
            os.fsync(file.fileno())
            os.replace(temporary, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(temporary)
        raise
    fsync_dir(path.parent)


def _temporaries(path: Path) -> re.Pattern[str]:
    """The names of ``path``'s temporaries (``_new_temporary``)."""
    return re.compile(re.escape(f".{path.name}.") + "[0-9a-f]{16}" + re.escape(".tmp"))


#: What ``flock`` raises on a filesystem without locks (some network and FUSE ones).
_NO_LOCKS = frozenset({errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOTSUP, errno.ENOSYS})


def _new_temporary(path: Path) -> tuple[int, Path]:
    """A new empty 0600 temporary for ``path``, beside it, flocked: its descriptor and path.

    Locked after it is made, so a ``_remove_stale_temporaries`` in between may take its lock first
    and remove it: once it holds the lock, the writer checks that its name still leads to its file,
    and makes another if not. On a filesystem without locks it is returned unlocked: files are
    replaced as before, but a crashed writer's temporary stays (no remover can lock it to tell the
    writer is gone). If locking fails otherwise (or is interrupted), the temporary is removed.
    """
    for _ in range(100):
        temporary = path.parent / f".{path.name}.{secrets.token_hex(8)}.tmp"
        fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX)  # at most a remover's moment
            except OSError as exc:
                if exc.errno not in _NO_LOCKS:
                    raise
                return fd, temporary  # no locks here: unlocked, and no remover can take it either
            mine = os.fstat(fd)
            try:
                named = os.stat(temporary, follow_symlinks=False)
            except FileNotFoundError:
                named = None
        except BaseException:
            os.close(fd)
            with contextlib.suppress(OSError):
                os.unlink(temporary)  # empty still: nothing of the caller's to keep
            raise
        if named is not None and (named.st_dev, named.st_ino) == (mine.st_dev, mine.st_ino):
            return fd, temporary
        os.close(fd)  # removed as stale before it was locked
    raise OSError(f"cannot make a temporary file beside {path}: each was removed at once")


def _remove_stale_temporaries(path: Path) -> None:
    """Remove ``path``'s temporaries whose writers are gone: this user's, their flock free."""
    names = _temporaries(path)
    try:
        candidates = [name for name in os.listdir(path.parent) if names.fullmatch(name)]
    except OSError:
        return
    for name in candidates:
        temporary = path.parent / name
        try:
            fd = os.open(temporary, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
        except OSError:
            continue  # gone (renamed into place), a symbolic link, not ours to read
        try:
            status = os.fstat(fd)
            if not stat.S_ISREG(status.st_mode) or status.st_uid != os.geteuid():
                continue
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                continue  # a live writer's
            with contextlib.suppress(FileNotFoundError):
                os.unlink(temporary)
        finally:
            os.close(fd)
