"""Callers that queue a call and go away leave nothing behind in the scheduler's fair queues.

A real server (in-process, loopback TCP) with one slot, held; anonymous
callers from many source addresses (127.0.x.y) each queue one call and hang
up, as an attacker with many addresses can. Each was a principal of its own
in the level's round-robin ring, and its emptied FIFO stayed there until a
dispatch reached it -- memory per distinct caller, and a full level's
push-out scan walked every one of them on each new call.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable

import msgspec

from bastion import Server, Service
from bastion.server.scheduler import Level, Scheduler, SchedulerConfig, TicketState
from bastion.server.tickets import LevelQueue, Ticket
from bastion.status import Status

HELLO, WELCOME, CALL, PING, PONG = 1, 2, 3, 10, 11
CALLERS = 300
#: Empty FIFOs a level may keep before it drops them (tickets.py: _EMPTY_SLACK).
SLACK = 64


def frame(message: object) -> bytes:
    body = msgspec.msgpack.encode(message)
    return len(body).to_bytes(4, "big") + body


def make_service(release: asyncio.Event) -> Service:
    svc = Service("churn")

    @svc.method(public=True)
    async def hold() -> str:
        await release.wait()
        return "held"

    @svc.method(public=True)
    async def echo(value: int) -> int:
        return value

    return svc


async def until(predicate: Callable[[], bool], what: str, timeout: float = 10.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while not predicate():
        assert asyncio.get_running_loop().time() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.005)


async def read_until(reader: asyncio.StreamReader, kind: int) -> None:
    while True:
        length = int.from_bytes(await reader.readexactly(4), "big")
        if msgspec.msgpack.decode(await reader.readexactly(length))[0] == kind:
            return


async def connect(port: int, source: str, method: str) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """A connection from ``source`` that has made one call to ``method``, read by the server."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port, local_addr=(source, 0))
    writer.write(frame([HELLO, 1, "churn/1", None, 16, 1 << 20, {}]))
    await read_until(reader, WELCOME)
    writer.write(frame([CALL, 1, method, {"value": 1} if method == "churn.echo" else {}]) + frame([PING, 7]))
    await read_until(reader, PONG)  # the Pong follows the read that brought the Call
    return reader, writer


async def queue_and_hang_up(port: int, source: str) -> None:
    _, writer = await connect(port, source, "churn.echo")
    writer.close()
    await writer.wait_closed()


def test_callers_that_queue_and_hang_up_leave_no_empty_queues_behind() -> None:
    async def main() -> None:
        release = asyncio.Event()
        config = SchedulerConfig(max_concurrency=1, control_reserve=0, codel_target=60.0, codel_interval=60.0)
        server = Server([make_service(release)], scheduler=Scheduler(config))
        await server.start("127.0.0.1", 0)
        stats = server.scheduler.stats
        try:
            async with asyncio.timeout(60):
                _, holder = await connect(server.port, "127.0.0.1", "churn.hold")  # stays: its call holds the slot
                await until(lambda: stats()["running"] == 1, "the slot to be held")
                for n in range(CALLERS):
                    await queue_and_hang_up(server.port, f"127.0.{1 + n // 250}.{1 + n % 250}")
                await until(lambda: stats()["cancelled"] == CALLERS, "every queued call to be cancelled")
                assert stats()["queued"] == 0
                level = server.scheduler._queues[Level.INTERACTIVE]
                assert len(level.fifos) <= SLACK and len(level.ring) <= SLACK, (len(level.fifos), len(level.ring))
        finally:
            release.set()
            holder.close()
            await server.shutdown(grace=1)

    asyncio.run(main())


def _ticket(principal: str) -> Ticket:
    async def job() -> None:
        return None

    def on_reject(status: Status, message: str, retry_after: float | None) -> None:
        return None

    return Ticket(job, Level.INTERACTIVE, principal, None, on_reject, None, 0.0)


def test_a_full_level_still_pushes_out_the_longest_queue_after_many_callers_left() -> None:
    queue = LevelQueue()
    for n in range(10_000):  # each queued one call and left
        ticket = _ticket(f"anonymous@10.0.{n // 256}.{n % 256}")
        queue.push(ticket)
        ticket.state = TicketState.CANCELLED
        queue.remove(ticket)
    assert len(queue.fifos) <= SLACK and len(queue.ring) <= SLACK
    flooder = [_ticket("flooder") for _ in range(5)]
    for ticket in flooder:
        queue.push(ticket)
    assert queue.pop_newest_of_longest(1) is flooder[-1]
    assert queue.pop() is flooder[0]  # the ring still serves the live principal
    assert queue.size == 3
