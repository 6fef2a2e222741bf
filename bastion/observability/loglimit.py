"""A budget for log lines (and audit records) that peers can cause at will.

A connection closed for abuse, for trickling a frame, or for never reading
is one log line and, for abuse, one audit record. An attacker can cause such
a close with a few hundred bytes and a new connection (from a new source
address when the per-source limits bite), so writing one line per close
lets it flood the logs and the disk. The server keeps one ``LogBudget``:
at most ``burst`` lines of each kind per ``window`` seconds, server-wide;
past that the events are only counted (the ``admin.stats`` counters count
them all), and the next line written says how many were left out before it.
The HTTP gateway keeps one too, for refused cross-origin WebSocket upgrades and
refused or malformed HTTP requests (_shared.py).

O(1) per event, no timer; kinds are a fixed set of names in the code, so
the state never grows with the number of peers.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Final

__all__ = ["LOG_BURST", "LOG_WINDOW", "LogBudget", "suppressed_note"]

#: Lines of one kind written per window, server-wide.
LOG_BURST: Final = 10
#: Seconds of a window.
LOG_WINDOW: Final = 10.0


class LogBudget:
    """At most ``burst`` lines per kind per ``window`` seconds; the rest counted, not written."""

    def __init__(
        self, burst: int = LOG_BURST, window: float = LOG_WINDOW, *, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.burst = burst
        self.window = window
        self._clock = clock
        #: kind -> [window start, lines written in it, events left out since the last line written]
        self._kinds: dict[str, list[float]] = {}

    def take(self, kind: str, burst: int | None = None) -> int | None:
        """None: do not write this one (it is counted). Else write it, saying that the returned number
        of events of this kind were left out before it (0: none). ``burst``: this kind's own."""
        now = self._clock()
        state = self._kinds.get(kind)
        if state is None:
            state = self._kinds[kind] = [now, 0.0, 0.0]
        elif now - state[0] >= self.window:
            state[0], state[1] = now, 0.0
        if state[1] >= (self.burst if burst is None else burst):
            state[2] += 1
            return None
        state[1] += 1
        suppressed, state[2] = int(state[2]), 0.0
        return suppressed

    def suppressed(self, kind: str) -> int:
        """Events of ``kind`` left out since the last line written."""
        state = self._kinds.get(kind)
        return 0 if state is None else int(state[2])


def suppressed_note(suppressed: int) -> str:
    """What a log line adds after ``suppressed`` events left out before it ('' for none)."""
    return f" ({suppressed} more like it not logged before this one)" if suppressed else ""
