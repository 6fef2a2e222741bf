"""Durable topics' bounds on real ``bastion serve`` processes, on SQLite and PostgreSQL: offsets, retention, limits."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest

import bastion
from bastion.client.aio import Client
from tests.support.stores import store_location

BACKENDS = pytest.mark.parametrize("backend", ["sqlite", "postgresql"])

CONFIG = """
[messages.topics]
sweep_interval = 3600

[[messages.topics.durable]]
pattern = "orders.>"
keep = 1000
"""


def serve(server_factory: Any, tmp_path: Path, backend: str, config: str = CONFIG, name: str = "s") -> Any:
    path = tmp_path / f"{name}.toml"
    path.write_text(config)
    env = {"BASTION_STORE": store_location(backend, tmp_path, name), "BASTION_CONFIG": str(path)}
    return server_factory(env=env, name=name)


async def started(client: Client, pattern: str, **args: Any) -> Any:
    stream = client.stream("messages.subscribe", pattern=pattern, **args).__aiter__()
    assert (await anext(stream))["type"] == "start"
    return stream


@BACKENDS
def test_from_offset_past_the_end_is_out_of_range_naming_the_end(
    server_factory: Any, tmp_path: Path, backend: str
) -> None:
    server = serve(server_factory, tmp_path, backend)

    async def main() -> None:
        async with Client(server.address, token=server.token, timeout=10) as client:
            for i in range(3):
                assert await client.messages.publish(topic="orders.eu", payload=i) == i + 1
            for beyond in (5, 2**40):
                stream = client.stream("messages.subscribe", pattern="orders.eu", from_offset=beyond).__aiter__()
                with pytest.raises(bastion.OutOfRange, match="the next offset is 4") as info:
                    async with asyncio.timeout(10):
                        async for _ in stream:
                            pass
                assert info.value.details == {"earliest": 1, "next": 4}
            # Nothing published yet: only 0 and 1 are positions in it.
            with pytest.raises(bastion.OutOfRange, match="the next offset is 1"):
                async with asyncio.timeout(10):
                    async for _ in client.stream("messages.subscribe", pattern="orders.none", from_offset=2):
                        pass
            # The next offset itself is where a caught-up subscriber resumes: accepted, and it gets it.
            stream = await started(client, "orders.eu", from_offset=4)
            assert await client.messages.publish(topic="orders.eu", payload="four") == 4
            async with asyncio.timeout(10):
                got = await anext(stream)
            assert (got["offset"], got["payload"]) == (4, "four")
            await stream.aclose()
            stream = await started(client, "orders.fresh", from_offset=1)
            assert await client.messages.publish(topic="orders.fresh", payload="one") == 1
            async with asyncio.timeout(10):
                assert (await anext(stream))["offset"] == 1
            await stream.aclose()

    asyncio.run(main())
