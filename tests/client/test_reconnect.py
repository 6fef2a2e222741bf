"""A single-address client retries idempotent calls on a new connection after a lost one; never others."""

from __future__ import annotations

import asyncio

import pytest

from bastion import ConnectionClosed, Service
from bastion.testing import MemoryServer

service = Service("flaky")
runs: list[int] = []
started: list[asyncio.Event] = []  # set when a handler began; a fresh one per test (per event loop)


@service.method(idempotent=True)
async def read(tag: int) -> int:
    runs.append(tag)
    started[0].set()
    if len(runs) == 1:
        await asyncio.sleep(30)  # the test drops the connection under this first run
    return tag


@service.method
async def write(tag: int) -> int:
    runs.append(tag)
    started[0].set()
    await asyncio.sleep(30)
    return tag


async def drop_connections_once_started(memory: MemoryServer) -> None:
    await started[0].wait()
    for session in list(memory.server.sessions):
        assert session.link is not None
        session.link.abort()  # as if the server behind a load balancer died


def test_an_idempotent_call_is_retried_on_a_new_connection_after_the_old_one_is_lost() -> None:
    async def main() -> None:
        runs.clear()
        started[:] = [asyncio.Event()]
        async with MemoryServer(service) as memory:
            client = memory.client(timeout=10)
            dropper = asyncio.ensure_future(drop_connections_once_started(memory))
            assert await client.invoke("flaky.read", {"tag": 7}, idempotent=True) == 7  # no admin.methods here
            await dropper
            assert runs == [7, 7]
            assert memory.server.stats()["connections_total"] == 2

    asyncio.run(main())


def test_a_non_idempotent_call_is_not_retried_after_a_lost_connection() -> None:
    async def main() -> None:
        runs.clear()
        started[:] = [asyncio.Event()]
        async with MemoryServer(service) as memory:
            client = memory.client(timeout=10)
            dropper = asyncio.ensure_future(drop_connections_once_started(memory))
            with pytest.raises(ConnectionClosed):
                await client.flaky.write(tag=1)
            await dropper
            assert runs == [1]

    asyncio.run(main())
