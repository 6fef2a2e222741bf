"""Jobs that report their own start and end (``Scheduler.submit(..., reports_end=True)``).

The session's calls are such jobs: their task runs the job's coroutine itself,
with no wrapper around it, so the coroutine must say when it began
(``ticket.started``) and when it ended (``Scheduler.finished``). These tests
hold the scheduler to the same slots, counts and ``on_done`` as for a plain job
-- started at once or from the queue, ended normally, by an exception, by a
cancel, or cancelled before its first step (when only the task's done-callback
can report it).
"""

from __future__ import annotations

import asyncio
from typing import Any

from bastion.server.scheduler import JOB_TASK_NAME, Scheduler, SchedulerConfig, Ticket, TicketState
from bastion.status import Status
from tests.server.test_scheduler import run, settle


class Reporting:
    """A scheduler with one slot, and reporting jobs that wait for ``gate`` (as the session's ``_run``)."""

    def __init__(self) -> None:
        self.scheduler = Scheduler(SchedulerConfig(max_concurrency=1, control_reserve=0))
        self.gate = asyncio.Event()
        self.ran: list[str] = []
        self.done: list[str] = []

    def submit(self, name: str, *, fail: bool = False) -> Ticket:
        async def job(ticket: Ticket) -> None:
            ticket.started = True
            try:
                self.ran.append(name)
                await self.gate.wait()
                if fail:
                    raise ValueError("the job failed")
            finally:
                self.scheduler.finished(ticket)

        def on_reject(status: Status, message: str, retry_after: float | None) -> None:
            raise AssertionError(f"{name} rejected: {message}")

        return self.scheduler.submit(
            job,
            priority=0,
            principal="p",
            deadline=None,
            on_reject=on_reject,
            on_done=lambda: self.done.append(name),
            reports_end=True,
        )


def test_a_reporting_job_started_at_once_or_from_the_queue_holds_its_slot_until_it_reports() -> None:
    async def body() -> None:
        r = Reporting()
        first, second = r.submit("first"), r.submit("second")
        assert first.state is TicketState.RUNNING and second.state is TicketState.QUEUED
        await settle()
        assert r.ran == ["first"] and first.started and not second.started
        r.gate.set()
        await settle()
        assert r.ran == ["first", "second"] and r.done == ["first", "second"]
        assert first.state is second.state is TicketState.DONE
        stats = r.scheduler.stats()
        assert stats["running"] == 0 and stats["started"] == stats["completed"] == 2

    run(body)


def test_a_reporting_job_that_raises_or_is_cancelled_still_frees_its_slot_once() -> None:
    async def body() -> None:
        r = Reporting()
        failing = r.submit("failing", fail=True)
        later = [r.submit("second"), r.submit("after")]
        await settle()
        r.gate.set()
        await settle()  # failing raised (its task holds the error), the next two started and ended
        assert failing.task is not None and isinstance(failing.task.exception(), ValueError)
        assert r.done == ["failing", "second", "after"] and all(t.state is TicketState.DONE for t in later)
        r.scheduler.finished(failing)  # a second report changes nothing
        assert r.scheduler.stats()["completed"] == 3 and r.scheduler.stats()["running"] == 0

        r.gate.clear()
        held = r.submit("held")
        await settle()
        assert r.scheduler.cancel(held) is True
        await settle()
        assert held.task is not None and held.task.cancelled()
        assert r.done[-1] == "held" and r.scheduler.stats()["running"] == 0

    run(body)


def test_a_reporting_job_cancelled_before_its_first_step_is_reported_by_its_task() -> None:
    async def body() -> None:
        r = Reporting()
        ticket = r.submit("never")
        r.submit("next")
        r.scheduler.cancel(ticket)  # same loop turn: the job's coroutine never runs, nor reports
        await settle()
        assert r.ran == ["next"] and r.done == ["never"] and not ticket.started
        r.gate.set()
        await settle()
        assert r.done == ["never", "next"] and r.scheduler.stats()["running"] == 0

    run(body)


def test_a_jobs_task_is_named_and_made_by_the_loops_task_factory_when_it_has_one() -> None:
    """The scheduler makes a job's task itself (asyncio.Task, named, no "Task-N" string formatted per
    call) only when the loop has no task factory: a loop's factory still makes every job's task."""

    async def body() -> None:
        loop = asyncio.get_running_loop()
        made: list[asyncio.Task[object]] = []

        def factory(loop: asyncio.AbstractEventLoop, coro: Any, **kwargs: Any) -> asyncio.Task[object]:
            task: asyncio.Task[object] = asyncio.Task(coro, loop=loop, **kwargs)
            made.append(task)
            return task

        r = Reporting()
        plain = r.submit("plain")
        assert isinstance(plain.task, asyncio.Task) and plain.task.get_name() == JOB_TASK_NAME
        loop.set_task_factory(factory)
        try:
            r.gate.set()
            await settle()
            made_by_factory = r.submit("factory")
            assert made == [made_by_factory.task] and made[0].get_name() == JOB_TASK_NAME
            await settle()
        finally:
            loop.set_task_factory(None)
        assert r.ran == ["plain", "factory"] and r.done == ["plain", "factory"]

    run(body)
