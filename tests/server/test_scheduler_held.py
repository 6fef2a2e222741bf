"""Held jobs (bastion/server/scheduler.py, "Held jobs"): a queued job whose owner's writing is paused is not started.

Pure asyncio, no sockets: the owner is a plain object with the one attribute the scheduler reads,
paused and resumed as a Link does (``Scheduler.owner_paused``).
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

from bastion.server.scheduler import Scheduler, SchedulerConfig, Ticket, TicketState
from bastion.status import Status


class Owner:
    def __init__(self, scheduler: Scheduler) -> None:
        self.scheduler = scheduler
        self.writing_paused = False

    def pause(self) -> None:
        self.writing_paused = True
        self.scheduler.owner_paused(True)

    def resume(self) -> None:
        self.writing_paused = False
        self.scheduler.owner_paused(False)


class Clock:
    now = 1000.0

    def __call__(self) -> float:
        return self.now


def run(test: Callable[[], Awaitable[None]]) -> None:
    async def guarded() -> None:
        await asyncio.wait_for(test(), 10)

    asyncio.run(guarded())


async def settle() -> None:
    for _ in range(8):
        await asyncio.sleep(0)


class Jobs:
    def __init__(self, **config: float) -> None:
        self.clock = Clock()
        cfg = SchedulerConfig(**{"max_concurrency": 1, "control_reserve": 0, **config})  # type: ignore[arg-type]
        self.scheduler = Scheduler(cfg, clock=self.clock)
        self.ran: list[str] = []
        self.rejected: dict[str, Status] = {}
        self.gate = asyncio.Semaphore(0)

    def submit(
        self, name: str, owner: Owner | None = None, principal: str = "p", deadline: float | None = None
    ) -> Ticket:
        async def job() -> None:
            self.ran.append(name)
            await self.gate.acquire()

        def on_reject(status: Status, message: str, retry_after: float | None) -> None:
            self.rejected[name] = status

        return self.scheduler.submit(
            job, priority=0, principal=principal, deadline=deadline, on_reject=on_reject, owner=owner
        )

    async def step(self) -> None:
        self.gate.release()
        await settle()


def test_a_paused_owners_queued_jobs_wait_in_place_while_others_run_and_start_on_resume() -> None:
    async def main() -> None:
        jobs = Jobs()
        sched = jobs.scheduler
        slow, other = Owner(sched), Owner(sched)
        jobs.submit("busy", other, principal="x")
        jobs.submit("a1", slow, principal="a")
        jobs.submit("a2", slow, principal="a")
        jobs.submit("b1", other, principal="b")
        jobs.submit("b2", other, principal="b")
        await settle()
        slow.pause()
        await jobs.step()  # busy ends: a1 is passed over, b1 runs
        await jobs.step()
        assert jobs.ran == ["busy", "b1", "b2"]
        await jobs.step()  # b2 ends: a free slot, only held jobs queued
        assert sched.stats()["queued"] == 2 and sched.stats()["running"] == 0
        jobs.submit("c1", other, principal="c")  # a free slot, only held jobs queued: starts at once
        await settle()
        assert jobs.ran[-1] == "c1"
        await jobs.step()
        assert sched.stats()["running"] == 0
        slow.resume()  # nothing runs, so nothing else would dispatch: the resume does
        await settle()
        assert jobs.ran[-1] == "a1"
        await jobs.step()
        assert jobs.ran[-1] == "a2"
        assert not jobs.rejected

    run(main)


def test_held_jobs_same_principal_do_not_block_that_principals_other_connections() -> None:
    async def main() -> None:
        jobs = Jobs()
        sched = jobs.scheduler
        slow, other = Owner(sched), Owner(sched)
        jobs.submit("busy", other)
        held = [jobs.submit(f"s{i}", slow) for i in range(3)]
        jobs.submit("o1", other)
        slow.pause()
        await jobs.step()
        assert jobs.ran == ["busy", "o1"]
        assert all(t.state is TicketState.QUEUED for t in held)
        slow.resume()
        for _ in range(4):
            await jobs.step()
        assert jobs.ran == ["busy", "o1", "s0", "s1", "s2"]

    run(main)


def test_held_jobs_do_not_make_codel_shed_others_and_still_expire() -> None:
    async def main() -> None:
        jobs = Jobs(codel_target=0.05, codel_interval=0.1)
        sched, clock = jobs.scheduler, jobs.clock
        slow, other = Owner(sched), Owner(sched)
        jobs.submit("busy", other, principal="x")
        slow.pause()
        late = jobs.submit("late", slow, principal="a", deadline=clock.now + 5)
        for i in range(5):
            jobs.submit(f"s{i}", slow, principal="a")
        await jobs.step()  # nothing startable: the slot idles
        for _ in range(10):  # held for a long time: no standing queue, nothing shed, newcomers admitted
            clock.now += 0.1
            jobs.submit(f"n{_}", other, principal="b")
            await jobs.step()
        assert sched.stats()["overloaded_interactive"] == 0
        assert not jobs.rejected
        assert [n for n in jobs.ran if n.startswith("n")] == [f"n{i}" for i in range(10)]
        clock.now += 5
        sched.expire(late)  # the session's deadline slot does this
        assert jobs.rejected == {"late": Status.DEADLINE_EXCEEDED}

    run(main)


def test_held_jobs_do_not_count_against_their_principals_queue_limit() -> None:
    """A connection that stopped reading with its principal's whole queue share waiting: every call the same
    principal made on another connection was refused "too many calls queued", with every slot free (review)."""

    async def test() -> None:
        j = Jobs(principal_queue_limit=4, max_concurrency=1)
        a = Owner(j.scheduler)
        j.submit("busy")  # holds the one slot
        for i in range(4):
            j.submit(f"a{i}", owner=a)  # connection A of principal p, queued behind it
        a.pause()  # A's peer stops reading
        j.gate.release()  # the slot frees
        await settle()
        j.submit("b0", principal="p")  # connection B of the same principal
        await settle()
        assert "b0" in j.ran and "b0" not in j.rejected, (j.ran, j.rejected)

    run(test)
