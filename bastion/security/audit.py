"""The audit log: one JSON object per line, for security-relevant events.

Logins, failures, lockouts, token creation and revocation, permission
denials and admin actions, each with time, principal, source address and
request id. Callers never pass secrets; as a second line of defence any field
whose name suggests a secret is dropped before writing.
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

_SECRET_FIELDS = frozenset({"password", "token", "secret", "new_password", "old_password"})
log = logging.getLogger("bastion.audit")


class AuditLog:
    """Appends JSON lines to a file (mode 0600) and mirrors them to the ``bastion.audit`` logger."""

    def __init__(self, path: str | os.PathLike[str] | None = None) -> None:
        self._file: IO[str] | None = None
        self._lock = threading.Lock()
        if path is not None:
            fd = os.open(Path(path), os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
            os.fchmod(fd, 0o600)
            self._file = os.fdopen(fd, "a", buffering=1)

    def __call__(self, event: str, **fields: Any) -> None:
        record = {"time": round(time.time(), 3), "event": event}
        record.update({k: v for k, v in fields.items() if k not in _SECRET_FIELDS and v is not None})
        line = json.dumps(record, sort_keys=True, default=str)
        log.info(line)
        if self._file is not None:
            with self._lock:
                self._file.write(line + "\n")

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
