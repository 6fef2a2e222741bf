"""A resumable stream's own ending at a drain (``Context.end_at_drain``), over a real server on loopback TCP.

The drain ends resumable streams at once; one that registered an ending is ended with its status,
message and details (with the drain's retry-after), told whether the item it yielded last is still
waiting for the client's credit. One whose ending fails, or that has none, gets the bare UNAVAILABLE.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import pytest

import bastion
from bastion import Principal, Server, Service
from bastion.exceptions import Unavailable
from bastion.security.authn import StaticTokens
from bastion.service import Context

TOKEN = "bst_drain-endings-token-0123456789abcdef"
ADA = Principal("ada", frozenset({"user"}))


def make_service() -> Service:
    svc = Service("follow")

    @svc.method(resumable=True)
    async def counting(ctx: Context, items: int, broken: bool = False) -> AsyncIterator[int]:
        yielded = 0

        def ending(unsent: bool) -> Unavailable:
            if broken:
                raise RuntimeError("the ending failed")
            return Unavailable("counting ended", details={"yielded": yielded, "unsent": unsent})

        forget = ctx.end_at_drain(ending)
        try:
            while yielded < items:
                yielded += 1
                yield yielded
            await asyncio.Event().wait()  # never finishes by itself
        finally:
            forget()

    return svc


async def drained(client: bastion.Client, server: Server, **args: Any) -> tuple[list[int], Unavailable]:
    stream = client.stream("follow.counting", **args).__aiter__()
    got = [await anext(stream)]
    shutdown = asyncio.create_task(server.shutdown(grace=30))
    with pytest.raises(Unavailable) as ended:
        async for item in stream:
            got.append(item)
    await asyncio.wait_for(shutdown, 10)  # at once, not after the grace period
    return got, ended.value


@pytest.mark.parametrize(("items", "broken"), [(3, False), (100, False), (3, True)], ids=["idle", "stalled", "broken"])
def test_a_drain_ends_a_stream_with_its_own_ending(items: int, broken: bool) -> None:
    async def main() -> tuple[list[int], Unavailable]:
        server = Server([make_service()], authenticator=StaticTokens({TOKEN: ADA}))
        await server.start("127.0.0.1", 0)
        try:
            async with bastion.Client(f"127.0.0.1:{server.port}", token=TOKEN, insecure=True, timeout=20) as client:
                return await drained(client, server, items=items, broken=broken)
        finally:
            await server.shutdown(grace=1)

    got, error = asyncio.run(main())
    assert error.retry_after is not None
    if broken:
        assert "server is draining" in error.message and not error.details, (error.message, error.details)
        return
    assert error.message == "counting ended"
    assert got == list(range(1, len(got) + 1))
    if items == 3:  # it waits, every item sent
        assert error.details == {"yielded": items, "unsent": False}
    else:  # the client's credit ran out: the one it yielded last waits for more, unsent
        assert len(got) < items
        assert error.details == {"yielded": len(got) + 1, "unsent": True}
