"""Running streams lose the rights their user loses: topic subscriptions and kv watches on a real ``bastion serve``."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest

import bastion
from bastion.client.aio import Client
from tests.support.stores import store_location

CONFIG = """
[[messages.topics.rules]]
pattern = "orders.>"
publish = ["role:dev"]
subscribe = ["role:dev"]

[[messages.topics.rules]]
pattern = "news.>"
subscribe = ["*"]

[[messages.topics.durable]]
pattern = "orders.>"
keep = 1000
"""


async def ends_with(stream: Any, kind: type[Exception], timeout: float = 15) -> list[Any]:
    """What ``stream`` yields before it ends with ``kind`` (failing if it does not within ``timeout``)."""
    got: list[Any] = []
    with pytest.raises(kind):
        async with asyncio.timeout(timeout):
            async for item in stream:
                got.append(item)
    return got


@pytest.mark.parametrize("backend", ["sqlite", "postgresql"])
def test_streams_end_permission_denied_when_the_user_loses_the_role_that_granted_them(
    server_factory: Any, tmp_path: Path, backend: str
) -> None:
    path = tmp_path / "bastion.toml"
    path.write_text(CONFIG)
    server = server_factory(env={"BASTION_STORE": store_location(backend, tmp_path), "BASTION_CONFIG": str(path)})

    async def main() -> None:
        async with Client(server.address, token=server.token, timeout=10) as admin:
            await admin.auth.create_user(name="carol", roles=["dev"])
            token = (await admin.auth.create_token(user="carol"))["token"]
            await admin.kv.create_namespace(name="team", readers=["role:dev"], writers=["role:dev"])
            async with Client(server.address, token=token, timeout=60) as carol:
                orders = carol.stream("messages.subscribe", pattern="orders.eu").__aiter__()
                wide = carol.stream("messages.subscribe", pattern=">").__aiter__()
                news = carol.stream("messages.subscribe", pattern="news.today").__aiter__()
                team = carol.stream("kv.watch", namespace="team").__aiter__()
                assert [(await anext(s))["type"] for s in (orders, wide, news, team)] == ["start"] * 4
                await admin.messages.publish(topic="orders.eu", payload="for devs")
                async with asyncio.timeout(10):
                    assert (await anext(orders))["payload"] == "for devs"
                    assert (await anext(wide))["payload"] == "for devs"
                await admin.auth.set_roles(name="carol", roles=[])
                # No traffic needed: the streams granted by the role end once the server re-checks carol.
                assert await ends_with(orders, bastion.PermissionDenied) == []
                assert await ends_with(team, bastion.PermissionDenied) == []
                # A wide pattern she may still partly read goes on, without the topics she lost.
                await admin.messages.publish(topic="orders.eu", payload="not for carol")
                await admin.messages.publish(topic="news.today", payload="for everyone")
                async with asyncio.timeout(10):
                    assert (await anext(wide))["payload"] == "for everyone"
                    assert (await anext(news))["payload"] == "for everyone"
                with pytest.raises(bastion.PermissionDenied):
                    await anext(carol.stream("messages.subscribe", pattern="orders.eu").__aiter__())
                await wide.aclose()
                await news.aclose()

    asyncio.run(main())


@pytest.mark.parametrize("backend", ["sqlite"])
def test_streams_end_unauthenticated_when_the_user_is_disabled(
    server_factory: Any, tmp_path: Path, backend: str
) -> None:
    path = tmp_path / "bastion.toml"
    path.write_text(CONFIG)
    server = server_factory(env={"BASTION_STORE": store_location(backend, tmp_path), "BASTION_CONFIG": str(path)})

    async def main() -> None:
        async with Client(server.address, token=server.token, timeout=10) as admin:
            await admin.auth.create_user(name="dave", roles=["dev"])
            token = (await admin.auth.create_token(user="dave"))["token"]
            async with Client(server.address, token=token, timeout=10) as dave:
                orders = dave.stream("messages.subscribe", pattern="orders.eu").__aiter__()
                mail = dave.stream("messages.watch").__aiter__()
                assert [(await anext(s))["type"] for s in (orders, mail)] == ["start"] * 2
                await admin.auth.disable_user(name="dave")
                await ends_with(orders, bastion.Unauthenticated)
                await ends_with(mail, (bastion.Unauthenticated, bastion.Unavailable))  # type: ignore[arg-type]

    asyncio.run(main())


@pytest.mark.parametrize("backend", ["sqlite", "postgresql"])
def test_a_wide_subscription_drops_what_it_buffered_of_the_topics_its_user_lost(
    server_factory: Any, tmp_path: Path, backend: str
) -> None:
    # Losing the role ended the single-topic subscriptions and emptied their buffers, but a wide pattern the
    # user could still partly read kept its buffer: every orders message buffered before the re-check (up to
    # subscriber_buffer of them) was still delivered after it.
    path = tmp_path / "bastion.toml"
    path.write_text(CONFIG)
    server = server_factory(env={"BASTION_STORE": store_location(backend, tmp_path), "BASTION_CONFIG": str(path)})
    published = 60  # far more than the stream holds outside the server's buffer: a window of 16, 1 in hand

    async def main() -> None:
        async with Client(server.address, token=server.token, timeout=10) as admin:
            await admin.auth.create_user(name="carol", roles=["dev"])
            token = (await admin.auth.create_token(user="carol"))["token"]
            async with Client(server.address, token=token, timeout=60) as carol:
                wide = carol.stream("messages.subscribe", pattern=">").__aiter__()
                orders = carol.stream("messages.subscribe", pattern="orders.eu").__aiter__()
                assert [(await anext(s))["type"] for s in (wide, orders)] == ["start"] * 2
                for i in range(published):  # wide is not read meanwhile; orders says the feed has offered each
                    await admin.messages.publish(topic="orders.eu", payload=i)
                    async with asyncio.timeout(10):
                        assert (await anext(orders))["payload"] == i
                await admin.auth.set_roles(name="carol", roles=[])
                # Ended in the same re-check that re-authorizes the wide subscription.
                assert await ends_with(orders, bastion.PermissionDenied) == []
                await admin.messages.publish(topic="news.today", payload="for everyone")
                got = []
                async with asyncio.timeout(10):
                    async for message in wide:
                        got.append(message["topic"])
                        if message["topic"] == "news.today":
                            break
                # What was already on its way to carol (her window of 16, 1 in hand) arrives; nothing more.
                assert got.count("orders.eu") <= 17, len(got)
                await wide.aclose()

    asyncio.run(main())
