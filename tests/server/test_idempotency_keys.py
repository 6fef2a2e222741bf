"""Idempotency keys on the server: a call that may have taken effect is never run twice under its key."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

import bastion
from bastion import Service
from bastion.server.dispatch import IdempotencyKeys
from bastion.store import open_store
from bastion.testing import MemoryServer

service = Service("effects")
applied: list[str] = []
entered: list[asyncio.Event] = []


@service.method
async def apply(tag: str) -> str:
    applied.append(tag)  # the effect happens first...
    entered[0].set()
    await asyncio.sleep(30)  # ...then the connection is lost before the answer
    return tag


@service.method(public=True)
async def hello() -> str:
    return "hi"


def test_a_keyed_call_cut_off_by_a_lost_connection_is_not_run_again(tmp_path: Path) -> None:
    async def main() -> None:
        applied.clear()
        entered[:] = [asyncio.Event()]
        async with open_store(tmp_path / "b.db") as store, MemoryServer(service) as memory:
            memory.server.idempotency = IdempotencyKeys(store, lease=30, wait=0.2)
            first = memory.client(timeout=60)
            call = asyncio.ensure_future(first.invoke("effects.apply", {"tag": "x"}, idempotency_key="k1"))
            await entered[0].wait()
            for session in list(memory.server.sessions):
                assert session.link is not None
                session.link.abort()  # the connection drops after the effect
            with pytest.raises(bastion.Unavailable, match="still running"):
                await call  # the client retried on a new connection: the first run goes on (30 s)
            assert memory.server.idempotency.stats()["detached_calls"] == 1
            retry = memory.client(timeout=5)
            with pytest.raises(bastion.Unavailable):  # still running: it is neither run again nor lost
                await retry.invoke("effects.apply", {"tag": "x"}, idempotency_key="k1")
            assert applied == ["x"]

    asyncio.run(main())


def test_public_methods_refuse_idempotency_keys(tmp_path: Path) -> None:
    async def main() -> None:
        async with open_store(tmp_path / "b.db") as store, MemoryServer(service) as memory:
            memory.server.idempotency = IdempotencyKeys(store)
            client = memory.client()
            with pytest.raises(bastion.InvalidArgument, match="not accepted on public methods"):
                await client.invoke("effects.hello", {}, idempotency_key="k2")

    asyncio.run(main())
