"""A two-way stream paused by limits.max_stream_buffer_total still reads the Credit its handler waits for.

Past the server-wide total the server stops reading from a connection holding more than its share.
A two-way handler that has used its send credit waits for the client's Credit before it takes its
next item: left paused, that Credit went unread, the handler never took the item, and the total
never fell -- every such stream on the server stalled for good. A handler waiting for credit now
has its connection read again (one read: past the total it pauses once more).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

from bastion import Service
from bastion.config import ServerLimits
from bastion.testing import MemoryServer

KIB = 1024
service = Service("r")
#: Each connection's share of the total: 64 KiB / 16 connections = 4 KiB, about one item.
LIMITS = ServerLimits(
    max_frame=16 * KIB,
    handshake_max_frame=16 * KIB,
    window=4,
    max_stream_buffer=64 * KIB,
    max_stream_buffer_total=64 * KIB,
    max_connections=16,
    max_args_memory=80 * 16 * KIB,
)


@service.method
async def fan(items: AsyncIterator[bytes]) -> AsyncIterator[int]:
    """Eight answers for each item: past the window (4), it waits for the client's Credit."""
    async for item in items:
        for _ in range(8):
            yield len(item)


def test_two_way_streams_past_the_total_all_finish() -> None:
    async def one(memory: MemoryServer) -> int:
        client = memory.client()
        return len([n async for n in client.stream("r.fan", (bytes(5 * KIB) for _ in range(8)))])

    async def main() -> None:
        async with MemoryServer(service, limits=LIMITS) as memory:
            memory.grace = 0.1
            async with asyncio.timeout(20):  # stalled for good before, 15 streams together
                done = await asyncio.gather(*(one(memory) for _ in range(15)))
            assert done == [64] * 15
            assert memory.server.counters["stream_buffer_paused"] > 0  # the total was passed: they paused
            assert memory.server.stream_bytes == 0 and not memory.server.stream_waiting

    asyncio.run(main())
