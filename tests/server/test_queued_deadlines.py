"""A call whose deadline passes while it waits in the scheduler's queue is answered then, not when a slot frees.

A real server (in-process, loopback TCP) with one slot, held by a call that
never ends by itself; a raw client (which, unlike bastion's, sends no Cancel
when its own deadline passes) queues calls with a deadline. Before the fix
such a call was only looked at when it reached the head of its queue or was
shed: while the slot stayed held it went unanswered, kept its place in the
per-principal and level queues (newcomers were refused for it) and the
arguments it held, however long after its deadline.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import Any

import msgspec

from bastion import Server, Service
from bastion.server.scheduler import Scheduler, SchedulerConfig
from bastion.status import Status

release = asyncio.Event()  # replaced per test (an Event binds to its first loop)
HELLO, WELCOME, CALL, RESULT, ERROR, CANCEL = 1, 2, 3, 4, 5, 6


def frame(message: object) -> bytes:
    body = msgspec.msgpack.encode(message)
    return len(body).to_bytes(4, "big") + body


async def until(predicate: Callable[[], bool], what: str, timeout: float = 10.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while not predicate():
        assert asyncio.get_running_loop().time() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.005)


async def read_message(reader: asyncio.StreamReader) -> Any:
    length = int.from_bytes(await reader.readexactly(4), "big")
    return msgspec.msgpack.decode(await reader.readexactly(length))


def run(
    body: Callable[[Server, asyncio.StreamReader, asyncio.StreamWriter, list[int]], Any],
    clock: Callable[[], float] = time.monotonic,
) -> None:
    async def main() -> None:
        global release
        release = asyncio.Event()
        ran: list[int] = []
        svc = Service("qd")

        @svc.method(public=True)
        async def hold() -> str:
            await release.wait()
            return "held"

        @svc.method(public=True)
        async def work(value: int) -> int:
            ran.append(value)
            await asyncio.sleep(0)
            return value

        config = SchedulerConfig(max_concurrency=1, control_reserve=0, principal_queue_limit=2)
        server = Server([svc], scheduler=Scheduler(config, clock=clock))
        await server.start("127.0.0.1", 0)
        try:
            async with asyncio.timeout(30):
                reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
                writer.write(frame([HELLO, 1, "raw/1", None, 16, 1 << 20, {}]))
                assert (await read_message(reader))[0] == WELCOME
                writer.write(frame([CALL, 1, "qd.hold", {}]))
                await until(lambda: server.scheduler.stats()["running"] == 1, "the slot to be held")
                await body(server, reader, writer, ran)
                writer.close()
        finally:
            release.set()
            await server.shutdown(grace=1)

    asyncio.run(main())


def test_a_queued_call_is_answered_deadline_exceeded_at_its_deadline_and_frees_its_place() -> None:
    async def body(server: Server, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, ran: list[int]) -> None:
        stats = server.scheduler.stats
        writer.write(frame([CALL, 3, "qd.work", {"value": 3}, 200]) + frame([CALL, 5, "qd.work", {"value": 5}, 200]))
        await until(lambda: stats()["queued"] == 2, "the calls to queue")
        loop = asyncio.get_running_loop()
        start = loop.time()
        answers = [await asyncio.wait_for(read_message(reader), 5) for _ in range(2)]  # the slot is still held
        assert loop.time() - start < 2
        assert sorted(a[1] for a in answers) == [3, 5]
        assert all(a[0] == ERROR and a[2] == Status.DEADLINE_EXCEEDED for a in answers), answers
        assert stats()["queued"] == 0 and stats()["rejected_deadline"] == 2
        assert server.stats()["calls_in_flight"] == 1  # the held call alone
        # Their places are free: the principal's queue (2 calls) takes two more at once.
        writer.write(frame([CALL, 7, "qd.work", {"value": 7}]) + frame([CALL, 9, "qd.work", {"value": 9}]))
        await until(lambda: stats()["queued"] == 2, "the new calls to queue")
        assert stats()["rejected_principal_limit"] == 0
        assert ran == []  # neither expired call ran

    run(body)


def test_a_queued_call_with_a_deadline_that_ends_otherwise_leaves_no_deadline_armed() -> None:
    """Cancelled while queued, or refused, it must not stay in the server's deadline slots until its deadline."""

    async def body(server: Server, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, ran: list[int]) -> None:
        stats = server.scheduler.stats
        hour = 3_600_000
        writer.write(frame([CALL, 3, "qd.work", {"value": 3}, hour]) + frame([CALL, 5, "qd.work", {"value": 5}, hour]))
        await until(lambda: stats()["queued"] == 2, "the calls to queue")
        writer.write(frame([CANCEL, 3]) + frame([CANCEL, 5]))
        await until(lambda: stats()["queued"] == 0, "the cancels to empty the queue")
        assert len(server.deadlines) == 0

    run(body)


def test_a_call_started_but_not_yet_stepped_when_its_deadline_fires_is_answered_and_forgotten() -> None:
    """The slot frees and the queued call's task is made, but the deadline slot's timer runs before the
    task's first step (ready in the same loop turn, ahead of it). Cancelling that task would skip its
    finally: nothing would answer the call or give its scheduler slot back.

    The scheduler's clock lags the session's by a minute here, so that the dispatch (which refuses a
    call already past its deadline by the scheduler's clock) starts the call that late; in real life
    the deadline passes between the dispatch and the timer, within one loop turn.
    """

    async def body(server: Server, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, ran: list[int]) -> None:
        stats = server.scheduler.stats
        writer.write(frame([CALL, 3, "qd.work", {"value": 3}, 100]))
        await until(lambda: stats()["queued"] == 1, "the call to queue")

        def free_the_slot_late() -> None:  # the held call's wakeup is ready; then the loop stalls past the deadline
            release.set()
            time.sleep(0.3)

        asyncio.get_running_loop().call_soon(free_the_slot_late)
        answers = [await asyncio.wait_for(read_message(reader), 5) for _ in range(2)]
        assert sorted((a[0], a[1]) for a in answers) == [(RESULT, 1), (ERROR, 3)], answers
        assert [a[2] for a in answers if a[1] == 3] == [Status.DEADLINE_EXCEEDED]
        await until(lambda: stats()["running"] == 0, "the slot to be given back")
        assert server.stats()["calls_in_flight"] == 0 and stats()["queued"] == 0
        assert len(server.deadlines) == 0 and ran == []

    run(body, clock=lambda: time.monotonic() - 60)
