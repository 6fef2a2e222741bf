"""Topics across real ``bastion serve`` processes: replicas on PostgreSQL, a slow subscriber over TCP."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

import pytest

import bastion
from bastion.client.aio import Client
from tests.support.server import read_rss_kib
from tests.support.stores import store_location

CONFIG = """
[messages.topics]
subscriber_buffer = {buffer}

[[messages.topics.durable]]
pattern = "orders.>"
keep = 10000
"""


def config_file(tmp_path: Path, buffer: int = 1024) -> str:
    path = tmp_path / "bastion.toml"
    path.write_text(CONFIG.format(buffer=buffer))
    return str(path)


def test_a_subscriber_on_one_replica_gets_what_is_published_on_another_within_a_second(
    server_factory: Any, tmp_path: Path
) -> None:
    env = {"BASTION_STORE": store_location("postgresql", tmp_path, "shared"), "BASTION_CONFIG": config_file(tmp_path)}
    a = server_factory(env=env, name="a")
    b = server_factory(env=env, name="b")
    token = (a if a.token_file.exists() else b).token

    async def main() -> list[float]:
        async with Client(a.address, token=token, timeout=10) as on_a, Client(b.address, token=token) as on_b:
            me = (await on_b.auth.whoami())["name"]
            live = on_a.stream("messages.subscribe", pattern="chat.>").__aiter__()
            kept = on_a.stream("messages.subscribe", pattern="orders.eu", from_offset=0).__aiter__()
            assert (await anext(live))["type"] == (await anext(kept))["type"] == "start"
            delays = []
            for i in range(5):
                sent = time.monotonic()
                assert await on_b.messages.publish(topic="chat.lobby", payload={"i": i}) is None
                offset = await on_b.messages.publish(topic="orders.eu", payload=i)
                async with asyncio.timeout(1.0):
                    message, durable = await anext(live), await anext(kept)
                delays.append(time.monotonic() - sent)
                assert (message["topic"], message["payload"], message["publisher"]) == ("chat.lobby", {"i": i}, me)
                assert (durable["offset"], durable["payload"]) == (offset, i) and offset == i + 1
            await kept.aclose()  # type: ignore[attr-defined]
            # Disconnected from A; B goes on publishing; resuming on A from the next offset misses nothing.
            for i in range(5, 10):
                await on_b.messages.publish(topic="orders.eu", payload=i)
            resumed = on_a.stream("messages.subscribe", pattern="orders.eu", from_offset=6).__aiter__()
            await anext(resumed)
            await on_b.messages.publish(topic="orders.eu", payload=10)
            got = [await anext(resumed) for _ in range(6)]
            assert [(m["offset"], m["payload"]) for m in got] == [(o, o - 1) for o in range(6, 12)]
            await resumed.aclose()  # type: ignore[attr-defined]
            await live.aclose()  # type: ignore[attr-defined]
            return delays

    delays = asyncio.run(main())
    assert max(delays) < 1.0, delays


def test_a_subscriber_that_stops_reading_holds_up_no_one_over_tcp(server_factory: Any, tmp_path: Path) -> None:
    server = server_factory(env={"BASTION_CONFIG": config_file(tmp_path, buffer=16)})
    total = 3000
    payload = b"x" * 1000

    async def main() -> None:
        async with (
            Client(server.address, token=server.token, timeout=10) as publisher,
            # a stream's timeout covers its whole life: the paced publishing can take over 10 s on a loaded machine
            Client(server.address, token=server.token, timeout=60) as fast_client,
            Client(server.address, token=server.token, timeout=60) as slow_client,
        ):
            slow = slow_client.stream("messages.subscribe", pattern="orders.eu").__aiter__()
            fast = fast_client.stream("messages.subscribe", pattern="orders.>").__aiter__()
            assert (await anext(slow))["type"] == (await anext(fast))["type"] == "start"
            offsets: list[int] = []

            progress = asyncio.Event()

            async def read_fast() -> None:
                try:
                    while len(offsets) < total:
                        offsets.append((await anext(fast))["offset"])
                        progress.set()
                finally:
                    progress.set()

            reader = asyncio.create_task(read_fast())

            async def caught_up(n: int) -> None:
                async with asyncio.timeout(30):
                    while len(offsets) < n and not reader.done():  # done early: it failed (awaited below)
                        progress.clear()
                        await progress.wait()

            for i in range(total):  # the slow subscriber never reads meanwhile
                await publisher.messages.publish(topic="orders.eu", payload=payload)
                # The fast one is bounded too (a buffer of 16): the feed hands over at once what was committed
                # while it lagged (a loaded machine), so the publisher keeps pace with it, never with the slow one.
                if i % 8 == 7:
                    await caught_up(i + 1)
            async with asyncio.timeout(30):
                await reader
            assert offsets == list(range(1, total + 1))
            got: list[int] = []
            with pytest.raises(bastion.ResourceExhausted, match="from_offset=") as info:
                async for message in slow:
                    got.append(message["offset"])
            resume = info.value.details["resume_from"]
            assert got == list(range(1, resume)) and resume < total  # bounded: far fewer than were published
            assert info.value.details["dropped"] > 0
            await fast.aclose()  # type: ignore[attr-defined]

    asyncio.run(main())


def test_a_slow_subscribers_buffer_holds_payload_bytes_not_the_objects_they_decode_to(
    server_factory: Any, tmp_path: Path
) -> None:
    """subscriber_buffer_bytes bounds the server's memory: 50 KB of empty maps must not take 3.6 MB each."""
    path = tmp_path / "bastion.toml"
    path.write_text("[messages.topics]\nsubscriber_buffer_bytes = 1048576\n")
    server = server_factory(env={"BASTION_CONFIG": str(path)})
    payload: list[Any] = [{}] * 50_000  # 50 KB of MessagePack; 64 bytes a map once decoded

    async def main() -> None:
        async with (
            Client(server.address, token=server.token, timeout=30) as publisher,
            Client(server.address, token=server.token, timeout=30) as slow_client,
        ):
            topic = f"user.{(await publisher.auth.whoami())['name']}.bulk"
            for _ in range(5):  # warm up: the server decodes each publish's arguments once, then frees them
                await publisher.messages.publish(topic=topic, payload=payload)
            before = read_rss_kib(server.pid)
            slow = slow_client.stream("messages.subscribe", pattern=topic).__aiter__()
            assert (await anext(slow))["type"] == "start"
            for _ in range(60):  # about 20 fit the 1 MiB buffer; the slow subscriber reads none meanwhile
                await publisher.messages.publish(topic=topic, payload=payload)
            grown = (read_rss_kib(server.pid) - before) / 1024
            assert grown < 24, f"the server grew by {grown:.0f} MiB holding a 1 MiB subscriber buffer"
            got = 0
            with pytest.raises(bastion.ResourceExhausted, match="fell behind"):
                async for message in slow:
                    assert message["payload"] == payload
                    got += 1
            assert 0 < got < 60

    asyncio.run(main())


@pytest.mark.parametrize("backend", ["sqlite", "postgresql"])
def test_replaying_subscribers_that_stop_reading_hold_a_bounded_page_each(
    server_factory: Any, tmp_path: Path, backend: str
) -> None:
    """A replay read 256 messages at once: with full-size payloads (256 KiB) 64 MiB, held by each subscription
    parked mid-page by a client that stopped reading. Its pages are bounded in bytes now."""
    server = server_factory(
        env={"BASTION_STORE": store_location(backend, tmp_path), "BASTION_CONFIG": config_file(tmp_path)}
    )
    payload = b"x" * 250_000
    subscribers = 4

    async def main() -> None:
        async with Client(server.address, token=server.token, timeout=30) as client:
            for _ in range(300):  # about 75 MB kept in orders.eu
                await client.messages.publish(topic="orders.eu", payload=payload)
            before = read_rss_kib(server.pid)
            streams = [
                client.stream("messages.subscribe", pattern="orders.eu", from_offset=0).__aiter__()
                for _ in range(subscribers)
            ]
            for stream in streams:  # each reads one message and then no more: the rest waits on the server
                assert (await anext(stream))["type"] == "start"
                assert (await anext(stream))["offset"] == 1
            grown = (read_rss_kib(server.pid) - before) / 1024
            assert grown < 48, f"the server grew by {grown:.0f} MiB for {subscribers} replaying subscribers"
            for stream in streams:
                await stream.aclose()  # type: ignore[attr-defined]

    asyncio.run(main())
