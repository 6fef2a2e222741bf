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
from typing import Any

import msgspec

from bastion import Server, Service
from bastion.protocol.proxy import Command, Family, ProxyHeader, build
from bastion.server.scheduler import Level, Scheduler, SchedulerConfig, TicketState
from bastion.server.tickets import LevelQueue, Ticket
from bastion.status import Status

HELLO, WELCOME, CALL, ERROR, PING, PONG = 1, 2, 3, 5, 10, 11
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


async def read_until(reader: asyncio.StreamReader, kind: int) -> list[Any]:
    """The messages before the first of type ``kind``."""
    before = []
    while True:
        length = int.from_bytes(await reader.readexactly(4), "big")
        message = msgspec.msgpack.decode(await reader.readexactly(length))
        if message[0] == kind:
            return before
        before.append(message)


async def connect(
    port: int, source: str, method: str, *, proxied: str | None = None
) -> tuple[asyncio.StreamReader, asyncio.StreamWriter, list[Any]]:
    """A connection from ``source`` that has made one call to ``method``, read by the server; and what
    it was answered by then. ``proxied``: an IPv6 client address to send a PROXY v2 header for."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port, local_addr=(source, 0))
    if proxied is not None:
        writer.write(build(ProxyHeader(Command.PROXY, Family.TCP6, (proxied, 40000), ("2001:db8:ffff::1", 9))))
    writer.write(frame([HELLO, 1, "churn/1", None, 16, 1 << 20, {}]))
    await read_until(reader, WELCOME)
    writer.write(frame([CALL, 1, method, {"value": 1} if method == "churn.echo" else {}]) + frame([PING, 7]))
    return reader, writer, await read_until(reader, PONG)  # the Pong follows the read that brought the Call


async def queue_and_hang_up(port: int, source: str) -> None:
    _, writer, _ = await connect(port, source, "churn.echo")
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
                _, holder, _ = await connect(server.port, "127.0.0.1", "churn.hold")  # stays: its call holds the slot
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


def test_anonymous_ipv6_callers_share_one_fair_queue_per_64() -> None:
    """One host usually owns a whole IPv6 /64: the per-source connection limit, the rate limiter and
    the login throttle count it as one source, and so must the scheduler, or each of its addresses
    gets a fair share and a queue of its own (clients here come through a trusted proxy's header)."""

    async def main() -> None:
        release = asyncio.Event()
        config = SchedulerConfig(
            max_concurrency=1, control_reserve=0, principal_queue_limit=2, codel_target=60.0, codel_interval=60.0
        )
        server = Server([make_service(release)], scheduler=Scheduler(config), trusted_proxies=["127.0.0.1"])
        await server.start("127.0.0.1", 0)
        writers = []
        try:
            async with asyncio.timeout(30):
                _, holder, _ = await connect(server.port, "127.0.0.1", "churn.hold", proxied="2001:db8:1::1")
                writers.append(holder)
                readers = []
                for n in range(1, 4):  # three addresses of one /64
                    reader, writer, _ = await connect(server.port, "127.0.0.1", "churn.echo", proxied=f"2001:db8::{n}")
                    readers.append(reader)
                    writers.append(writer)
                try:  # its Pong went first: the refusal follows it
                    await asyncio.wait_for(read_until(readers[2], ERROR), 5)
                except TimeoutError:
                    raise AssertionError("the /64's third call was queued: a fair queue per address") from None
                assert server.scheduler.stats()["rejected_principal_limit"] == 1
                assert server.scheduler.stats()["queued"] == 2
        finally:
            release.set()
            for writer in writers:
                writer.close()
            await server.shutdown(grace=1)

    asyncio.run(main())
