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
private (0700) ``bastion-verify-*`` directory in the system's temporary
directory (TMPDIR), which a kill leaves there too. Each holds an flock on its
own directory for as long as it lives (the kernel lets go of it when the
process dies, however it dies); the next verify removes those of this user
whose lock it can take: their owners are gone.
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
from collections.abc import Iterator
from pathlib import Path

__all__ = ["STAGING_PREFIX", "VERIFY_PREFIX", "partial_name", "private_temporary", "remove_stale", "staging_name"]

log = logging.getLogger("bastion.backup")

STAGING_PREFIX = ".restore-staging-"
VERIFY_PREFIX = "bastion-verify-"


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
    """A new private (0700) ``bastion-verify-*`` directory in the system's temporary directory, locked
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
    """Remove this user's ``bastion-verify-*`` directories in ``parent`` that no live process holds locked
    (left by a verify that was killed); the names removed. Others', and those in use, are left alone."""
    removed = []
    try:
        entries = [e for e in os.scandir(parent) if e.name.startswith(VERIFY_PREFIX)]
    except OSError:
        return []
    for entry in entries:
        with contextlib.suppress(OSError):
            info = entry.stat(follow_symlinks=False)
            if not stat.S_ISDIR(info.st_mode) or info.st_uid != os.geteuid():
                continue
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
