"""What the scheduler (bastion/server/scheduler.py) keeps: tickets, and each level's fair queue.

A ``Ticket`` is one submitted job: its ``Level``, its state and, once it
runs, its task. A ``LevelQueue`` holds one level's waiting tickets -- a FIFO
per principal, served round-robin -- and that level's CoDel state, which
the scheduler reads and updates.
"""

from __future__ import annotations

import asyncio
import contextvars
import enum
from collections import deque
from collections.abc import Callable, Coroutine
from typing import Any, Protocol

from bastion.status import Status

__all__ = ["Job", "Level", "LevelQueue", "OnReject", "Owner", "ReportingJob", "Ticket", "TicketState", "held"]

#: A call ready to run: called once, with no arguments, when a slot is free.
Job = Callable[[], Coroutine[Any, Any, object]]
#: A job that reports its own start and end (``Scheduler.submit(..., reports_end=True)``): called with its ticket.
ReportingJob = Callable[["Ticket"], Coroutine[Any, Any, object]]
#: Told why a job will never run: (status, message, retry-after seconds or None).
OnReject = Callable[[Status, str, "float | None"], None]

_PUSH_OUT_SAMPLE = 8  # principals looked at to find the longest queue when a level is full
#: Ring entries looked at, empty FIFOs included, before a push-out gives up its search (O(1) per call).
_PUSH_OUT_LOOK = 8 * _PUSH_OUT_SAMPLE
#: Emptied FIFOs a level keeps (past the number of waiting tickets) before dropping them all.
_EMPTY_SLACK = 64


class Owner(Protocol):
    """What a job is run for (a server connection's Link): its queued jobs wait while its writing is paused."""

    @property
    def writing_paused(self) -> bool: ...


class Level(enum.IntEnum):
    """Scheduling levels; a higher level is always served first."""

    BATCH = 0
    INTERACTIVE = 1
    CONTROL = 2


class TicketState(enum.Enum):
    QUEUED = "queued"
    RUNNING = "running"
    DONE = "done"  # the task finished, however it ended
    REJECTED = "rejected"  # on_reject was called; the job never ran
    CANCELLED = "cancelled"  # removed from its queue by cancel(); the job never ran


class Ticket:
    """One submitted job: its level, its state and, once started, its task."""

    __slots__ = (
        "context",
        "deadline",
        "detached",
        "enqueued_at",
        "job",
        "level",
        "on_done",
        "on_reject",
        "owner",
        "principal",
        "reports_end",
        "started",
        "state",
        "task",
    )

    def __init__(
        self,
        job: Job | ReportingJob,
        level: Level,
        principal: str,
        deadline: float | None,
        on_reject: OnReject,
        on_done: Callable[[], None] | None,
        now: float,
        reports_end: bool = False,
        owner: Owner | None = None,
    ) -> None:
        self.job: Job | ReportingJob = job
        self.level = level
        self.principal = principal
        self.deadline = deadline
        self.on_reject = on_reject
        self.on_done = on_done
        self.enqueued_at = now
        self.state = TicketState.QUEUED
        self.task: asyncio.Task[object] | None = None
        self.started = False  # its task has begun running the job
        self.context: contextvars.Context | None = None  # a queued job's: its submitter's context
        self.detached = False
        #: The job reports its own start and end (``Scheduler.submit``'s ``reports_end``).
        self.reports_end = reports_end
        self.owner = owner

    def __repr__(self) -> str:
        return f"<Ticket {self.level.name} {self.principal!r} {self.state.value}>"


def held(ticket: Ticket) -> bool:
    """Whether a queued ticket must not start yet: its owner's peer is not reading (writing paused)."""
    owner = ticket.owner
    return owner is not None and owner.writing_paused


class LevelQueue:
    """One level: a FIFO per principal served round-robin, plus the level's CoDel state.

    A principal is in ``fifos`` exactly when it is in ``ring``, once; its FIFO
    may be empty after a removal (dropped when the ring reaches it, or when
    ``empty`` outgrows the waiting tickets by ``_EMPTY_SLACK``: callers that
    queue a call and go away, from ever new addresses, must not grow the ring).
    ``arrivals`` holds the level's tickets in arrival order, for the oldest
    waiting one; tickets that left are dropped from it lazily, and it is
    compacted when mostly stale. Every ticket in a FIFO is QUEUED, except one
    just popped by ``pop()`` and about to be started or refused.
    """

    __slots__ = (
        "arrivals",
        "dropping",
        "empty",
        "fifos",
        "first_above",
        "left_at",
        "rate",
        "ring",
        "size",
        "window_count",
        "window_start",
    )

    def __init__(self) -> None:
        self.fifos: dict[str, deque[Ticket]] = {}
        self.ring: deque[str] = deque()
        self.arrivals: deque[Ticket] = deque()
        self.size = 0
        self.empty = 0  # FIFOs in ``fifos`` (and ``ring``) with nothing in them
        self.dropping = False
        self.first_above: float | None = None  # when a standing queue counts as overload
        self.left_at: float | None = None  # when dropping last stopped
        self.rate = 0.0  # jobs started per second, over the last full window
        self.window_start: float | None = None
        self.window_count = 0

    def depth(self, principal: str, skip_held: bool = False) -> int:
        """``principal``'s waiting tickets; with ``skip_held``, those not held (O(its tickets))."""
        fifo = self.fifos.get(principal)
        if fifo is None:
            return 0
        return len(fifo) if not skip_held else sum(1 for t in fifo if not held(t))

    def push(self, ticket: Ticket) -> None:
        fifo = self.fifos.get(ticket.principal)
        if fifo is None:
            fifo = self.fifos[ticket.principal] = deque()
            self.ring.append(ticket.principal)
        elif not fifo:
            self.empty -= 1
        fifo.append(ticket)
        self.size += 1
        self.arrivals.append(ticket)
        if len(self.arrivals) > 2 * self.size + 64:
            self.arrivals = deque(t for t in self.arrivals if t.state is TicketState.QUEUED)

    def pop(self) -> Ticket | None:
        """The next principal's oldest job, round-robin."""
        while self.ring:
            principal = self.ring.popleft()
            fifo = self.fifos[principal]
            if not fifo:
                del self.fifos[principal]
                self.empty -= 1
                continue
            ticket = fifo.popleft()
            self.size -= 1
            if fifo:
                self.ring.append(principal)
            else:
                del self.fifos[principal]
            return ticket
        return None

    def pop_ready(self) -> Ticket | None:
        """``pop``, passing over held tickets (``held``): they and their principals keep their places.

        O(principals + held tickets): used only while some owner's writing is paused.
        """
        ring, fifos = self.ring, self.fifos
        for index, principal in enumerate(ring):
            fifo = fifos[principal]
            ticket = next((t for t in fifo if not held(t)), None)
            if ticket is None:
                continue  # empty, or all held
            if fifo[0] is ticket:
                fifo.popleft()
            else:
                fifo.remove(ticket)  # Ticket has no __eq__: by identity
            del ring[index]
            self.size -= 1
            if fifo:
                ring.append(principal)
            else:
                del fifos[principal]
            return ticket
        return None

    def oldest(self, skip_held: bool = False) -> Ticket | None:
        """The oldest waiting ticket; with ``skip_held``, the oldest not held (O(held tickets))."""
        arrivals = self.arrivals
        while arrivals and arrivals[0].state is not TicketState.QUEUED:
            arrivals.popleft()
        if not skip_held or not arrivals:
            return arrivals[0] if arrivals else None
        return next((t for t in arrivals if t.state is TicketState.QUEUED and not held(t)), None)

    def remove(self, ticket: Ticket) -> None:
        fifo = self.fifos[ticket.principal]
        if fifo[0] is ticket:  # its principal's oldest: the usual case
            fifo.popleft()
        else:
            fifo.remove(ticket)
        self.size -= 1
        if not fifo:
            self.empty += 1
            if self.empty > self.size + _EMPTY_SLACK:  # O(ring), paid for by the removals since the last
                self._drop_empty()

    def _drop_empty(self) -> None:
        fifos = self.fifos
        self.ring = deque(p for p in self.ring if fifos[p])
        self.fifos = {p: fifos[p] for p in self.ring}
        self.empty = 0

    def pop_newest_of_longest(self, longer_than: int) -> Ticket | None:
        """The newest job of the longest FIFO among the next few principals, if longer than given."""
        longest: deque[Ticket] | None = None
        seen = 0
        for looked, principal in enumerate(self.ring):
            if looked == _PUSH_OUT_LOOK:
                break
            fifo = self.fifos[principal]
            if not fifo:
                continue
            if len(fifo) > longer_than and (longest is None or len(fifo) > len(longest)):
                longest = fifo
            seen += 1
            if seen == _PUSH_OUT_SAMPLE:
                break
        if longest is None:
            return None
        self.size -= 1
        return longest.pop()

    def start_rate(self, now: float, window: float) -> float:
        """Jobs started per second, over the last full window, closing the open one if it is full.

        A start closes a full window (``count_start``), but a stalled level starts
        nothing, and inline starts are counted without a clock reading: without
        this, the rate of a busy spell would hold through the stall after it.
        """
        start = self.window_start
        if start is not None and now - start >= window:
            self.rate = self.window_count / (now - start)
            self.window_start, self.window_count = now, 0
        return self.rate

    def count_start(self, now: float, window: float) -> None:
        if self.window_start is None:
            self.window_start = now
        self.window_count += 1
        self.start_rate(now, window)  # closes the window once it is full
