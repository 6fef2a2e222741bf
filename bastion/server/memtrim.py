"""Give the memory a storm of connections leaves behind back to the kernel.

Thousands of connections opened and dropped at once (a reconnect storm after
a network blip, a scan, TLS handshakes left halfway) each allocate tens of
KiB from the C allocator while they last (TLS state and buffers, the
session's larger objects; not traced one by one: tracemalloc sees only
Python's) and free it again. What little outlives them lands among the freed
blocks, and glibc gives back to the kernel only the
free space at the top of its heap: the holes below stay resident, though
nothing leaked (an operator watching RSS reads it as a leak). On a test
server: 3,000 half-done TLS handshakes from one address (most refused at
accept by limits.max_connections_per_source) 75 -> 93 MB; 20,000 from 100
addresses, 327 MB once all were closed. ``allocator.trim()`` (glibc's
``malloc_trim(0)``) hands the free pages back: 78 and 94 MB.

``HeapTrimmer`` looks every ``TRIM_CHECK`` seconds (two counters and
``/proc/self/statm``: nothing on the call path) and trims once three things
hold: ``TRIM_AFTER_CLOSED`` connections have closed since its last trim (the
growth came with churn), the resident size is ``TRIM_GROWTH`` above its mark
(the size at start, or after a trim: below; there are holes worth the cost), and
``TRIM_INTERVAL`` has passed since. Memory that is really in use is not
released: a trim that releases little makes the size after it the new mark,
so a server that merely holds more does not trim again until it grows as much
once more (one that releases much, in a storm still going on, keeps the mark:
the holes the rest of the storm leaves are trimmed after it); trims that each
leave the heap high anyway (memory in use, churn's holes on top) come twice as
far apart each time from the second on, up to ``TRIM_BACKOFF`` intervals. The trim runs
in a thread and takes milliseconds to a tenth of a second (1.5 ms at 93 MB,
about 60 ms at 330 MB on a busy 2-core machine); it holds the heap's lock
meanwhile, so the event loop may wait as long for an allocation (up to
117 ms, trimming 338 MB of holes): once in 30 s at most, and only after a
storm. The trims, the bytes the resident size fell by across them and the
seconds they took are counted (``admin.stats``, ``/metrics``). Nothing
happens where the C library is not glibc, nor with ``BASTION_MALLOC_TRIM=0``
or ``BASTION_MALLOC_TUNING=0``.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from typing import TYPE_CHECKING

from bastion import allocator

if TYPE_CHECKING:
    from bastion.server.server import Server

__all__ = [
    "TRIM_AFTER_CLOSED",
    "TRIM_BACKOFF",
    "TRIM_CHECK",
    "TRIM_GROWTH",
    "TRIM_INTERVAL",
    "HeapTrimmer",
    "memory_stats",
    "resident_bytes",
]

log = logging.getLogger("bastion.server")

#: Seconds between looks at the connection counts.
TRIM_CHECK = 10.0
#: Seconds at least between two trims. A storm longer than a check interval is trimmed while it
#: lasts too (the heap grows back): the trim after it comes at most this plus TRIM_CHECK after its end.
TRIM_INTERVAL = 30.0
#: At most this many intervals between trims that each leave the heap high (memory in use).
TRIM_BACKOFF = 16
#: Connections closed since the last trim (or start) before the next one. Connections refused at
#: accept do not count (they allocate nothing): a storm of 3,000 from one source, most of them past
#: limits.max_connections_per_source, held 683 long enough to count and grew the heap by 17 MB.
TRIM_AFTER_CLOSED = 100
#: Bytes the resident size must have grown since the last trim (or start).
TRIM_GROWTH = 8 * 1024 * 1024
_PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096


def resident_bytes() -> int | None:
    """This process's resident size (Linux: ``/proc/self/statm``), or None where it cannot be read."""
    try:
        with open("/proc/self/statm", "rb") as statm:
            return int(statm.read().split()[1]) * _PAGE
    except (OSError, ValueError, IndexError):
        return None


def memory_stats(server: Server) -> dict[str, int | float]:
    """The trimmer's counters for ``admin.stats``: trims, bytes released, seconds spent."""
    counters = server.counters
    return {
        "memory_trims_total": counters["memory_trims"],
        "memory_trimmed_bytes_total": counters["memory_trimmed_bytes"],
        "memory_trim_seconds_total": counters["memory_trim_us"] / 1e6,
    }


class HeapTrimmer:
    """Trims ``server``'s process heap after connection churn (see the module's docstring)."""

    def __init__(
        self,
        server: Server,
        *,
        check: float = TRIM_CHECK,
        interval: float = TRIM_INTERVAL,
        after_closed: int = TRIM_AFTER_CLOSED,
        growth: int = TRIM_GROWTH,
    ) -> None:
        self.server = server
        self.check = check
        self.interval = interval
        self.after_closed = after_closed
        self.growth = growth
        self.wait = interval  # before the next trim: the interval, longer after trims that left the heap high
        self._high = 0  # trims in a row that left it high
        self._closed_at_trim = 0  # connections closed (accepted and no longer open) at the last trim
        self._resident_at_trim: int | None = None  # the resident size after it (or at start)
        self._last_trim: float | None = None
        self._task: asyncio.Task[None] | None = None

    @staticmethod
    def available() -> bool:
        """True where trimming does something: glibc, and not turned off (``BASTION_MALLOC_TRIM=0``,
        or ``BASTION_MALLOC_TUNING=0`` with the rest of the allocator's settings)."""
        env = os.environ
        off = env.get("BASTION_MALLOC_TRIM", "1") == "0" or env.get("BASTION_MALLOC_TUNING", "1") == "0"
        return not off and allocator.trim_supported()

    def start(self) -> None:
        """Start looking, from the running loop (nothing where trimming is not available)."""
        if self._task is None and self.available():
            self._resident_at_trim = resident_bytes()
            self._task = asyncio.get_running_loop().create_task(self._run())

    def stop(self) -> None:
        """Stop looking (a trim running in its thread finishes)."""
        if self._task is not None:
            self._task.cancel()
            self._task = None

    def due(self, now: float, resident: int | None) -> bool:
        """Whether to trim now, the process being ``resident`` bytes: long enough since the last
        trim, enough connections closed since, and the resident size grown enough since."""
        if self._last_trim is not None and now - self._last_trim < self.wait:
            return False
        if self._closed() - self._closed_at_trim < self.after_closed:
            return False
        mark = self._resident_at_trim
        return resident is not None and (mark is None or resident - mark >= self.growth)

    def _closed(self) -> int:
        server = self.server
        return server.counters["connections"] - server.connections_open

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(self.check)
            now = time.monotonic()
            if not self.due(now, resident_bytes()):
                continue
            self._last_trim, self._closed_at_trim = now, self._closed()
            try:
                self.trimmed(await self.trim(), resident_bytes())
            except Exception:  # never the server's end: the next churn tries again
                log.exception("trimming the heap failed")

    def trimmed(self, released: int, resident: int | None) -> None:
        """Move the mark the growth counts from after a trim that released ``released`` bytes and
        left the process ``resident``. One that released little found the memory in use: what is
        left is the new mark, so it is not trimmed for again. One that released much, as in a
        storm still going on (whose connections then held memory that is freed after it), leaves
        the mark where it was, so the holes the rest of the storm leaves are trimmed after it."""
        mark = self._resident_at_trim
        if resident is not None and (mark is None or released < self.growth // 2):
            self._resident_at_trim = resident
        elif resident is not None and mark is not None:
            self._resident_at_trim = min(mark, resident)
        # Trims in a row that each left the process still TRIM_GROWTH above the mark (memory in use,
        # with churn's holes on top, each trim releasing only those) wait twice as long each from the
        # second on, up to TRIM_BACKOFF x the interval (the first may be a storm's, still going on: the
        # trim after it comes at the interval); one that got down to the mark, the interval again.
        mark = self._resident_at_trim
        if resident is not None and mark is not None and resident - mark >= self.growth:
            self._high += 1
            self.wait = self.interval * min(2 ** (self._high - 1), TRIM_BACKOFF)
        else:
            self._high = 0
            self.wait = self.interval

    async def trim(self) -> int:
        """Trim now, in a thread; the bytes the resident size fell by (counted in ``server.counters``)."""
        released, seconds = await asyncio.to_thread(_trim_measured)
        counters = self.server.counters
        counters["memory_trims"] += 1
        counters["memory_trimmed_bytes"] += released
        counters["memory_trim_us"] += int(seconds * 1e6)
        log.debug("returned %d bytes of freed heap to the kernel in %.1f ms", released, seconds * 1000)
        return released


def _trim_measured() -> tuple[int, float]:
    before = resident_bytes()
    started = time.perf_counter()
    allocator.trim()
    seconds = time.perf_counter() - started
    after = resident_bytes()
    return (max(0, before - after) if before is not None and after is not None else 0), seconds
