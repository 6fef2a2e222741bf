"""What a backup or restore leaves behind when it is killed, and clearing it up.

A backup writes its archive to a hidden ``.<name>.<host>-<pid>.partial`` and
unpacks or copies into a hidden ``.restore-staging-<host>-<pid>-<random>``
directory; both are removed when it ends, however it ends -- unless the
process is killed (kill -9, the OOM killer, a power cut). Then they stay: a
whole copy of the database each time. The next backup or restore in the
same directory removes those whose process is gone: named with this host's
name and a process id that no longer exists here. Another host's (a
directory shared over the network), or a live process's, are left alone.

Verifying an archive outside any data directory unpacks its database into a
private (0700) ``bastion-locked-verify-*`` directory in the system's temporary
directory (TMPDIR), which a kill leaves there too. Each holds an flock on its
own directory for as long as it lives (the kernel lets go of it when the
process dies, however it dies); the next verify removes those of this user
whose lock it can take: their owners are gone.

Older versions verified in ``bastion-verify-*`` directories, most without any
flock (TemporaryDirectory): a free lock there does not mean a dead owner, and
during a rolling upgrade such a directory may be an old verify's, mid-read.
So one of those is removed only when nothing in it (itself or what it holds
directly) changed for ``OLD_VERIFY_MAX_AGE`` (a day; no verify takes that
long) and no process holds it locked.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import re
import shutil
import socket
import stat
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

__all__ = [
    "OLD_VERIFY_MAX_AGE",
    "OLD_VERIFY_PREFIX",
    "STAGING_PREFIX",
    "VERIFY_PREFIX",
    "partial_name",
    "private_temporary",
    "remove_stale",
    "remove_stale_temporaries",
    "staging_name",
]

log = logging.getLogger("bastion.backup")

STAGING_PREFIX = ".restore-staging-"
#: Verify temporaries, each flocked by its owner while it lives.
VERIFY_PREFIX = "bastion-locked-verify-"
#: Older versions' verify temporaries (most never locked): removed only once this old (seconds).
OLD_VERIFY_PREFIX = "bastion-verify-"
OLD_VERIFY_MAX_AGE = 86400.0


def _owner() -> str:
    host = re.sub(r"[^A-Za-z0-9.-]", "_", socket.gethostname()) or "localhost"
    return f"{host}-{os.getpid()}"


def staging_name(random: str) -> str:
    """The name of a new staging directory of this process."""
    return f"{STAGING_PREFIX}{_owner()}-{random}"


def partial_name(name: str) -> str:
    """The name of the temporary an archive called ``name`` is written to by this process."""
    return f".{name}.{_owner()}.partial"


def _dead(pid: int) -> bool:
    if pid == os.getpid():
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except OSError:  # e.g. another user's process: alive
        return False
    return False


def remove_stale(directory: Path) -> list[str]:
    """Remove the partial archives and staging directories in ``directory`` left by dead processes of this
    host; the names removed."""
    host = re.escape(_owner().rpartition("-")[0])
    staging = re.compile(re.escape(STAGING_PREFIX) + host + r"-(\d+)-[0-9a-f]+")
    partial = re.compile(r"\..+\." + host + r"-(\d+)\.partial")
    removed = []
    try:
        entries = list(os.scandir(directory))
    except OSError:
        return []
    for entry in entries:
        match = staging.fullmatch(entry.name) or partial.fullmatch(entry.name)
        if match is None or not _dead(int(match[1])):
            continue
        with contextlib.suppress(OSError):
            if entry.is_dir(follow_symlinks=False):
                shutil.rmtree(entry.path)
            else:
                os.unlink(entry.path)
            removed.append(entry.name)
            log.warning("removed %s in %s: left by a backup or restore that was killed", entry.name, directory)
    return removed


@contextlib.contextmanager
def private_temporary() -> Iterator[Path]:
    """A new private (0700) ``bastion-locked-verify-*`` directory in the system's temporary directory, locked
    (flock) while in use and removed with all it holds on exit; first, those of killed processes are removed.
    """
    parent = Path(tempfile.gettempdir())
    remove_stale_temporaries(parent)
    while True:
        path = Path(tempfile.mkdtemp(prefix=VERIFY_PREFIX, dir=parent))
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)  # waits out a sweeper that took it in the instant before
            with contextlib.suppress(FileNotFoundError):
                if os.path.samestat(os.fstat(fd), os.lstat(path)):
                    break  # ours and locked: no sweeper removes it now
        except BaseException:
            os.close(fd)
            raise
        os.close(fd)  # a sweeper removed it before it was locked: make another
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)
        os.close(fd)


def remove_stale_temporaries(parent: Path) -> list[str]:
    """Remove this user's ``bastion-locked-verify-*`` directories in ``parent`` that no live process holds
    locked (left by a verify that was killed), and older versions' ``bastion-verify-*`` ones that are also
    ``OLD_VERIFY_MAX_AGE`` old; the names removed. Others', and those in use, are left alone."""
    removed = []
    try:
        entries = [e for e in os.scandir(parent) if e.name.startswith((VERIFY_PREFIX, OLD_VERIFY_PREFIX))]
    except OSError:
        return []
    for entry in entries:
        with contextlib.suppress(OSError):
            info = entry.stat(follow_symlinks=False)
            if not stat.S_ISDIR(info.st_mode) or info.st_uid != os.geteuid():
                continue
            if entry.name.startswith(OLD_VERIFY_PREFIX) and not _untouched_for(entry.path, OLD_VERIFY_MAX_AGE):
                continue  # perhaps an older version's live verify, which held no lock
            fd = os.open(entry.path, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # BlockingIOError: its owner lives
                if not os.path.samestat(os.fstat(fd), info):
                    continue
                shutil.rmtree(entry.path)
            finally:
                os.close(fd)
            removed.append(entry.name)
            log.warning("removed %s in %s: left by a verify that was killed", entry.name, parent)
    return removed


def _untouched_for(path: str, age: float) -> bool:
    """Whether neither the directory ``path`` nor anything directly in it changed in the last ``age`` seconds."""
    cutoff = time.time() - age
    with os.scandir(path) as entries:
        stamps = [entry.stat(follow_symlinks=False).st_mtime for entry in entries]
    return max([os.lstat(path).st_mtime, *stamps]) < cutoff
