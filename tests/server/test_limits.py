"""Per-connection limits in the session (bastion/server/session.py), in memory.

The process-level attacks (slowloris, floods, slow readers, descriptor
exhaustion) are in tests/adversity/test_connection_limits.py; here, the
mechanisms that need a look inside: reading pauses while too many calls are
queued and resumes once they start, and a Call cancelled in the same read
leaves nothing behind.
"""

from __future__ import annotations

import asyncio
from typing import Any

import msgspec
import pytest

import bastion.testing
from bastion import ServerLimits, Service
from bastion.protocol.frames import FrameWriter
from bastion.protocol.messages import Call, Cancel
from bastion.transport.aio import Link

service = Service("queue")


@service.method
async def echo(i: int) -> int:
    # It awaits, so each call is queued for a task of its own: a handler with no
    # await runs inline and never queues (tests/server/test_inline.py).
    await asyncio.sleep(0)
    return i


@service.method
async def slow() -> None:
    await asyncio.sleep(30)


def run(coro: Any) -> Any:
    async def guarded() -> Any:
        async with asyncio.timeout(10):
            return await coro

    return asyncio.run(guarded())


def test_reading_pauses_while_too_many_calls_are_queued(monkeypatch: pytest.MonkeyPatch) -> None:
    seen: list[tuple[str, str]] = []
    pause, resume = Link.pause_reading, Link.resume_reading

    def record_pause(self: Link, reason: str) -> None:
        seen.append(("pause", reason))
        pause(self, reason)

    def record_resume(self: Link, reason: str) -> None:
        if reason in self._read_holds:
            seen.append(("resume", reason))
        resume(self, reason)

    monkeypatch.setattr(Link, "pause_reading", record_pause)
    monkeypatch.setattr(Link, "resume_reading", record_resume)

    async def main() -> list[int]:
        async with bastion.testing.connect(service, limits=ServerLimits(read_high_water=4)) as client:
            return list(await asyncio.gather(*(client.queue.echo(i=i) for i in range(40))))

    assert run(main()) == list(range(40))
    assert ("pause", "queued calls") in seen
    assert seen.count(("pause", "queued calls")) == seen.count(("resume", "queued calls"))


def test_a_call_cancelled_in_the_read_that_started_it_leaves_nothing_behind() -> None:
    async def main() -> None:
        async with bastion.testing.MemoryServer(service) as memory:
            client = memory.client()
            await client.connect()
            (session,) = memory.server.sessions
            assert session.link is not None
            # One read bringing ten Calls, each followed by its Cancel (rapid reset, under the cap).
            writer = FrameWriter(1 << 20)
            for i in range(1, 11):
                writer.write(Call(i, "queue.slow", msgspec.Raw(msgspec.msgpack.encode({}))))
                writer.write(Cancel(i))
            session.link.data_received(writer.take())
            await asyncio.sleep(0.01)
            assert session.tickets == {}
            assert memory.server.stats()["calls_in_flight"] == 0

    run(main())
