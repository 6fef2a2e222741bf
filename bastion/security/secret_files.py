"""Opening a file a secret (a token) is about to be written to: mode 0600, and only a file of one's own.

A secret file may be named in a directory others can write to (``--out
/tmp/ci.token``, a data directory made by someone else), where a name may
have been planted beforehand: a symbolic link to a file the planter can
read, or a file of the planter's own, which keeps its owner -- who may read
it whatever its mode -- however it is rewritten. So the name is opened
without following a symbolic link (``O_NOFOLLOW``), and the file opened must
be a regular file owned by this process's user; it is made 0600 (``fchmod``
on the open file: no window in which it is looser, no path looked up twice)
before a byte is written. A FIFO is opened without waiting for a reader
(``O_NONBLOCK``) and then refused as not a regular file.

``write_secret_file`` writes the secret itself into a new file, made beside
the old one (``replace_file``: 0600, ``O_EXCL``; one a crash leaves behind is
removed by the next write) and renamed over it: the old file, which others
may hold open if it ever was readable to them, or reach by a second name (a
hard link), is replaced, not rewritten.
"""

from __future__ import annotations

import errno
import os
import stat
from pathlib import Path

from bastion.durable import replace_file
from bastion.exceptions import UsageError

__all__ = ["open_secret_file", "write_secret_file"]


def open_secret_file(path: Path, flags: int) -> int:
    """A file descriptor of ``path`` opened with ``flags`` (``O_WRONLY``, ``O_CREAT``...), mode 0600.

    UsageError ("cannot write PATH: it is a symbolic link", "...: it belongs to
    another user (uid N)", "...: it is not a regular file") for a name that must
    not receive a secret; OSError for one that cannot be opened at all (a directory: IsADirectoryError).
    """
    truncate = bool(flags & os.O_TRUNC)  # done once the file is known to be one to write: not another's
    try:
        fd = os.open(path, (flags & ~os.O_TRUNC) | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC, 0o600)
    except OSError as exc:
        if exc.errno == errno.ELOOP and os.path.islink(path):
            raise UsageError(f"cannot write {path}: it is a symbolic link") from None
        if exc.errno == errno.ENXIO:  # a FIFO nobody reads
            raise UsageError(f"cannot write {path}: it is not a regular file") from None
        raise
    try:
        status = os.fstat(fd)
        if stat.S_ISDIR(status.st_mode):  # as opening it for writing would have said
            raise IsADirectoryError(errno.EISDIR, os.strerror(errno.EISDIR), str(path))
        if not stat.S_ISREG(status.st_mode):
            raise UsageError(f"cannot write {path}: it is not a regular file")
        if status.st_uid != os.geteuid():
            raise UsageError(f"cannot write {path}: it belongs to another user (uid {status.st_uid})")
        os.fchmod(fd, 0o600)
        if truncate:
            os.ftruncate(fd, 0)
        os.set_blocking(fd, True)
    except BaseException:
        os.close(fd)
        raise
    return fd


def write_secret_file(path: Path, data: bytes) -> None:
    """Write ``data`` as ``path``, a new 0600 file, after ``open_secret_file``'s checks (same errors)."""
    os.close(open_secret_file(path, os.O_WRONLY | os.O_CREAT))
    replace_file(path, data, 0o600)
