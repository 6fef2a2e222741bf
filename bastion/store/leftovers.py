"""What a backup or restore leaves behind when it is killed, and clearing it up.

A backup writes its archive to a hidden ``.<name>.<host>-<pid>.partial`` and
unpacks or copies into a hidden ``.restore-staging-<host>-<pid>-<random>``
directory; both are removed when it ends, however it ends -- unless the
process is killed (kill -9, the OOM killer, a power cut). Then they stay: a
whole copy of the database each time. The next backup or restore in the
same directory removes those whose process is gone: named with this host's
name and a process id that no longer exists here. Another host's (a
directory shared over the network), or a live process's, are left alone.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import shutil
import socket
from pathlib import Path

__all__ = ["STAGING_PREFIX", "partial_name", "remove_stale", "staging_name"]

log = logging.getLogger("bastion.backup")

STAGING_PREFIX = ".restore-staging-"


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
