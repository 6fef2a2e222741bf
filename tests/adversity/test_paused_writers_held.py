"""Queued calls of a connection whose peer stopped reading wait unstarted: the slots go to other callers.

A real server (in-process, loopback TCP) with four scheduler slots and the
default CoDel settings. Two clients (127.0.0.2, 127.0.0.4, anonymous) each
send 200 calls whose answers are large and never read them; a third
(127.0.0.3) then makes a no-argument call with a 2 s deadline. A finished
answer of a non-reading connection is parked without its slot only up to
a per-connection and a server-wide cap; the scheduler used to keep starting
the non-readers' queued calls, whose answers past the caps waited in their
slots until ``write_stall_timeout``: every slot was held and the bystander's
call expired queued (DEADLINE_EXCEEDED).
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

from bastion import Server, Service
from bastion.config import ServerLimits
from bastion.server.scheduler import Scheduler, SchedulerConfig
from tests.adversity.test_slow_reader_slots import connect, frame, read_message, until

CALL, RESULT = 3, 4
CALLS = 200


def make_service() -> Service:
    svc = Service("sr")

    @svc.method(public=True)
    async def big() -> bytes:
        await asyncio.sleep(0)
        return b"x" * 60_000

    @svc.method(public=True)
    async def small() -> int:
        await asyncio.sleep(0)
        return 1

    return svc


def test_queued_calls_of_non_readers_wait_unstarted_and_a_bystander_is_answered_in_time() -> None:
    async def main() -> None:
        limits = ServerLimits(
            max_frame=65536, max_args_memory=80 * 65536, write_high_water=16384, write_stall_timeout=60
        )
        server = Server(
            [make_service()], limits=limits, scheduler=Scheduler(SchedulerConfig(max_concurrency=4, control_reserve=0))
        )
        await server.start("127.0.0.1", 0)
        writers: list[asyncio.StreamWriter] = []
        try:
            for source in ("127.0.0.2", "127.0.0.4"):
                _, writer = await connect(server.port, source, rcvbuf=4096)
                writer.write(b"".join(frame([CALL, 1 + 2 * i, "sr.big", {}]) for i in range(CALLS)))
                writers.append(writer)
            paused = lambda: [s for s in server.sessions if s.link is not None and s.link.writing_paused]  # noqa: E731
            await until(lambda: len(paused()) >= 1, "a non-reader's writing to pause")
            await asyncio.sleep(0.5)  # not a readiness wait: the non-readers' calls get the time to take the slots
            assert server.scheduler.stats()["queued"] > 0  # their calls wait queued, not refused
            reader, writer = await connect(server.port, "127.0.0.3")
            writers.append(writer)
            started = time.monotonic()
            writer.write(frame([CALL, 1, "sr.small", {}, 2000]))
            answer = await asyncio.wait_for(read_message(reader), 5)
            assert answer[:3] == [RESULT, 1, 1], answer
            assert time.monotonic() - started < 2
        finally:
            for writer in writers:
                writer.transport.abort()
            await server.shutdown(grace=0.5)

    asyncio.run(main())


def test_held_calls_start_once_their_connection_reads_again() -> None:
    async def main() -> None:
        limits = ServerLimits(max_frame=65536, write_high_water=16384, write_stall_timeout=60)
        server = Server(
            [make_service()], limits=limits, scheduler=Scheduler(SchedulerConfig(max_concurrency=4, control_reserve=0))
        )
        await server.start("127.0.0.1", 0)
        try:
            reader, writer = await connect(server.port, "127.0.0.2", rcvbuf=4096)
            calls = 100  # within principal_queue_limit
            writer.write(b"".join(frame([CALL, 1 + 2 * i, "sr.big", {}]) for i in range(calls)))
            stats = server.scheduler.stats
            # Nothing runs (the started calls' answers are parked): only the resume can start the rest.
            await until(lambda: stats()["queued"] > 0 and stats()["running"] == 0, "calls held queued")
            await asyncio.sleep(0.3)  # not a readiness wait: held long enough for CoDel to have seen them
            answered: dict[int, Any] = {}
            while len(answered) < calls:  # reading again: every held call starts and is answered
                message = await asyncio.wait_for(read_message(reader), 10)
                answered[message[1]] = message
            assert all(m[0] == RESULT for m in answered.values()), [m for m in answered.values() if m[0] != RESULT][:3]
            assert server.scheduler.stats()["queued"] == 0
            writer.transport.abort()
        finally:
            await server.shutdown(grace=0.5)

    asyncio.run(main())
