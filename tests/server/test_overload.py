"""Overload protection on a real server (in-process, loopback TCP): the scheduler's CoDel
state (bastion/server/scheduler.py) as calls queue, give up, start inline and stall.

One slot and the default CoDel timings (a 50 ms target, a 100 ms interval), so
a standing queue forms in a fraction of a second; the tests poll the scheduler's
own counts with a deadline.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any

import pytest

import bastion
from bastion import Principal, Server, Service
from bastion.security.authn import StaticTokens
from bastion.server.scheduler import Scheduler, SchedulerConfig, TicketState

#: Timing assertions, or effects on the whole PostgreSQL server: runs alone under
#: ``pytest -n`` (the "exclusive" marker, tests/conftest.py).
pytestmark = pytest.mark.exclusive

TOKEN = "bst_overload-test-token-0123456789abcdef"
ADA = Principal("ada", frozenset({"user"}))
TARGET, INTERVAL = 0.05, 0.1  # the defaults

release = asyncio.Event()  # replaced per test (an Event binds to its first loop)


def make_service() -> Service:
    svc = Service("ovl")

    @svc.method
    async def echo(value: int) -> int:  # never suspends: runs inline when a slot is free
        return value

    @svc.method
    async def nap(value: int) -> int:  # suspends: runs in a task
        await asyncio.sleep(0)
        return value

    @svc.method
    async def hold() -> str:
        await release.wait()
        return "held"

    @svc.method(priority=-1)
    async def batch(seconds: float) -> str:
        await asyncio.sleep(seconds)
        return "done"

    return svc


async def until(predicate: Callable[[], bool], what: str, timeout: float = 5.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while not predicate():
        assert asyncio.get_running_loop().time() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.002)


def run(body: Callable[[bastion.Client, Server], Awaitable[None]]) -> None:
    async def main() -> None:
        global release
        release = asyncio.Event()
        config = SchedulerConfig(max_concurrency=1, control_reserve=0, codel_target=TARGET, codel_interval=INTERVAL)
        server = Server([make_service()], authenticator=StaticTokens({TOKEN: ADA}), scheduler=Scheduler(config))
        await server.start("127.0.0.1", 0)
        try:
            async with asyncio.timeout(30):
                async with bastion.Client(
                    f"127.0.0.1:{server.port}", token=TOKEN, insecure=True, timeout=10, retry=None
                ) as client:
                    await body(client, server)
        finally:
            release.set()
            await server.shutdown(grace=1)

    asyncio.run(main())


async def overload(client: bastion.Client, server: Server) -> list[asyncio.Future[Any]]:
    """Hold the only slot and queue interactive calls until the level is dropping; the calls queued."""
    stats = server.scheduler.stats
    held = asyncio.ensure_future(client.call("ovl.hold"))
    await until(lambda: stats()["running"] == 1, "the slot to be held")
    queued: list[asyncio.Future[Any]] = [held]
    while not stats()["overloaded_interactive"]:  # each newcomer looks at the oldest one's wait
        queued.append(asyncio.ensure_future(client.call("ovl.echo", value=len(queued))))
        await until(lambda: stats()["submitted"] >= len(queued), "the call to reach the scheduler")
        assert len(queued) < 1000, "the interactive level never started dropping"
        await asyncio.sleep(TARGET / 2)
    return queued


def test_queued_calls_that_give_up_do_not_leave_the_server_shedding_when_idle() -> None:
    """The clients of a standing queue cancel (or disconnect); the slow call ends. The server is
    idle, so nothing is overloaded -- before the fix the dropping state stayed, and every batch
    call that had to wait even a moment was refused UNAVAILABLE at once, however long after."""

    async def body(client: bastion.Client, server: Server) -> None:
        stats = server.scheduler.stats
        held, *waiting = await overload(client, server)
        for call in waiting:  # gave up: each sends a Cancel (the one refused is answered already)
            call.cancel()
        await asyncio.gather(*waiting, return_exceptions=True)
        await until(lambda: stats()["queued"] == 0, "the cancels to empty the queue")
        release.set()
        assert await held == "held"
        await until(lambda: stats()["running"] == 0, "the slow call to end")
        assert await client.call("ovl.echo", value=1) == 1  # inline: a free slot and nobody waiting
        assert stats()["overloaded_interactive"] == stats()["overloaded_batch"] == 0
        # Two batch calls for the one slot: the second waits for the first, and is not refused.
        assert await asyncio.gather(*(client.call("ovl.batch", seconds=0.05) for _ in range(2))) == ["done"] * 2

    run(body)


def test_a_stalled_server_refuses_newcomers_at_once_after_a_busy_spell_of_inline_calls() -> None:
    """Thousands of inline calls a second, then the server stalls: its one slot held, nothing starts.
    The dropping level admits what it starts within the target -- nothing now -- so newcomers are
    refused at once. Before the fix the start rate was measured in windows that only a start could
    close, so the busy spell's rate held through the stall (inline starts are counted without a
    clock reading: the spell's window closed at the stall's first start), and newcomers were
    queued, rate x target of them, to wait it out."""

    async def body(client: bastion.Client, server: Server) -> None:
        for _ in range(400):
            assert await asyncio.gather(*(client.call("ovl.echo", value=i) for i in range(10))) == list(range(10))
        await asyncio.sleep(INTERVAL)  # the spell's window is full when the stall begins
        held, *waiting = await overload(client, server)
        newcomers = [asyncio.ensure_future(client.call("ovl.echo", value=i)) for i in range(5)]
        try:
            await asyncio.wait(newcomers, timeout=2)
            queued = sum(1 for call in newcomers if not call.done())
            assert queued == 0, f"{queued} of {len(newcomers)} newcomers queued behind the stall"
            assert all(isinstance(call.exception(), bastion.Unavailable) for call in newcomers)
        finally:
            release.set()
            assert await held == "held"
            await asyncio.gather(*waiting, *newcomers, return_exceptions=True)

    run(body)


def test_a_stall_after_busy_task_traffic_refuses_newcomers_at_once() -> None:
    """The same for calls run in tasks, on a fake clock (the windows' edges are then exact):
    a thousand calls a second, then a stall."""

    async def body() -> None:
        now = [1000.0]
        scheduler = Scheduler(SchedulerConfig(max_concurrency=1, control_reserve=0), clock=lambda: now[0])
        gate = asyncio.Semaphore(0)
        refused: list[int] = []

        async def job() -> None:
            await gate.acquire()

        def submit(n: int) -> TicketState:
            ticket = scheduler.submit(
                job, priority=0, principal=f"p{n}", deadline=None, on_reject=lambda *_: refused.append(n)
            )
            return ticket.state

        for n in range(1000):  # one call per millisecond, none waits
            assert submit(n) is TicketState.RUNNING
            now[0] += 0.001
            gate.release()
            for _ in range(4):
                await asyncio.sleep(0)
        now[0] += 0.1  # a quiet interval: the stall's first start closes the traffic's last window
        assert submit(1000) is TicketState.RUNNING  # it never ends: the stall
        submit(1001)
        now[0] += 0.06
        submit(1002)  # the oldest has waited past the target: the interval starts
        now[0] += 0.11
        states = [submit(n) for n in range(1003, 1013)]
        assert scheduler.stats()["overloaded_interactive"] == 1
        assert states == [TicketState.REJECTED] * 10, states  # before the fix: all queued
        for _ in range(3):
            gate.release()

    asyncio.run(body())


def test_callers_choosing_ever_new_priorities_do_not_grow_the_server() -> None:
    """Any integer is a valid priority (docs/protocol.md, 6.6), and a caller may lower its calls'.
    The scheduler cached the level of every priority it was sent, for ever: a client sending each
    call at a new priority grew the server's memory by an entry a call, without limit."""

    async def body(client: bastion.Client, server: Server) -> None:
        for start in range(1, 20_001, 500):
            calls = (client.invoke("ovl.echo", {"value": p}, priority=-p) for p in range(start, start + 500))
            assert await asyncio.gather(*calls) == list(range(start, start + 500))
        assert await client.invoke("ovl.batch", {"seconds": 0}, priority=-(2**63)) == "done"
        assert len(server.scheduler._levels) <= 1024
        assert server.scheduler.stats()["completed"] == 20_001

    run(body)


def test_answered_calls_with_far_deadlines_leave_no_timers_behind() -> None:
    """A running call's deadline sits in a 10 ms slot whose loop timer is kept until it fires, even
    once its calls have all answered: cheap when deadlines share slots, but a caller spreading its
    calls' timeouts over a long horizon (any timeout_ms is valid) left a timer and a slot per call
    for the whole horizon -- a day here, 20,000 of them, all answered long ago."""

    async def body(client: bastion.Client, server: Server) -> None:
        loop = asyncio.get_running_loop()
        fire = server.deadlines._fire

        def timers() -> int:  # the server's deadline timers armed on the loop
            return sum(h._callback == fire and not h.cancelled() for h in loop._scheduled)  # type: ignore[attr-defined]

        for start in range(0, 20_000, 100):
            calls = (
                client.invoke("ovl.nap", {"value": i}, timeout=86_400 + i * 0.01) for i in range(start, start + 100)
            )
            assert await asyncio.gather(*calls) == list(range(start, start + 100))
        assert len(server.deadlines) == 0  # every call answered and disarmed
        assert timers() < 5_000

    run(body)
