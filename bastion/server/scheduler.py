"""Call scheduling in front of dispatch: priority levels, fair queues, load shedding.

Theory of operation. Every admitted call is handed to one server-wide
``Scheduler`` as a *job* (a no-argument coroutine function) and gets a
``Ticket`` back. At most ``max_concurrency`` jobs run at once; the rest wait.

* Levels. A call's priority (``effective_priority``: the method's declared
  priority, lowered but never raised by the caller) maps to one of three
  levels: CONTROL (>= ``control_min_priority``: health, admin), INTERACTIVE
  (>= ``interactive_min_priority``) and BATCH (below). A free slot goes to the
  highest level with a waiting job. CONTROL may also use ``control_reserve``
  slots beyond ``max_concurrency``, so a health check is answered even when
  every ordinary slot is held by a slow call.
* Fairness. Within a level each principal has its own FIFO and principals are
  served round-robin (deficit round robin with unit cost), so a client with a
  thousand queued calls delays another client's call by one call per round,
  not by a thousand.
* Bounds. At most ``principal_queue_limit`` waiting jobs per principal per
  level, and ``queue_limit`` per level. Past the per-principal bound a call is
  refused at once (RESOURCE_EXHAUSTED + retry-after). When a level is full, the
  newest job of the longest queue among the next few principals in the ring
  is pushed out instead, if that queue is longer than the newcomer's by two or
  more; otherwise the newcomer is refused.
* Deadlines. A job whose deadline has passed is answered DEADLINE_EXCEEDED
  when it is submitted, when it reaches the head of its queue or is shed, or
  when its submitter calls ``expire`` (the session does at the deadline); it
  never runs. The scheduler keeps no timer: the session's deadline slots do.
* Shedding (CoDel-style), for INTERACTIVE and BATCH; CONTROL is never shed.
  Detection is CoDel's: the signal is the queueing delay of the level's
  oldest waiting job, looked at on every dispatch and every submission that
  has to wait; when it has stayed at or above ``codel_target`` for a whole
  ``codel_interval`` (a standing queue, not a burst) the level enters the
  *dropping* state. It leaves it once that delay is below half the target, or
  when a slot is free and nothing waits; a level that relapses within a few
  intervals re-enters at once. While a level is dropping, lowest levels first:
  (1) a newcomer to a level *below* a dropping one is refused at once (it
  would only wait to be shed), and a newcomer to the dropping level itself is
  refused at once when its queue already holds what the level starts in
  ``codel_target`` (starts per second x target: Little's law) -- unless, as
  when a level is full, a principal queued longer than the newcomer's by two
  or more gives up its newest job instead (a flood must not crowd out a
  light caller's calls); (2) when a slot
  frees, jobs of the dropping level and of every level below it that have
  waited twice the target are shed, oldest first, keeping enough to fill the
  free slots. Shed and refused calls get UNAVAILABLE + retry-after at once.
  Unlike packet CoDel there is no gradual drop rate: RPC clients do not back
  off on one drop as TCP does, each refusal carries a retry-after, and
  refusing at arrival answers at once instead of after a wait. Under
  sustained overload the slots never idle, admitted calls wait about
  ``codel_target`` (at most twice that; target + interval at the onset), and
  most of the excess is refused on arrival, the rest once it has waited twice
  the target (tests/server/test_scheduler.py simulates 3x overload).
* Held jobs. A job may have an *owner* (``submit(owner=...)``: the session
  passes its Link) whose ``writing_paused`` says its peer has stopped reading.
  While it is paused, the owner's queued jobs are not started: their answers
  could not be sent, and would wait in their slots. Picks pass over them
  (``LevelQueue.pop_ready``); they and their principals keep their places,
  their deadlines still expire, and once writing resumes (``owner_paused``) a
  dispatch starts them in turn. CoDel measures the oldest job not held, and a
  level where only held jobs wait leaves the dropping state at the next
  dispatch. Held jobs still count in ``queued``, in the queue bounds, in the
  "queue already holds what the level starts" test and in what shedding keeps
  for free slots; and while any are queued a new call is queued and then
  dispatched at once, not started on the direct path (nor inline). Once
  resumed, held jobs count the time they were held as queueing delay: many
  of them can start the dropping state, and are the first shed (oldest).
  None of this runs while no owner is paused (``_paused`` is 0): a connection
  that reads costs one more argument to ``submit``.
* Cost. ``submit``, ``cancel`` and each dispatch step are O(1) amortised
  (``cancel`` is O(queue of that principal)); no timers, no background task.

Everything runs on the event loop thread; ``submit`` is synchronous so the
session can call it from ``data_received``. Callbacks (``on_reject``,
``on_done``) are called synchronously, possibly while *another* session's
call is being submitted (a pushed-out or shed victim); they must not call back
into the scheduler, and exceptions they raise are logged and swallowed.

Integration with ``ServerSession`` (bastion/server/session.py, as of writing):

1. The server owns one ``Scheduler(config)`` (``server.scheduler``), built
   from a ``[scheduler]`` config section (``SchedulerConfig``, in schedconfig.py); one for the
   whole server, since ``max_concurrency`` and fairness are server-wide.
2. The session keeps ``self.tickets: dict[int, Ticket]`` where it keeps
   ``self.tasks``. In ``_on_call`` the ``create_task`` + ``_track`` lines become::

       ticket = self.server.scheduler.submit(
           functools.partial(self._run, call, entry, args, deadline),
           priority=effective_priority(entry.spec.priority, call.priority),
           principal=self.principal.name,  # anonymous callers: key by peer host instead
           deadline=deadline,              # time.monotonic() based, as today
           on_reject=functools.partial(self._rejected, call.id),
           on_done=functools.partial(self._ticket_done, call.id),
       )
       if ticket.state is not TicketState.REJECTED:
           self.tickets[call.id] = ticket
           self._queued.add(call.id)       # read backpressure counts scheduler-queued calls

   ``on_reject`` may run inside ``submit`` (before the ticket is stored) or
   later, from another call's dispatch. ``_rejected(call_id, status, message,
   retry_after)`` sends ``core.send_error(call_id, status, message,
   retry_after_ms=ceil(retry_after * 1000) if retry_after else None)``,
   schedules a flush and forgets the call (pop it from ``tickets``,
   ``_queued`` via ``_started``, ``_inputs``, ``_gates`` (closing the gate),
   then ``_maybe_finish_drain`` if draining). ``_ticket_done(call_id)`` is
   today's ``_task_done`` without the task argument: ``on_done`` runs for every
   started job, also one cancelled before its first step, whose ``finally``
   never runs; ``_run``'s ``finally`` keeps popping ``tickets`` instead of
   ``tasks``.
3. Cancel from the client: ``ticket = self.tickets.get(id)``; if set,
   ``self.server.scheduler.cancel(ticket)``; if the ticket was still queued
   (its state is now ``TicketState.CANCELLED``) forget the call as above:
   nothing ran, the core has already closed the call, so nothing is sent.
4. ``on_close``, ``abort``, revalidation, ``_check_idle`` and
   ``_maybe_finish_drain`` use ``self.tickets`` where they use ``self.tasks``,
   and ``scheduler.cancel(ticket)`` where they call ``task.cancel()`` (a queued
   job is removed, a running one cancelled). ``on_close`` must cancel queued
   tickets too, or they would start for a closed connection.
5. Long-lived streams: a server or bidirectional stream holds its slot for its
   whole life. To keep subscriptions from filling ``max_concurrency``, call
   ``scheduler.detach(ticket)`` once the stream is established (e.g. when
   ``_invoke`` sends its first item): the slot is freed, the task runs on.
6. ``scheduler.stats()`` goes into the server's stats; the config section's
   limits into ``ServerInfo.limits()`` and docs/security.md.
"""

from __future__ import annotations

import asyncio
import contextvars
import functools
import logging
import time
from collections.abc import Callable
from typing import Any, cast

from bastion.server.schedconfig import SchedulerConfig, effective_priority
from bastion.server.tickets import Job, Level, LevelQueue, OnReject, Owner, ReportingJob, Ticket, TicketState
from bastion.status import Status

__all__ = ["Job", "Level", "OnReject", "Scheduler", "SchedulerConfig", "Ticket", "TicketState", "effective_priority"]

log = logging.getLogger("bastion.server")

_REENTER_INTERVALS = 8  # dropping again this soon after leaving skips the interval wait
_MAX_CACHED_PRIORITIES = 256  # a caller may send any integer (docs/protocol.md, 6.6): cache a few
_EWMA_WEIGHT = 0.1


_SERVICE_ORDER = (Level.CONTROL, Level.INTERACTIVE, Level.BATCH)
_SHEDDABLE = (Level.INTERACTIVE, Level.BATCH)  # highest first
_CONTROL = Level.CONTROL
#: The name of a job's task. asyncio names an unnamed task "Task-N", formatting a string for each one
#: (3.11: about 1,400 instructions per call); jobs' tasks share this one.
JOB_TASK_NAME = "bastion-job"


_RUNNING, _DONE = TicketState.RUNNING, TicketState.DONE


class Scheduler:
    """Decides which admitted call runs next, and which are refused (see the module docstring)."""

    def __init__(self, config: SchedulerConfig | None = None, *, clock: Callable[[], float] = time.monotonic) -> None:
        self.config = config or SchedulerConfig()
        self._clock = clock
        self._queues = {level: LevelQueue() for level in Level}
        self._queued = 0
        self._running = 0
        #: CoDel state may be set (a queue formed since the last time a free slot found none).
        self._codel_dirty = False
        self._counts = dict.fromkeys(
            (
                "submitted",
                "started",
                "completed",
                "cancelled",
                "rejected_deadline",
                "rejected_principal_limit",
                "rejected_queue_full",
                "rejected_shed",
            ),
            0,
        )
        self._delay_last = self._delay_ewma = self._delay_max = 0.0
        self._inline = 0  # jobs run by run_inline
        self._loop: asyncio.AbstractEventLoop | None = None  # the loop jobs run on (the first one's)
        self._levels: dict[int, Level] = {}  # priority -> level, for the first priorities seen (_level_of)
        self._paused = 0  # owners whose writing is paused: their queued jobs are held (owner_paused)
        self._nudged = False  # a dispatch is scheduled for a resumed owner's held jobs

    def level_for(self, priority: int) -> Level:
        return self.config.level_for(priority)

    def _level_of(self, priority: int) -> Level:
        """``level_for``, remembered for the first few priorities seen: callers choose theirs (any
        integer below the method's), so remembering every one would grow without limit."""
        level = self.config.level_for(priority)
        if len(self._levels) < _MAX_CACHED_PRIORITIES:
            self._levels[priority] = level
        return level

    # -- the API the session uses -------------------------------------------------------------

    def submit(
        self,
        job: Job | ReportingJob,
        *,
        priority: int,
        principal: str,
        deadline: float | None,
        on_reject: OnReject,
        on_done: Callable[[], None] | None = None,
        reports_end: bool = False,
        owner: Owner | None = None,
    ) -> Ticket:
        """Start ``job`` now, queue it, or refuse it through ``on_reject`` before returning.

        ``deadline`` is on the scheduler's clock (``time.monotonic`` by default).
        ``on_done`` is called once the started job has ended, however it ended (one
        cancelled before its first step: once its task is done).

        ``reports_end``: ``job`` is a ``ReportingJob``, called with its ticket, whose
        coroutine sets ``ticket.started`` in its first step and calls ``finished(ticket)``
        when it ends, however it ends (except when closed unfinished: its loop went away),
        and logs what it raises itself: its task runs it directly, without the coroutine
        that does this for a plain job (one level less on each of its steps).

        ``owner``: while its ``writing_paused`` is true the job, if queued, is not
        started (held: see the module docstring); its pauses are reported through
        ``owner_paused``.
        """
        now = self._clock()
        level = self._levels.get(priority)
        if level is None:
            level = self._level_of(priority)
        ticket = Ticket(job, level, principal, deadline, on_reject, on_done, now, reports_end, owner)
        self._counts["submitted"] += 1
        if deadline is not None and deadline <= now:
            self._reject(ticket, "deadline", Status.DEADLINE_EXCEEDED, "deadline passed before the call started")
        elif level is _CONTROL:
            if self._may_start_now(level):
                self._start(ticket, now)
            else:
                self._enqueue(ticket, now)
        elif self._running < self.config.max_concurrency and not self._queued:  # _may_start_now, inline
            # _start for a job that waited for nothing (its delay is 0), as run_inline counts one
            self._delay_last = 0.0
            self._delay_ewma -= _EWMA_WEIGHT * self._delay_ewma
            queue = self._queues[level]
            start = queue.window_start  # count_start, inline while its window is open
            if start is not None and now - start < self.config.codel_interval:
                queue.window_count += 1
            else:
                queue.count_start(now, self.config.codel_interval)
            self._launch(ticket)
        else:
            self._enqueue(ticket, now)
        return ticket

    def run_inline(self, priority: int) -> bool:
        """Admit a job that ends before control returns to the loop (a handler that cannot suspend),
        counted as started and completed at once, if it may start now; False: ``submit`` it.

        It may start when ``submit`` would start it (a free slot, nobody queued at a
        sheddable level): it holds its slot for no loop turn at all, so nothing else
        could have used it. Control-level jobs keep their reserved path.
        """
        level = self._levels.get(priority)
        if level is None:
            level = self._level_of(priority)
        if level is _CONTROL or self._queued or self._running >= self.config.max_concurrency:
            return False
        self._inline += 1  # submitted, started and completed (stats() adds them in)
        self._delay_last = 0.0
        self._delay_ewma -= _EWMA_WEIGHT * self._delay_ewma
        queue = self._queues[level]
        if queue.window_start is not None:  # count_start without a clock reading: the next one
            queue.window_count += 1  # closes the window, over the time it really took
        else:
            queue.count_start(self._clock(), self.config.codel_interval)
        if self._codel_dirty:  # as _finished would: a free slot and nobody waiting ends any overload
            self._dispatch()
        return True

    def cancel(self, ticket: Ticket) -> bool:
        """Remove a queued job (never run, ``on_reject`` not called) or cancel a running one's task."""
        if ticket.state is TicketState.QUEUED:
            self._queues[ticket.level].remove(ticket)
            self._queued -= 1
            ticket.state = TicketState.CANCELLED
            self._counts["cancelled"] += 1
            return True
        task = ticket.task
        if ticket.state is TicketState.RUNNING and task is not None:
            if not ticket.started and not task.done():  # it will never run _run_job's finally
                task.add_done_callback(functools.partial(self.finished, ticket))
            return task.cancel()
        return False

    def expire(self, ticket: Ticket) -> None:
        """A queued job's deadline has passed: refuse it DEADLINE_EXCEEDED now (else a no-op)."""
        if ticket.state is TicketState.QUEUED:
            self._queues[ticket.level].remove(ticket)
            self._queued -= 1
            self._reject(ticket, "deadline", Status.DEADLINE_EXCEEDED, "deadline passed while the call was queued")

    def detach(self, ticket: Ticket) -> None:
        """Free a running job's slot early; its task runs on (long-lived streams)."""
        if ticket.state is TicketState.RUNNING and not ticket.detached:
            ticket.detached = True
            self._running -= 1
            self._dispatch()

    def owner_paused(self, paused: bool) -> None:
        """An owner's writing has paused (True), or resumed or ended while paused (False).

        On resume its held jobs may start: a dispatch at the next loop turn, as this may
        be called from inside one (a transport's write).
        """
        if paused:
            self._paused += 1
            return
        self._paused -= 1
        if self._queued and not self._nudged:
            asyncio.get_running_loop().call_soon(self._nudge)
            self._nudged = True  # (after: were call_soon to raise, later resumes would still nudge)

    def _nudge(self) -> None:
        self._nudged = False
        if self._queued:
            self._dispatch()

    def stats(self) -> dict[str, int | float]:
        out: dict[str, int | float] = {"running": self._running, "queued": self._queued}
        for level in Level:
            out[f"queued_{level.name.lower()}"] = self._queues[level].size
        out.update(self._counts)
        for key in ("submitted", "started", "completed"):
            out[key] += self._inline
        out["delay_last"] = self._delay_last
        out["delay_ewma"] = self._delay_ewma
        out["delay_max"] = self._delay_max
        for level in _SHEDDABLE:
            out[f"overloaded_{level.name.lower()}"] = int(self._queues[level].dropping)
        return out

    # -- admission -------------------------------------------------------------------------------

    def _may_start_now(self, level: Level) -> bool:
        cfg = self.config
        if level is Level.CONTROL:
            return self._running < cfg.max_concurrency + cfg.control_reserve and not self._queues[level].size
        # Slots are refilled as soon as they free, so a free slot means nothing is waiting for it.
        return self._running < cfg.max_concurrency and not self._queued

    def _enqueue(self, ticket: Ticket, now: float) -> None:
        cfg = self.config
        level, name = ticket.level, ticket.level.name.lower()
        queue = self._queues[level]
        # Held tickets (a paused connection's) are not counted: the caller's other connections must not be
        # refused, with slots free, behind calls that wait on a peer that is not reading.
        mine = queue.depth(ticket.principal, self._paused > 0)
        if mine >= cfg.principal_queue_limit:
            self._reject(
                ticket,
                "principal_limit",
                Status.RESOURCE_EXHAUSTED,
                f"too many calls queued for this caller (limit {cfg.principal_queue_limit})",
                cfg.retry_after,
            )
            return
        if level is not Level.CONTROL:
            self._codel(now, None)  # notices a standing queue even while no slot frees
            if self._refuse_under_overload(queue, ticket, now):
                self._reject(
                    ticket, "shed", Status.UNAVAILABLE, f"server overloaded: shedding {name} calls", cfg.retry_after
                )
                return
        if queue.size >= cfg.queue_limit:
            full = f"server busy: the {name} queue is full"
            if not self._push_out(queue, ticket, "queue_full", Status.RESOURCE_EXHAUSTED, full):
                self._reject(ticket, "queue_full", Status.RESOURCE_EXHAUSTED, full, cfg.retry_after)
                return
        ticket.context = contextvars.copy_context()
        queue.push(ticket)
        self._queued += 1
        # The _codel above may have set overload state, and cancels may empty the queue with
        # no dispatch: the next free slot must still find the state and clear it.
        self._codel_dirty = True
        if self._paused:  # held jobs keep _queued above 0 with slots free: nothing else would start this one
            self._dispatch()

    def _refuse_under_overload(self, queue: LevelQueue, ticket: Ticket, now: float) -> bool:
        level = ticket.level
        if any(self._queues[above].dropping for above in _SHEDDABLE if above > level):
            return True  # below a dropping level a newcomer would only wait to be shed
        cfg = self.config
        if queue.dropping and queue.size >= max(1.0, queue.start_rate(now, cfg.codel_interval) * cfg.codel_target):
            # Full for what the level starts within the target (Little's law): room only at a heavier caller's cost.
            shed = f"server overloaded: shedding {level.name.lower()} calls"
            return not self._push_out(queue, ticket, "shed", Status.UNAVAILABLE, shed)
        return False

    def _push_out(self, queue: LevelQueue, ticket: Ticket, reason: str, status: Status, message: str) -> bool:
        """Refuse the newest job of a principal with 2+ more queued than ``ticket``'s, for room; False if none has."""
        pushed = queue.pop_newest_of_longest(queue.depth(ticket.principal) + 1)
        if pushed is None:
            return False
        self._queued -= 1
        self._reject(pushed, reason, status, message, self.config.retry_after)
        return True

    def _reject(
        self, ticket: Ticket, reason: str, status: Status, message: str, retry_after: float | None = None
    ) -> None:
        ticket.state = TicketState.REJECTED
        self._counts[f"rejected_{reason}"] += 1
        try:
            ticket.on_reject(status, message, retry_after)
        except Exception:
            log.exception("scheduler: on_reject callback failed")

    # -- running -----------------------------------------------------------------------------------

    def _start(self, ticket: Ticket, now: float) -> None:
        delay = now - ticket.enqueued_at
        self._delay_last = delay
        self._delay_ewma += _EWMA_WEIGHT * (delay - self._delay_ewma)
        if delay > self._delay_max:
            self._delay_max = delay
        level = ticket.level
        if level is not _CONTROL:
            self._queues[level].count_start(now, self.config.codel_interval)
        self._launch(ticket)

    def _launch(self, ticket: Ticket) -> None:
        """Run a job now, in a task of its own (``_start``'s second half)."""
        ticket.state = _RUNNING
        self._running += 1
        self._counts["started"] += 1
        try:
            # A queued job runs in its submitter's context, not in that of the job whose end started it.
            loop = self._loop
            if loop is None or not loop.is_running():  # get_running_loop() makes a getpid() call on 3.11
                loop = self._loop = asyncio.get_running_loop()
            job: Any = ticket.job  # a ReportingJob if reports_end (typing.cast would be a call per job)
            coro = job(ticket) if ticket.reports_end else self._run_job(ticket)
            if loop.get_task_factory() is None:  # create_task's own path, without naming it "Task-N"
                ticket.task = asyncio.Task(coro, loop=loop, name=JOB_TASK_NAME, context=ticket.context)
            else:
                ticket.task = loop.create_task(coro, name=JOB_TASK_NAME, context=ticket.context)
        except Exception:
            log.exception("scheduler: could not start a job")
            self._running -= 1
            ticket.state = _DONE
            self._counts["completed"] += 1

    async def _run_job(self, ticket: Ticket) -> None:
        """A started job, reporting its end itself: no done-callback (another loop turn) per job.

        A task cancelled before its first step never runs this body, so ``cancel`` adds a
        done-callback for exactly that case.
        """
        ticket.started = True
        ended = True
        try:
            await cast(Job, ticket.job)()
        except GeneratorExit:
            ended = False  # closed unfinished as its loop went away: nothing runs any more
            raise
        except Exception:
            log.exception("scheduler: a job raised")
        finally:
            if ended:
                self.finished(ticket)

    def finished(self, ticket: Ticket, task: object = None) -> None:
        """A started job has ended (a ``reports_end`` job says so itself; else its wrapper or, for one
        cancelled before its first step, its task's done-callback); a second report is ignored."""
        if ticket.state is _DONE:
            return  # reported already
        ticket.state = _DONE
        self._counts["completed"] += 1
        if not ticket.detached:
            self._running -= 1
        if ticket.on_done is not None:
            try:
                ticket.on_done()
            except Exception:
                log.exception("scheduler: on_done callback failed")
        if self._queued or self._codel_dirty:
            self._dispatch()

    def _dispatch(self) -> None:
        now = self._clock()
        if self._queued:
            self._codel_dirty = True
            self._codel(now, self.config.max_concurrency - self._running - self._queues[Level.CONTROL].size)
            while (ticket := self._next(now)) is not None:
                self._start(ticket, now)
        if self._running < self.config.max_concurrency and not self._queued:
            self._codel_dirty = False
            for level in _SHEDDABLE:  # a free slot and nobody waiting: no overload anywhere
                queue = self._queues[level]
                if queue.dropping or queue.first_above is not None:
                    self._stop_dropping(queue, now)

    def _next(self, now: float) -> Ticket | None:
        """The next job to start; jobs past their deadline are refused on the way."""
        cfg = self.config
        for level in _SERVICE_ORDER:
            cap = cfg.max_concurrency + (cfg.control_reserve if level is Level.CONTROL else 0)
            if self._running >= cap:
                return None
            queue = self._queues[level]
            while (ticket := queue.pop_ready() if self._paused else queue.pop()) is not None:
                self._queued -= 1
                if ticket.deadline is not None and ticket.deadline <= now:
                    self._reject(
                        ticket, "deadline", Status.DEADLINE_EXCEEDED, "deadline passed while the call was queued"
                    )
                    continue
                return ticket
        return None

    # -- CoDel ---------------------------------------------------------------------------------------

    def _codel(self, now: float, free: int | None) -> None:
        """Update each sheddable level's state; with ``free`` slots about to be filled, shed too.

        Only a dispatch (``free`` given) may end the dropping state: between
        dispatches the oldest waiting job may be one just admitted, whose short
        wait says nothing yet. Shedding applies to dropping levels and every
        level below one, and keeps enough jobs to fill the free slots.
        """
        above_dropping = False
        for level in _SHEDDABLE:  # highest first
            queue = self._queues[level]
            self._observe(queue, now, may_leave=free is not None)
            if free is not None:
                if queue.dropping or above_dropping:
                    self._trim(queue, now, keep=max(0, free))
                free -= queue.size
            above_dropping = above_dropping or queue.dropping

    def _observe(self, queue: LevelQueue, now: float, *, may_leave: bool) -> None:
        oldest = queue.oldest(self._paused > 0)
        if oldest is None:  # nothing waits but held jobs, if any: no delay
            if may_leave and self._paused and (queue.dropping or queue.first_above is not None):
                self._stop_dropping(queue, now)
            return
        cfg = self.config
        delay = now - oldest.enqueued_at
        if queue.dropping:
            if may_leave and delay < cfg.codel_target / 2:
                self._stop_dropping(queue, now)
        elif delay < cfg.codel_target:
            queue.first_above = None
        elif queue.first_above is None:
            recently = queue.left_at is not None and now - queue.left_at < _REENTER_INTERVALS * cfg.codel_interval
            if recently:
                queue.dropping = True
            else:
                queue.first_above = now + cfg.codel_interval
        elif now >= queue.first_above:
            queue.dropping = True

    def _trim(self, queue: LevelQueue, now: float, keep: int) -> None:
        """Shed the level's jobs that have waited twice the target or longer, oldest first, down to ``keep``."""
        cfg = self.config
        while (
            queue.size > keep
            and (oldest := queue.oldest(self._paused > 0)) is not None
            and now - oldest.enqueued_at >= 2 * cfg.codel_target
        ):
            queue.remove(oldest)
            self._queued -= 1
            if oldest.deadline is not None and oldest.deadline <= now:
                self._reject(oldest, "deadline", Status.DEADLINE_EXCEEDED, "deadline passed while the call was queued")
            else:
                self._reject(
                    oldest, "shed", Status.UNAVAILABLE, "server overloaded: the call waited too long", cfg.retry_after
                )

    @staticmethod
    def _stop_dropping(queue: LevelQueue, now: float) -> None:
        queue.first_above = None
        if queue.dropping:
            queue.dropping = False
            queue.left_at = now
