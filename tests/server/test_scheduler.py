"""The call scheduler (bastion/server/scheduler.py): levels, fairness, bounds, deadlines, CoDel shedding.

Pure asyncio, no sockets. Most tests run with ``max_concurrency=1`` and jobs
that wait on a semaphore, so the test decides when each job finishes
(``Harness.step``), and with an injected clock, so queueing delays are exact.
"""

from __future__ import annotations

import asyncio
import contextvars
import functools
import logging
import math
import random
from collections.abc import Awaitable, Callable
from typing import Any

import msgspec
import pytest

from bastion.exceptions import UsageError
from bastion.server.scheduler import Level, Scheduler, SchedulerConfig, Ticket, TicketState, effective_priority
from bastion.status import Status

CONTROL, INTERACTIVE, BATCH = 10, 0, -1  # priorities that map to each level by default


def run(test: Callable[[], Awaitable[None]]) -> None:
    async def guarded() -> None:
        await asyncio.wait_for(test(), 10)

    asyncio.run(guarded())


async def settle() -> None:
    """Let finished tasks' done-callbacks run and newly started tasks take their first steps."""
    for _ in range(8):
        await asyncio.sleep(0)


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class Harness:
    """A scheduler on a fake clock, and jobs that record what happened to them."""

    def __init__(self, **config: Any) -> None:
        config.setdefault("max_concurrency", 1)
        config.setdefault("control_reserve", 0)
        self.clock = FakeClock()
        self.scheduler = Scheduler(SchedulerConfig(**config), clock=self.clock)
        self.ran: list[str] = []
        self.started_at: dict[str, float] = {}
        self.rejected: dict[str, tuple[Status, str, float | None]] = {}
        self.rejected_at: dict[str, float] = {}
        self.finished: list[str] = []
        self.gate = asyncio.Semaphore(0)

    def submit(
        self,
        name: str,
        priority: int = INTERACTIVE,
        principal: str = "p",
        deadline: float | None = None,
        *,
        hold: bool = True,
    ) -> Ticket:
        async def job() -> None:
            self.ran.append(name)
            self.started_at[name] = self.clock.now
            if hold:
                await self.gate.acquire()

        def on_reject(status: Status, message: str, retry_after: float | None) -> None:
            assert name not in self.rejected, f"{name} rejected twice"
            self.rejected[name] = (status, message, retry_after)
            self.rejected_at[name] = self.clock.now

        return self.scheduler.submit(
            job,
            priority=priority,
            principal=principal,
            deadline=deadline,
            on_reject=on_reject,
            on_done=lambda: self.finished.append(name),
        )

    async def step(self, advance: float = 0.0) -> None:
        """Advance the clock, let the running job finish and the next one start."""
        self.clock.now += advance
        self.gate.release()
        await settle()

    async def drain(self, advance: float = 0.0) -> None:
        while self.stats["running"] or self.stats["queued"]:
            await self.step(advance)

    @property
    def stats(self) -> dict[str, int | float]:
        return self.scheduler.stats()

    def status(self, name: str) -> Status:
        return self.rejected[name][0]


# -- levels and configuration ---------------------------------------------------------------


def test_the_caller_may_lower_a_methods_priority_but_never_raise_it() -> None:
    assert effective_priority(10, None) == 10
    assert effective_priority(10, 3) == 3
    assert effective_priority(0, 5) == 0
    assert effective_priority(-1, -5) == -5


def test_priorities_map_to_levels() -> None:
    config = SchedulerConfig()
    assert [config.level_for(p) for p in (100, 10, 9, 0, -1, -100)] == [
        Level.CONTROL,
        Level.CONTROL,
        Level.INTERACTIVE,
        Level.INTERACTIVE,
        Level.BATCH,
        Level.BATCH,
    ]
    shifted = SchedulerConfig(control_min_priority=5, interactive_min_priority=-3)
    assert [shifted.level_for(p) for p in (5, 4, -3, -4)] == [
        Level.CONTROL,
        Level.INTERACTIVE,
        Level.INTERACTIVE,
        Level.BATCH,
    ]


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"max_concurrency": 0}, "max_concurrency must be positive"),
        ({"queue_limit": -1}, "queue_limit must be positive"),
        ({"principal_queue_limit": 0}, "principal_queue_limit must be positive"),
        ({"codel_target": 0.0}, "codel_target must be positive"),
        ({"codel_interval": -0.1}, "codel_interval must be positive"),
        ({"retry_after": 0}, "retry_after must be positive"),
        ({"retry_after": math.inf}, "retry_after must be positive and finite"),
        ({"codel_target": math.nan}, "codel_target must be positive and finite"),
        ({"codel_interval": math.inf}, "codel_interval must be positive and finite"),
        ({"control_reserve": -1}, "control_reserve must not be negative"),
        ({"control_min_priority": 0, "interactive_min_priority": 0}, "control_min_priority must be above"),
    ],
)
def test_bad_scheduler_config_is_a_usage_error(fields: dict[str, Any], message: str) -> None:
    with pytest.raises(UsageError, match=message):
        SchedulerConfig(**fields)
    with pytest.raises(UsageError, match=message):
        msgspec.convert(fields, SchedulerConfig)  # as the TOML/env loader builds it


def test_unknown_scheduler_config_keys_are_refused() -> None:
    with pytest.raises(msgspec.ValidationError, match="unknown field `max_queue`"):
        msgspec.convert({"max_queue": 5}, SchedulerConfig)


# -- starting and ordering ------------------------------------------------------------------


def test_a_free_slot_starts_the_job_at_once_and_the_ticket_holds_its_task() -> None:
    async def body() -> None:
        h = Harness(max_concurrency=2)
        first, second, third = h.submit("a"), h.submit("b"), h.submit("c")
        assert first.state is second.state is TicketState.RUNNING
        assert isinstance(first.task, asyncio.Task)
        assert third.state is TicketState.QUEUED and third.task is None
        await h.drain()
        assert h.ran == ["a", "b", "c"] and sorted(h.finished) == ["a", "b", "c"]
        assert first.state in {TicketState.DONE}  # (a set: mypy keeps the RUNNING narrowing above)

    run(body)


def test_higher_levels_run_first_fifo_within_a_level() -> None:
    async def body() -> None:
        h = Harness()
        h.submit("blocker")
        for name, priority in [
            ("b1", BATCH),
            ("i1", INTERACTIVE),
            ("c1", CONTROL),
            ("b2", BATCH),
            ("i2", 5),
            ("c2", 50),
        ]:
            h.submit(name, priority)
        await h.drain()
        assert h.ran == ["blocker", "c1", "c2", "i1", "i2", "b1", "b2"]

    run(body)


def test_control_calls_use_reserved_slots_when_every_ordinary_slot_is_busy() -> None:
    async def body() -> None:
        h = Harness(max_concurrency=1, control_reserve=1)
        h.submit("slow")
        assert h.submit("health", CONTROL).state is TicketState.RUNNING
        assert h.submit("second health", CONTROL).state is TicketState.QUEUED  # reserve used up
        assert h.submit("work", INTERACTIVE).state is TicketState.QUEUED
        assert h.stats["running"] == 2
        await h.drain()
        assert h.ran == ["slow", "health", "second health", "work"]

    run(body)


# -- fairness ----------------------------------------------------------------------------------


def test_principals_are_served_round_robin_within_a_level() -> None:
    async def body() -> None:
        h = Harness()
        h.submit("blocker", principal="z")
        for name in ("a1", "a2", "a3", "a4"):
            h.submit(name, principal="a")
        h.submit("b1", principal="b")
        h.submit("b2", principal="b")
        h.submit("c1", principal="c")
        await h.drain()
        assert h.ran == ["blocker", "a1", "b1", "c1", "a2", "b2", "a3", "a4"]

    run(body)


def test_one_flooding_principal_does_not_starve_another() -> None:
    """A floods 1000 calls, then B sends 10: B's finish long before A's backlog drains."""

    async def body() -> None:
        # Queueing is the point here: a generous CoDel target keeps shedding out of it.
        config = SchedulerConfig(max_concurrency=4, queue_limit=2000, principal_queue_limit=2000, codel_target=60)
        scheduler = Scheduler(config)
        completed: list[str] = []
        rejected: list[Status] = []
        all_done = asyncio.Event()

        async def job(principal: str) -> None:
            await asyncio.sleep(0.002)
            completed.append(principal)
            if len(completed) == 1010:
                all_done.set()

        for principal, count in (("A", 1000), ("B", 10)):
            for _ in range(count):
                scheduler.submit(
                    functools.partial(job, principal),
                    priority=INTERACTIVE,
                    principal=principal,
                    deadline=None,
                    on_reject=lambda status, *_: rejected.append(status),
                )
        await all_done.wait()
        assert not rejected
        last_b = max(i for i, who in enumerate(completed) if who == "B")
        assert last_b < 40, f"B's last call finished as call {last_b} of 1010"
        await settle()
        assert scheduler.stats()["running"] == 0

    run(body)


# -- bounds ------------------------------------------------------------------------------------


def test_a_principal_past_its_queue_limit_is_refused_at_once_with_retry_after() -> None:
    async def body() -> None:
        h = Harness(principal_queue_limit=3, retry_after=2.5)
        h.submit("blocker", principal="x")
        tickets = [h.submit(f"a{i}", principal="a") for i in range(4)]
        assert [t.state for t in tickets] == [TicketState.QUEUED] * 3 + [TicketState.REJECTED]
        status, message, retry_after = h.rejected["a3"]
        assert status is Status.RESOURCE_EXHAUSTED and retry_after == 2.5 and "limit 3" in message
        # The bound is per principal and per level: others, and A's other levels, still queue.
        assert h.submit("b0", principal="b").state is TicketState.QUEUED
        assert h.submit("a-batch", BATCH, principal="a").state is TicketState.QUEUED
        await h.drain()
        assert "a3" not in h.ran and h.stats["rejected_principal_limit"] == 1

    run(body)


def test_a_full_level_pushes_out_the_longest_queue_before_refusing_a_newcomer() -> None:
    async def body() -> None:
        h = Harness(queue_limit=5, principal_queue_limit=10)
        h.submit("blocker", principal="x")
        for i in range(4):
            h.submit(f"a{i}", principal="a")
        h.submit("b0", principal="b")  # level full: a0-a3, b0
        # C has nothing queued and A has 4: A's newest call makes room for C's.
        assert h.submit("c0", principal="c").state is TicketState.QUEUED
        assert h.status("a3") is Status.RESOURCE_EXHAUSTED and h.rejected["a3"][2] == 1.0
        # A (3 queued) gains nothing by pushing out B or C (1 each): A's newcomer is refused.
        assert h.submit("a4", principal="a").state is TicketState.REJECTED
        assert h.status("a4") is Status.RESOURCE_EXHAUSTED and "queue is full" in h.rejected["a4"][1]
        # Another level has its own bound.
        assert h.submit("ctl", CONTROL, principal="a").state is TicketState.QUEUED
        await h.drain()
        assert h.ran == ["blocker", "ctl", "a0", "b0", "c0", "a1", "a2"]
        assert h.stats["rejected_queue_full"] == 2

    run(body)


# -- deadlines ---------------------------------------------------------------------------------


def test_calls_whose_deadline_passed_are_answered_and_never_run() -> None:
    async def body() -> None:
        h = Harness()
        now = h.clock.now
        h.submit("blocker")
        late = h.submit("late", deadline=now)  # already due at submission
        assert late.state is TicketState.REJECTED
        assert h.rejected["late"] == (Status.DEADLINE_EXCEEDED, "deadline passed before the call started", None)
        h.submit("expires", deadline=now + 1.0)
        h.submit("ctl-expires", CONTROL, deadline=now + 1.0)
        h.submit("no-deadline")
        h.submit("in-time", deadline=now + 60.0)
        await h.step(advance=2.0)  # the blocker ends after the first two deadlines
        await h.drain()
        assert h.ran == ["blocker", "no-deadline", "in-time"]
        assert h.status("expires") is h.status("ctl-expires") is Status.DEADLINE_EXCEEDED
        assert h.rejected["expires"][2] is None  # retrying will not help
        assert h.stats["rejected_deadline"] == 3

    run(body)


# -- CoDel shedding ------------------------------------------------------------------------------


async def overload_interactive(h: Harness) -> None:
    """Queue interactive work and serve it slowly until the interactive level is dropping."""
    for i in range(12):
        h.submit(f"i{i}", INTERACTIVE, principal="web")
    # One call per 30 ms step. The oldest waiting call is 30, 60 (>= the 50 ms target:
    # the interval starts), 90, ... ms old; 100 ms later (180 ms) the queue has stood
    # above target for a whole interval: a standing queue, not a burst.
    for _ in range(5):
        await h.step(advance=0.03)
        assert h.stats["overloaded_interactive"] == 0
    await h.step(advance=0.03)
    assert h.stats["overloaded_interactive"] == 1


def test_codel_sheds_batch_first_and_never_control() -> None:
    async def body() -> None:
        h = Harness(codel_target=0.05, codel_interval=0.1, retry_after=1.5)
        h.submit("i-head", INTERACTIVE, principal="web")
        for i in range(3):
            h.submit(f"b{i}", BATCH, principal="cron")
        await overload_interactive(h)
        # Entering the dropping state shed the calls that had waited twice the target:
        # every batch call, and interactive ones except the one the free slot needed.
        assert h.ran == ["i-head", "i0", "i1", "i2", "i3", "i4", "i11"]
        assert [h.status(f"b{i}") for i in range(3)] == [Status.UNAVAILABLE] * 3
        assert [h.status(f"i{i}") for i in range(5, 11)] == [Status.UNAVAILABLE] * 6
        assert h.rejected["b0"][2] == 1.5 and h.stats["queued"] == 0
        # A batch newcomer is refused at once: below an overloaded level it would only wait.
        assert h.submit("b-new", BATCH, principal="cron").state is TicketState.REJECTED
        assert h.rejected["b-new"][0] is Status.UNAVAILABLE and h.rejected["b-new"][2] == 1.5
        # Interactive newcomers are admitted for about the target's worth of waiting, then refused at once.
        states = [h.submit(f"n{i}", INTERACTIVE, principal=f"user{i}").state for i in range(6)]
        admitted = states.count(TicketState.QUEUED)
        assert 1 <= admitted <= 4
        assert states == [TicketState.QUEUED] * admitted + [TicketState.REJECTED] * (6 - admitted)
        # Control calls are never shed, and go first.
        for i in range(20):
            assert h.submit(f"ctl{i}", CONTROL, principal="ops").state is TicketState.QUEUED
        await h.step(advance=0.03)
        assert h.ran[-1] == "ctl0"
        await h.drain(advance=0.03)
        assert all(f"ctl{i}" in h.ran for i in range(20))
        assert not any(name.startswith("b") for name in h.ran)
        # Once a slot is free and nothing waits, nothing is overloaded.
        assert h.stats["overloaded_interactive"] == h.stats["overloaded_batch"] == 0

    run(body)


def test_an_overloaded_batch_level_leaves_interactive_alone() -> None:
    async def body() -> None:
        h = Harness(codel_target=0.05, codel_interval=0.1)
        h.submit("blocker", BATCH, principal="cron")
        for i in range(10):
            h.submit(f"b{i}", BATCH, principal="cron")
        for _ in range(6):
            await h.step(advance=0.03)
        assert h.stats["overloaded_batch"] == 1 and h.stats["overloaded_interactive"] == 0
        states = [h.submit(f"b-new{i}", BATCH, principal=f"job{i}").state for i in range(6)]
        assert TicketState.REJECTED in states
        for i in range(5):
            assert h.submit(f"i{i}", INTERACTIVE, principal="web").state is TicketState.QUEUED
        await h.step(advance=0.03)
        assert h.ran[-1] == "i0"
        await h.drain(advance=0.03)
        assert all(f"i{i}" in h.ran for i in range(5))
        assert not any(name.startswith("i") for name in h.rejected)

    run(body)


def test_the_dropping_state_ends_when_the_delay_falls_and_a_quick_relapse_resumes_it() -> None:
    async def body() -> None:
        h = Harness(codel_target=0.05, codel_interval=0.1)
        await overload_interactive(h)
        # A short queue served quickly: below half the target the level leaves dropping.
        h.submit("x0", principal="a")
        h.submit("x1", principal="b")
        await h.step(advance=0.01)  # x0 starts after 10 ms: the oldest waiting (x1) is 10 ms old
        assert h.stats["overloaded_interactive"] == 0
        # Waiting above target again soon after: dropping resumes without waiting an interval.
        h.submit("x2", principal="c")
        await h.step(advance=0.06)
        assert h.stats["overloaded_interactive"] == 1
        await h.drain()

    run(body)


def test_a_stalled_server_refuses_newcomers_at_once_without_any_slot_freeing() -> None:
    async def body() -> None:
        h = Harness(codel_target=0.05, codel_interval=0.1)
        h.submit("stuck")  # holds the only slot
        h.submit("q0")
        h.clock.now += 0.06
        h.submit("q1")  # q0 has waited past the target: the interval starts
        h.clock.now += 0.11
        assert h.submit("q2").state is TicketState.REJECTED  # a standing queue for a whole interval
        assert h.status("q2") is Status.UNAVAILABLE and h.rejected_at["q2"] == h.clock.now
        assert h.stats["overloaded_interactive"] == 1
        assert h.submit("health", CONTROL).state is TicketState.QUEUED
        # When the slot frees, control goes first; calls that waited twice the target are shed.
        await h.step()
        assert h.ran == ["stuck", "health"]
        assert h.status("q0") is h.status("q1") is Status.UNAVAILABLE
        await h.drain()
        assert h.stats["rejected_shed"] == 3 and h.stats["overloaded_interactive"] == 0

    run(body)


def test_a_queue_that_never_waits_long_is_never_shed() -> None:
    async def body() -> None:
        h = Harness(codel_target=0.05, codel_interval=0.1)
        h.submit("blocker")
        for i in range(100):
            h.submit(f"j{i}", BATCH if i % 2 else INTERACTIVE, principal=f"p{i % 7}")
            await h.step(advance=0.04)  # every call waits 40 ms: below target
        await h.drain()
        assert h.stats["rejected_shed"] == 0 and len(h.ran) == 101

    run(body)


# -- cancellation and detaching -------------------------------------------------------------------


def test_cancelling_a_queued_call_removes_it_without_running_or_answering_it() -> None:
    async def body() -> None:
        h = Harness()
        blocker = h.submit("blocker")
        queued = h.submit("queued", principal="a")
        h.submit("other", principal="a")
        await settle()
        assert h.scheduler.cancel(queued) is True
        assert queued.state is TicketState.CANCELLED
        assert h.scheduler.cancel(queued) is False
        assert h.stats["queued"] == 1 and h.stats["cancelled"] == 1
        # Cancelling a running call cancels its task; its slot goes to the next call.
        assert h.scheduler.cancel(blocker) is True
        await settle()
        assert blocker.task is not None and blocker.task.cancelled()
        assert h.ran == ["blocker", "other"] and h.finished == ["blocker"]
        await h.drain()
        assert "queued" not in h.ran and "queued" not in h.rejected and "queued" not in h.finished
        assert h.scheduler.cancel(blocker) is False

    run(body)


def test_a_call_cancelled_before_its_first_step_still_frees_its_slot_and_reports_done() -> None:
    async def body() -> None:
        h = Harness()
        ticket = h.submit("started")
        h.submit("next")
        h.scheduler.cancel(ticket)  # same loop turn: the coroutine body never runs
        await settle()
        assert h.ran == ["next"] and h.finished == ["started"]
        await h.drain()

    run(body)


def test_a_detached_call_gives_its_slot_back_and_runs_on() -> None:
    async def body() -> None:
        h = Harness()
        stream = h.submit("stream")
        h.submit("unary", hold=False)
        assert h.stats["running"] == 1 and h.stats["queued"] == 1
        h.scheduler.detach(stream)
        h.scheduler.detach(stream)  # idempotent
        await settle()
        assert h.ran == ["stream", "unary"] and h.finished == ["unary"]
        assert h.stats["running"] == 0 and not stream.task.done()  # type: ignore[union-attr]
        await h.step()
        assert h.finished == ["unary", "stream"] and h.stats["running"] == 0

    run(body)


# -- robustness and statistics ----------------------------------------------------------------------


def test_failing_jobs_and_callbacks_are_logged_and_do_not_jam_the_scheduler(caplog: pytest.LogCaptureFixture) -> None:
    async def body() -> None:
        scheduler = Scheduler(SchedulerConfig(max_concurrency=1, principal_queue_limit=1))
        ran: list[str] = []

        async def boom() -> None:
            ran.append("boom")
            raise RuntimeError("handler bug")

        async def fine() -> None:
            ran.append("fine")

        def bad_callback(*_: object) -> None:
            raise ValueError("callback bug")

        for job in (boom, fine, fine):  # the third is over the principal limit
            scheduler.submit(job, priority=0, principal="p", deadline=None, on_reject=bad_callback)
        await settle()
        assert ran == ["boom", "fine"]
        assert scheduler.stats()["running"] == 0 and scheduler.stats()["rejected_principal_limit"] == 1

    with caplog.at_level(logging.ERROR, logger="bastion.server"):
        run(body)
    messages = [r.getMessage() for r in caplog.records]
    assert "scheduler: a job raised" in messages and "scheduler: on_reject callback failed" in messages


def test_stats_report_queues_counts_and_queueing_delay() -> None:
    async def body() -> None:
        h = Harness(codel_target=60)
        h.submit("blocker")
        h.submit("a", CONTROL)
        h.submit("b", INTERACTIVE)
        h.submit("c", BATCH)
        h.submit("d", BATCH)
        stats = h.stats
        assert (stats["running"], stats["queued"]) == (1, 4)
        assert (stats["queued_control"], stats["queued_interactive"], stats["queued_batch"]) == (1, 1, 2)
        await h.step(advance=0.5)
        assert h.stats["delay_last"] == pytest.approx(0.5)
        await h.step(advance=0.25)
        assert h.stats["delay_last"] == pytest.approx(0.75)
        await h.drain()
        stats = h.stats
        assert stats["delay_max"] == pytest.approx(0.75)
        assert 0 < stats["delay_ewma"] < stats["delay_max"]
        assert (stats["submitted"], stats["started"], stats["completed"]) == (5, 5, 5)
        assert set(stats) == {
            "running",
            "queued",
            "queued_batch",
            "queued_interactive",
            "queued_control",
            "submitted",
            "started",
            "completed",
            "cancelled",
            "rejected_deadline",
            "rejected_principal_limit",
            "rejected_queue_full",
            "rejected_shed",
            "delay_last",
            "delay_ewma",
            "delay_max",
            "overloaded_batch",
            "overloaded_interactive",
        }

    run(body)


def test_random_workloads_keep_the_books_balanced() -> None:
    """Every call ends exactly once: run, refused (once), or cancelled; never over the slot limit."""

    async def body() -> None:
        rng = random.Random(1234)
        h = Harness(
            max_concurrency=3,
            control_reserve=1,
            queue_limit=12,
            principal_queue_limit=3,
            codel_target=0.2,
            codel_interval=0.4,
        )
        peak = 0
        tickets: dict[str, Ticket] = {}
        for n in range(1500):
            op = rng.random()
            if op < 0.55:
                name = f"j{n}"
                deadline = h.clock.now + rng.choice([0.02, 0.2, 5.0]) if rng.random() < 0.3 else None
                tickets[name] = h.submit(
                    name, rng.choice([CONTROL, INTERACTIVE, 3, BATCH]), f"p{rng.randrange(6)}", deadline
                )
            elif op < 0.65:
                live = [t for t in tickets.values() if t.state in (TicketState.QUEUED, TicketState.RUNNING)]
                if live:
                    h.scheduler.cancel(rng.choice(live))
            elif op < 0.7:
                running = [t for t in tickets.values() if t.state is TicketState.RUNNING and not t.detached]
                if running:
                    h.scheduler.detach(rng.choice(running))
            else:
                await h.step(advance=rng.choice([0.0, 0.01, 0.04]))
            peak = max(peak, int(h.stats["running"]))
        h.clock.now += 10
        while any(t.state in (TicketState.QUEUED, TicketState.RUNNING) for t in tickets.values()):
            await h.step()
        assert peak <= 4
        stats = h.stats
        states = {name: t.state for name, t in tickets.items()}
        assert set(h.rejected) == {n for n, s in states.items() if s is TicketState.REJECTED}
        assert set(h.finished) == {n for n, s in states.items() if s is TicketState.DONE}
        assert len(h.finished) == len(set(h.finished))
        assert set(h.ran) <= set(h.finished)
        rejected = sum(int(v) for k, v in stats.items() if k.startswith("rejected_"))
        assert stats["submitted"] == len(tickets) == stats["completed"] + rejected + stats["cancelled"]
        assert (stats["running"], stats["queued"]) == (0, 0)
        assert (
            min(
                stats[k]
                for k in (
                    "rejected_deadline",
                    "rejected_principal_limit",
                    "rejected_queue_full",
                    "rejected_shed",
                    "cancelled",
                    "completed",
                )
            )
            > 0
        )

    run(body)


def test_at_three_times_capacity_the_slot_never_idles_delay_stays_bounded_and_batch_goes_first() -> None:
    """A small simulation on the fake clock: one slot, 10 ms per call, three arrivals per 10 ms."""

    async def body() -> None:
        h = Harness(codel_target=0.05, codel_interval=0.1)
        rng = random.Random(7)
        submitted_at: dict[str, float] = {}
        kinds = {"control": CONTROL, "interactive": INTERACTIVE, "batch": BATCH}
        for n in range(500):
            for k in range(3):
                kind = rng.choices(list(kinds), weights=[1, 6, 3])[0]
                name = f"{kind}{n}.{k}"
                submitted_at[name] = h.clock.now
                h.submit(name, kinds[kind], principal=f"client{rng.randrange(20)}")
            await h.step(advance=0.01)
            assert h.stats["running"] == 1  # shedding never costs throughput

        def waits(kind: str) -> list[float]:
            return sorted(h.started_at[n] - submitted_at[n] for n in h.ran if n.startswith(kind))

        offered = {kind: sum(1 for n in submitted_at if n.startswith(kind)) for kind in kinds}
        # Control: every call ran, promptly.
        assert len(waits("control")) == offered["control"] and max(waits("control")) <= 0.05
        # Interactive: the wait stays about the target (at most twice) instead of growing without bound.
        interactive = waits("interactive")
        assert interactive[len(interactive) // 2] <= 0.08 and interactive[-1] <= 0.17
        # Batch is shed before interactive.
        assert len(waits("batch")) < 0.05 * offered["batch"]
        assert len(interactive) > 0.3 * offered["interactive"]
        # Every refusal is UNAVAILABLE, most of them at once, the others after a short wait.
        shed_waits = [h.rejected_at[n] - submitted_at[n] for n in h.rejected]
        assert all(h.status(n) is Status.UNAVAILABLE for n in h.rejected)
        assert sum(1 for w in shed_waits if w == 0) > 0.6 * len(shed_waits)
        assert max(shed_waits) <= 0.05 + 0.1 + 0.02  # the first episode: target + interval
        assert len(h.ran) + len(h.rejected) + int(h.stats["queued"]) == len(submitted_at)
        # Let the rest run or be shed: a job still held when asyncio.run cancels it would start the
        # next queued one during teardown, a task nobody cancels ("Task was destroyed but it is pending").
        await h.drain(advance=0.01)

    run(body)


def test_a_queued_job_runs_in_its_submitters_context_not_in_the_job_before_it() -> None:
    user: contextvars.ContextVar[str | None] = contextvars.ContextVar("user", default=None)
    seen: dict[str, str | None] = {}

    async def body() -> None:
        scheduler = Scheduler(SchedulerConfig(max_concurrency=1))
        release = asyncio.Event()

        async def first() -> None:
            user.set("alice")  # what a handler may set: a logging context, the current user...
            await release.wait()

        async def second() -> None:
            seen["second"] = user.get()

        def reject(status: Status, message: str, retry_after: float | None) -> None:
            raise AssertionError("nothing is refused here")

        scheduler.submit(first, priority=INTERACTIVE, principal="alice", deadline=None, on_reject=reject)
        queued = scheduler.submit(second, priority=INTERACTIVE, principal="bob", deadline=None, on_reject=reject)
        assert queued.state is TicketState.QUEUED
        await settle()
        release.set()
        await settle()
        assert seen == {"second": None}

    run(body)
