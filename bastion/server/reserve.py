"""A spare file descriptor, given up when accept() runs out of them (``Server``'s accept loops).

Out of descriptors (EMFILE/ENFILE), connections pile up in the listen queue
and their clients hang until they time out. ``DescriptorReserve.shed`` closes
the spare to accept and close what is waiting -- those clients learn at once
-- then takes it back.
"""

from __future__ import annotations

import contextlib
import os
import socket

__all__ = ["DescriptorReserve"]


class DescriptorReserve:
    def __init__(self) -> None:
        self._fd: int | None = None

    def hold(self) -> None:
        """Take the spare if it is not held (it may fail: out of descriptors already)."""
        if self._fd is None:
            with contextlib.suppress(OSError):
                self._fd = os.open(os.devnull, os.O_RDONLY | os.O_CLOEXEC)

    def shed(self, listener: socket.socket, backlog: int) -> int:
        """Give up the spare to accept and close up to ``backlog`` waiting connections, take it back;
        how many were closed. Without the spare, only try to take it."""
        if self._fd is None:
            self.hold()
            return 0
        self.release()
        closed = 0
        try:
            for _ in range(backlog):
                conn, _ = listener.accept()
                conn.close()
                closed += 1
        except OSError:
            pass
        finally:
            self.hold()
        return closed

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
