"""Durable topics' bounds on real ``bastion serve`` processes, on SQLite and PostgreSQL: offsets, retention, limits."""

from __future__ import annotations

import asyncio
import signal
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest

import bastion
from bastion.client.aio import Client
from bastion.store import open_store
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


async def until(read: Callable[[], Awaitable[Any]], done: Callable[[Any], bool] = bool, timeout: float = 10) -> Any:
    """Poll ``read()`` until ``done`` says yes about what it returned; fail after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while not done(value := await read()):
        assert time.monotonic() < deadline, f"still {value!r} after {timeout}s"
        await asyncio.sleep(0.05)
    return value


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


TRIMMING = """
[messages.topics]
sweep_interval = 0.2

[[messages.topics.durable]]
pattern = "orders.>"
keep = 5
"""


@BACKENDS
def test_retention_trimming_unread_messages_ends_only_the_subscribers_that_lost_them(
    server_factory: Any, tmp_path: Path, backend: str
) -> None:
    """A's subscribers to orders.a and orders.b; while A is stopped, B publishes and its sweep trims orders.a
    past what A's feed had read. Only the orders.a subscriber ends; the orders.b one goes on, missing nothing."""
    location = store_location(backend, tmp_path, "shared")
    path = tmp_path / "trimming.toml"
    path.write_text(TRIMMING)
    env = {"BASTION_STORE": location, "BASTION_CONFIG": str(path)}
    a = server_factory(env=env, name="a")
    b = server_factory(env=env, name="b")
    token = (a if a.token_file.exists() else b).token

    async def main() -> None:
        async with Client(a.address, token=token, timeout=10) as on_a, Client(b.address, token=token) as on_b:
            lost = await started(on_a, "orders.a")
            kept = await started(on_a, "orders.b")
            wide = await started(on_a, "orders.b.>")
            assert await on_b.messages.publish(topic="orders.a", payload="a1") == 1
            assert await on_b.messages.publish(topic="orders.b", payload="b1") == 1
            async with asyncio.timeout(10):
                assert (await anext(lost))["payload"] == "a1"
                assert (await anext(kept))["payload"] == "b1"
            a.signal(signal.SIGSTOP)
            try:
                for i in range(2, 21):
                    await on_b.messages.publish(topic="orders.a", payload=f"a{i}")
                await on_b.messages.publish(topic="orders.b", payload="b2")
                await on_b.messages.publish(topic="orders.b.x", payload="bx")
                await until(lambda: on_b.messages.topic_info(topic="orders.a"), lambda i: i["first_offset"] >= 16)
            finally:
                a.signal(signal.SIGCONT)
            async with asyncio.timeout(10):
                assert [(m["offset"], m["payload"]) for m in [await anext(kept)]] == [(2, "b2")]
                assert (await anext(wide))["payload"] == "bx"
                with pytest.raises(bastion.ResourceExhausted, match="trimmed by retention") as info:
                    async for message in lost:
                        raise AssertionError(f"got {message} after a gap")
            assert info.value.details["resume_from"] == 2
            assert await on_b.messages.publish(topic="orders.b", payload="b3") == 3
            async with asyncio.timeout(10):
                assert (await anext(kept))["payload"] == "b3"
            await kept.aclose()
            await wide.aclose()

    asyncio.run(main())


EXPIRING = """
[messages.topics]
sweep_interval = 0.2
max_durable_topics_per_user = 2

[[messages.topics.durable]]
pattern = "user.>"
keep = 0
max_age = 1.5
"""


@BACKENDS
def test_durable_topics_per_user_are_bounded_and_expired_ones_are_forgotten_without_reusing_offsets(
    server_factory: Any, tmp_path: Path, backend: str
) -> None:
    server = serve(server_factory, tmp_path, backend, EXPIRING)

    async def main() -> None:
        async with Client(server.address, token=server.token, timeout=10) as admin:
            await admin.auth.create_user(name="bob")
            token = (await admin.auth.create_token(user="bob"))["token"]
        async with Client(server.address, token=token, timeout=10) as bob:
            publish = bob.messages.publish
            assert [await publish(topic="user.bob.t1", payload=i) for i in range(2)] == [1, 2]
            assert await publish(topic="user.bob.t2", payload="x") == 1
            with pytest.raises(bastion.ResourceExhausted, match="max_durable_topics_per_user") as info:
                await publish(topic="user.bob.t3", payload="refused")
            assert info.value.details == {"limit": 2}
            info3 = await bob.messages.topic_info(topic="user.bob.t3")
            assert (info3["first_offset"], info3["last_offset"]) == (0, 0)  # nothing was written
            assert await publish(topic="user.bob.t1", payload=2) == 3  # an existing topic is no new one
            # All of them expire (max_age) and are forgotten: the limit counts them no more.
            assert await until(lambda: refused_or(publish(topic="user.bob.t3", payload="now"))) == 1
            async with open_store(store_location(backend, tmp_path, "s")) as store:
                heads = await until(lambda: store.topics_heads("", 100), lambda h: len(h) == 1)
                assert [h.topic for h in heads] == ["user.bob.t3"]
            # Used again, a forgotten topic goes on above its old offsets, never reusing one.
            info1 = await bob.messages.topic_info(topic="user.bob.t1")
            assert (info1["first_offset"], info1["last_offset"]) == (4, 3)
            with pytest.raises(bastion.OutOfRange, match="next offset is 4"):
                async with asyncio.timeout(10):
                    async for _ in bob.stream("messages.subscribe", pattern="user.bob.t1", from_offset=5):
                        pass
            stream = await started(bob, "user.bob.t1", from_offset=4)
            assert await publish(topic="user.bob.t1", payload="again") == 4
            async with asyncio.timeout(10):
                assert (await anext(stream))["offset"] == 4
            await stream.aclose()

    asyncio.run(main())


async def refused_or(call: Awaitable[Any]) -> Any:
    """What ``call`` returns, or None if it is refused with RESOURCE_EXHAUSTED."""
    try:
        return await call
    except bastion.ResourceExhausted:
        return None


PERSONAL = """
[messages.topics]
sweep_interval = 3600

[[messages.topics.durable]]
pattern = "user.>"
keep = 1000
"""


@BACKENDS
@pytest.mark.parametrize("heir", [None, "cy"])
def test_deleting_a_user_empties_their_personal_durable_topics_for_whoever_gets_the_name_next(
    server_factory: Any, tmp_path: Path, backend: str, heir: str | None
) -> None:
    # auth.delete_user left a user's durable topics in user.<name>.> as they were: a user created later with
    # the same name owns that space, and replayed the deleted user's messages from offset 0.
    server = serve(server_factory, tmp_path, backend, PERSONAL)

    async def token_of(admin: Client, name: str) -> str:
        await admin.auth.create_user(name=name)
        return str((await admin.auth.create_token(user=name))["token"])

    async def main() -> None:
        async with Client(server.address, token=server.token, timeout=10) as admin:
            await token_of(admin, "cy")
            old = await token_of(admin, "bob")
            async with Client(server.address, token=old, timeout=10) as bob:
                offsets = [await bob.messages.publish(topic="user.bob.diary", payload=f"secret {i}") for i in (1, 2)]
                assert offsets == [1, 2]
                assert await bob.messages.publish(topic="user.bob.a.b", payload="secret 3") == 1
            await admin.messages.publish(topic="user.bobby.x", payload="not bob's")  # a neighbouring space
            deleted = await admin.auth.delete_user(name="bob", transfer_to=heir)
            new = await token_of(admin, "bob")
            async with Client(server.address, token=new, timeout=10) as bob:
                for topic, following in (("user.bob.diary", 3), ("user.bob.a.b", 2)):
                    info = await bob.messages.topic_info(topic=topic)
                    assert (info["first_offset"], info["last_offset"]) == (following, following - 1), info
                stream = await started(bob, "user.bob.diary", from_offset=0)
                # Offsets are not reused: the new owner's first message follows the old ones.
                assert await bob.messages.publish(topic="user.bob.diary", payload="mine") == 3
                async with asyncio.timeout(10):
                    assert (await anext(stream))["payload"] == "mine"
                await stream.aclose()
            info = await admin.messages.topic_info(topic="user.bobby.x")
            assert (info["first_offset"], info["last_offset"]) == (1, 1)
            assert deleted["items"]["topics"] == 3  # the messages that went

    asyncio.run(main())


ORDERS_ONE_EACH = """
[messages.topics]
sweep_interval = 3600
max_durable_topics_per_user = 1

[[messages.topics.durable]]
pattern = "orders.>"
keep = 1000

[[messages.topics.rules]]
pattern = "orders.>"
publish = ["*"]
subscribe = ["*"]
"""


@BACKENDS
@pytest.mark.parametrize("heir", [None, "cy"])
def test_deleting_a_user_passes_on_the_durable_topics_they_created_elsewhere_to_the_heir_or_to_nobody(
    server_factory: Any, tmp_path: Path, backend: str, heir: str | None
) -> None:
    # The durable topics a deleted user had created outside user.<name>.> stayed recorded as theirs, so a user
    # created later with the same name started with the old one's max_durable_topics_per_user already used.
    server = serve(server_factory, tmp_path, backend, ORDERS_ONE_EACH)

    async def token_of(admin: Client, name: str) -> str:
        await admin.auth.create_user(name=name)
        return str((await admin.auth.create_token(user=name))["token"])

    async def main() -> None:
        async with Client(server.address, token=server.token, timeout=10) as admin:
            cy_token = await token_of(admin, "cy")
            old = await token_of(admin, "bob")
            async with Client(server.address, token=old, timeout=10) as bob:
                assert [await bob.messages.publish(topic="orders.old", payload=i) for i in (1, 2)] == [1, 2]
                with pytest.raises(bastion.ResourceExhausted, match="created 1 durable"):
                    await bob.messages.publish(topic="orders.other", payload="over")
            await admin.auth.delete_user(name="bob", transfer_to=heir)
            new = await token_of(admin, "bob")
            async with Client(server.address, token=new, timeout=10) as bob:
                assert await bob.messages.publish(topic="orders.new", payload="mine") == 1  # starts at zero
                # The topic itself and its messages stay, for whoever may publish and read there.
                assert await bob.messages.publish(topic="orders.old", payload=3) == 3
                with pytest.raises(bastion.ResourceExhausted, match="created 1 durable"):
                    await bob.messages.publish(topic="orders.newer", payload="over")
            async with Client(server.address, token=cy_token, timeout=10) as cy:
                if heir is None:
                    assert await cy.messages.publish(topic="orders.cy", payload="x") == 1
                else:  # the heir has it now, counted against their limit
                    with pytest.raises(bastion.ResourceExhausted, match="created 1 durable"):
                        await cy.messages.publish(topic="orders.cy", payload="x")
            info = await admin.messages.topic_info(topic="orders.old")
            assert (info["first_offset"], info["last_offset"]) == (1, 3)

    asyncio.run(main())
