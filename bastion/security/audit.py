"""The audit log: one JSON object per line, for security-relevant events.

Logins, failures, lockouts, token creation and revocation, permission
denials and admin actions, each with time, principal, source address and
request id. Callers never pass secrets; as a second line of defence any field
whose name suggests a secret is dropped before writing.

Rotation: renaming the file (logrotate's default) is enough. Before each
record the log checks that its path still names the file it has open (one
``stat``, as logging's ``WatchedFileHandler`` does) and opens a new one,
mode 0600, if not -- so every worker of ``bastion serve --workers`` follows
on its own, with no signal to send.
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
from pathlib import Path
from typing import IO, Any

__all__ = ["AuditLog"]

#: A field whose name holds one of these (case aside) is never written: password, db_password, passphrase,
#: client_secret, api_key, private_key, credentials ...
_SECRET_PARTS = ("password", "passwd", "passphrase", "secret", "credential", "api_key", "apikey", "private_key")


def _is_secret(name: str) -> bool:
    """Whether a field named ``name`` may hold a secret: one of _SECRET_PARTS, or a token itself (``token``,
    ``session_token``, ``tokens``) -- not a token's id (``token_id``), which is how records name tokens."""
    name = name.lower()
    if any(part in name for part in _SECRET_PARTS):
        return True
    return name in ("token", "tokens") or name.endswith(("_token", "_tokens"))


log = logging.getLogger("bastion.audit")


class AuditLog:
    """Appends JSON lines to a file (mode 0600) and mirrors them to the ``bastion.audit`` logger."""

    def __init__(self, path: str | os.PathLike[str] | None = None) -> None:
        self._file: IO[str] | None = None
        self._lock = threading.Lock()
        self._path = Path(path) if path is not None else None
        self._identity = (0, 0)
        self._stuck = False  # reopening after a rotation failed (warned once)
        if self._path is not None:
            self._open(self._path)

    def _open(self, path: Path) -> None:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        os.fchmod(fd, 0o600)
        status = os.fstat(fd)
        old, self._file = self._file, os.fdopen(fd, "a", buffering=1)
        self._identity = (status.st_dev, status.st_ino)
        if old is not None:
            old.close()

    def _follow(self, path: Path) -> None:
        """Open ``path`` anew if it no longer names the open file (renamed or removed by rotation).
        If it cannot be opened, records go on into the open file rather than nowhere."""
        try:
            status = os.stat(path)
            if (status.st_dev, status.st_ino) == self._identity:
                return
        except FileNotFoundError:
            pass
        except OSError:
            return  # cannot tell (its directory unreadable): keep the open file
        try:
            self._open(path)
        except OSError as exc:
            if self._file is None:
                raise
            if not self._stuck:
                log.warning("cannot reopen the audit log %s (%s); still writing to the file it had open", path, exc)
            self._stuck = True
        else:
            self._stuck = False

    def __call__(self, event: str, **fields: Any) -> None:
        record = {"time": round(time.time(), 3), "event": event}
        record.update({k: v for k, v in fields.items() if v is not None and not _is_secret(k)})
        line = json.dumps(record, sort_keys=True, default=str)
        log.info(line)
        if self._path is not None:
            with self._lock:
                self._follow(self._path)
                assert self._file is not None
                self._file.write(line + "\n")

    def close(self) -> None:
        with self._lock:
            self._path = None
            if self._file is not None:
                self._file.close()
                self._file = None
