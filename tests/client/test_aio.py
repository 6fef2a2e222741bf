"""The async client (bastion/client/aio.py), against a real server in memory (``bastion.testing``)."""

import asyncio
from collections.abc import AsyncIterator, Iterator
from typing import Any

import pytest

import bastion.testing
from bastion import ConnectionClosed, Service

service = Service("up")
state: dict[str, asyncio.Event] = {}


@service.method
async def total(xs: AsyncIterator[int]) -> int:
    state["started"].set()
    try:
        return sum([x async for x in xs])
    finally:
        state["stopped"].set()


@service.method
async def double(xs: AsyncIterator[int]) -> AsyncIterator[int]:
    async for x in xs:
        yield 2 * x


@service.method
async def hang() -> None:
    state["started"].set()
    await asyncio.sleep(30)


def run(coro: Any) -> Any:
    async def guarded() -> Any:
        state.update(started=asyncio.Event(), stopped=asyncio.Event())
        async with asyncio.timeout(10):
            return await coro

    return asyncio.run(guarded())


def broken(n: int) -> Iterator[int]:
    yield from range(n)
    raise ValueError("the source broke")


def test_an_upload_whose_items_raise_fails_with_that_error() -> None:
    async def main() -> None:
        async with bastion.testing.connect(service) as client:
            with pytest.raises(ValueError, match="the source broke"):
                await client.up.total.upload(broken(100))
            await asyncio.wait_for(state["stopped"].wait(), 2)  # the server's handler was cancelled
            assert await client.up.total.upload(range(10)) == 45

    run(main())


def test_a_bidi_stream_whose_items_raise_fails_with_that_error() -> None:
    async def main() -> None:
        async with bastion.testing.connect(service) as client:
            received = []
            with pytest.raises(ValueError, match="the source broke"):
                async for x in client.stream("up.double", broken(5)):
                    received.append(x)
            assert received == [0, 2, 4, 6, 8][: len(received)]
            assert [x async for x in client.stream("up.double", range(3))] == [0, 2, 4]

    run(main())


def test_closing_the_client_fails_the_calls_in_flight() -> None:
    async def main() -> None:
        async with bastion.testing.connect(service) as client:
            call = asyncio.ensure_future(client.up.hang())
            stream = asyncio.ensure_future(client.up.total.upload(iter(lambda: 1, None)))
            await state["started"].wait()
            await client.close()
            for pending in (call, stream):
                with pytest.raises(ConnectionClosed, match="the client was closed"):
                    await pending

    run(main())
