"""Topics of the messages service over a real store (both backends), through the in-memory client/server pair."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import msgspec
import pytest

import bastion
from bastion.config import DurableTopic, TopicRule, TopicsConfig
from bastion.security.principal import Principal
from bastion.service import Service
from bastion.services.topics import Topics, _Subscription
from bastion.store import Store, open_store
from bastion.store.topics import TopicMessage
from bastion.testing import TESTER, MemoryServer
from tests.support.stores import service_store

pytestmark = pytest.mark.usefixtures("service_backend")

ADA = Principal("ada", frozenset())
BOB = Principal("bob", frozenset({"dev"}))
EVE = Principal("eve", frozenset())
DEADLINE = 15.0
RULES = [
    TopicRule("chat.>", publish=["role:dev", "user:ada"], subscribe=["role:dev", "user:ada"]),
    TopicRule("news.>", publish=["user:ada"], subscribe=["*"]),
    TopicRule("orders.>", publish=["user:ada"], subscribe=["user:ada", "role:dev"]),
]
CONFIG = TopicsConfig(rules=RULES, durable=[DurableTopic("orders.>", keep=1000)], sweep_interval=3600)


class World:
    def __init__(self, server: MemoryServer, topics: Topics, store: Store) -> None:
        self.server, self.topics, self.store = server, topics, store
        self.admin = server.client(principal=TESTER)
        self.ada = server.client(principal=ADA)
        self.bob = server.client(principal=BOB)
        self.eve = server.client(principal=EVE)


def topics_service(topics: Topics) -> Service:
    service = Service("messages", refuse_nul=True)  # as Messages declares it
    topics.declare(service)
    return service


@asynccontextmanager
async def world(tmp_path: Path, config: TopicsConfig, relay: bool = True) -> AsyncIterator[World]:
    async with open_store(service_store(tmp_path)) as store:
        topics = Topics(store, config, relay=relay)
        await topics.start()
        try:
            async with MemoryServer([topics_service(topics)]) as server:
                yield World(server, topics, store)
        finally:
            await topics.aclose()


def run(
    test: Callable[[World], Awaitable[None]], tmp_path: Path, config: TopicsConfig = CONFIG, relay: bool = True
) -> None:
    async def main() -> None:
        async with asyncio.timeout(DEADLINE), world(tmp_path, config, relay) as w:
            await test(w)

    asyncio.run(main())


async def subscribed(client: Any, pattern: str, **args: Any) -> AsyncIterator[Any]:
    """A subscription stream, once its "start" item says it is live."""
    stream = client.stream("messages.subscribe", pattern=pattern, **args)
    start = await anext(stream)
    assert start["type"] == "start"
    return stream  # type: ignore[no-any-return]


async def take(stream: AsyncIterator[Any], n: int) -> list[Any]:
    return [await anext(stream) for _ in range(n)]


@pytest.mark.parametrize("relay", [True, False], ids=["relayed", "alone"])
def test_live_messages_reach_current_subscribers_with_the_server_set_publisher(tmp_path: Path, relay: bool) -> None:
    async def test(w: World) -> None:
        assert await w.ada.messages.publish(topic="chat.lobby", payload=b"before anyone listens") is None
        bob = await subscribed(w.bob, "chat.*")
        sent = time.time()
        assert await w.ada.messages.publish(topic="chat.lobby", payload=b"hi", headers={"publisher": "admin"}) is None
        await w.bob.messages.publish(topic="chat.dev", payload={"text": "structured", "n": [1, 2.5, None]})
        await w.ada.messages.publish(topic="chat.lobby.deep", payload=b"not matched by chat.*")
        await w.ada.messages.publish(topic="chat.lobby", payload="last")
        first, second, third = await take(bob, 3)
        # The publisher is who the server authenticated; a header cannot claim otherwise.
        assert (first["topic"], first["publisher"], first["payload"], first["offset"]) == (
            "chat.lobby",
            "ada",
            b"hi",
            None,
        )
        assert first["headers"] == {"publisher": "admin"} and sent - 1 <= first["time"] <= time.time() + 1
        assert (second["publisher"], second["payload"]) == ("bob", {"text": "structured", "n": [1, 2.5, None]})
        assert third["payload"] == "last"
        with pytest.raises(bastion.InvalidArgument):
            await w.ada.messages.publish(topic="chat.lobby", payload=b"x", publisher="admin")
        await bob.aclose()  # type: ignore[attr-defined]
        # Relayed, live messages pass through the store's log for other processes; alone, never.
        logged, _ = await w.store.topics_feed(0, 100)
        assert len([m for m in logged if m.offset is None]) == (5 if relay else 0)

    run(test, tmp_path, relay=relay)


@pytest.mark.parametrize(
    ("topic", "why"),
    [("", "1 to"), ("a..b", "not valid"), ("a.*", "not valid"), ("a.>", "not valid"), ("a b", "not valid"),
     (".a", "not valid"), ("a.", "not valid"), ("x" * 256, "1 to 255"), ("caf\u00e9", "not valid")],
)  # fmt: skip
def test_bad_topic_names_are_invalid_argument(tmp_path: Path, topic: str, why: str) -> None:
    async def test(w: World) -> None:
        with pytest.raises(bastion.InvalidArgument, match=why):
            await w.admin.messages.publish(topic=topic, payload=b"")
        with pytest.raises(bastion.InvalidArgument):
            await w.admin.messages.topic_info(topic=topic)

    run(test, tmp_path)


@pytest.mark.parametrize("pattern", ["", "a.>.b", "a.b>", "a.**", ">.a", "a..b", "a.*x"])
def test_bad_patterns_are_invalid_argument(tmp_path: Path, pattern: str) -> None:
    async def test(w: World) -> None:
        with pytest.raises(bastion.InvalidArgument):
            await anext(w.admin.stream("messages.subscribe", pattern=pattern))

    run(test, tmp_path)


def test_access_rules_personal_space_and_admins(tmp_path: Path) -> None:
    async def test(w: World) -> None:
        with pytest.raises(bastion.PermissionDenied, match="no publish access"):
            await w.eve.messages.publish(topic="chat.lobby", payload=b"x")
        with pytest.raises(bastion.PermissionDenied, match="no publish access"):
            await w.eve.messages.publish(topic="user.ada.inbox", payload=b"x")  # another user's space
        with pytest.raises(bastion.PermissionDenied, match="no subscribe access"):
            await anext(w.eve.stream("messages.subscribe", pattern="chat.>"))
        with pytest.raises(bastion.PermissionDenied, match="no subscribe access"):
            await anext(w.eve.stream("messages.subscribe", pattern="user.ada.>"))
        with pytest.raises(bastion.PermissionDenied):
            await w.eve.messages.topic_info(topic="chat.lobby")
        # Everyone: their own space; news for everyone; a wide pattern delivers only what eve may read.
        mine = await subscribed(w.eve, "user.eve.>")
        wide = await subscribed(w.eve, ">")
        admin = await subscribed(w.admin, ">")
        await w.eve.messages.publish(topic="user.eve.notes", payload=b"note")
        await w.ada.messages.publish(topic="chat.lobby", payload=b"secret")
        await w.admin.messages.publish(topic="anything.at.all", payload=b"admin")
        await w.ada.messages.publish(topic="news.today", payload=b"news")
        assert [m["payload"] for m in await take(mine, 1)] == [b"note"]
        assert [m["topic"] for m in await take(wide, 2)] == ["user.eve.notes", "news.today"]
        assert [m["topic"] for m in await take(admin, 4)] == [
            "user.eve.notes",
            "chat.lobby",
            "anything.at.all",
            "news.today",
        ]
        info = await w.eve.messages.topic_info(topic="news.today")
        assert (info["may_publish"], info["may_subscribe"], info["durable"]) == (False, True, False)
        for stream in (mine, wide, admin):
            await stream.aclose()  # type: ignore[attr-defined]

    run(test, tmp_path)


def test_a_dotted_user_name_owns_its_space_without_reaching_another_users(tmp_path: Path) -> None:
    async def test(w: World) -> None:
        dotted = w.server.client(principal=Principal("ada.l", frozenset()))
        await dotted.messages.publish(topic="user.ada~l.x", payload=b"ok")
        with pytest.raises(bastion.PermissionDenied):
            await dotted.messages.publish(topic="user.ada.l.x", payload=b"x")  # inside ada's space
        with pytest.raises(bastion.PermissionDenied):
            await w.ada.messages.publish(topic="user.ada~l.x", payload=b"x")

    run(test, tmp_path)


def test_a_certificate_name_that_is_no_user_name_has_no_personal_space(tmp_path: Path) -> None:
    async def test(w: World) -> None:
        # A client certificate's subject is the principal's name, unchecked: "*" used to own "user.*.>",
        # every user's space; "ada~l" the space of user "ada.l" (user names cannot hold "~").
        for name, topic in (("*", "user.ada.inbox"), (">", "user.ada.inbox"), ("ada~l", "user.ada~l.x")):
            other = w.server.client(principal=Principal(name, frozenset(), mechanism="mtls"))
            with pytest.raises(bastion.PermissionDenied):
                await other.messages.publish(topic=topic, payload=b"x")
            with pytest.raises(bastion.PermissionDenied):
                await anext(other.stream("messages.subscribe", pattern="user.>"))
        cert = w.server.client(principal=Principal("device-7@plant", frozenset(), mechanism="mtls"))
        await cert.messages.publish(topic="user.device-7@plant.x", payload=b"ok")  # a user-like name: its own

    run(test, tmp_path)


def test_durable_topics_give_offsets_and_resume_from_one_missing_nothing(tmp_path: Path) -> None:
    async def test(w: World) -> None:
        offsets = [await w.ada.messages.publish(topic="orders.eu", payload={"n": i}) for i in range(5)]
        assert offsets == [1, 2, 3, 4, 5]
        assert await w.ada.messages.publish(topic="orders.us", payload={"n": 0}) == 1  # per-topic offsets
        stream = await subscribed(w.bob, "orders.eu", from_offset=3)
        got = await take(stream, 3)
        assert [(m["offset"], m["payload"]["n"]) for m in got] == [(3, 2), (4, 3), (5, 4)]
        await w.ada.messages.publish(topic="orders.eu", payload={"n": 5})
        assert (await anext(stream))["offset"] == 6
        await stream.aclose()  # type: ignore[attr-defined]
        # Disconnected: meanwhile more is published; resuming from the next offset misses nothing.
        for i in range(6, 9):
            await w.ada.messages.publish(topic="orders.eu", payload={"n": i})
        again = await subscribed(w.bob, "orders.eu", from_offset=7)
        assert [m["offset"] for m in await take(again, 3)] == [7, 8, 9]
        await again.aclose()  # type: ignore[attr-defined]
        earliest = await subscribed(w.bob, "orders.eu", from_offset=0)
        assert [m["offset"] for m in await take(earliest, 2)] == [1, 2]
        await earliest.aclose()  # type: ignore[attr-defined]
        info = await w.bob.messages.topic_info(topic="orders.eu")
        assert (info["durable"], info["first_offset"], info["last_offset"]) == (True, 1, 9)

    run(test, tmp_path)


def test_from_offset_needs_one_durable_topic(tmp_path: Path) -> None:
    async def test(w: World) -> None:
        for pattern in ("orders.*", "chat.lobby"):
            with pytest.raises(bastion.InvalidArgument, match="one durable topic"):
                await anext(w.ada.stream("messages.subscribe", pattern=pattern, from_offset=1))
        for bad in (-1, 2**63, 2**64 - 1):  # past 2**63-1: the store refused it, after "start"
            with pytest.raises(bastion.InvalidArgument, match="from_offset must be an offset"):
                await anext(w.ada.stream("messages.subscribe", pattern="orders.eu", from_offset=bad))

    run(test, tmp_path)


def test_replay_and_live_meet_without_gap_or_duplicate_under_concurrent_publishing(tmp_path: Path) -> None:
    async def test(w: World) -> None:
        total = 300

        halfway = asyncio.Event()

        async def publish() -> None:
            for i in range(total):
                await w.ada.messages.publish(topic="orders.seam", payload=i)
                if i == 50:
                    halfway.set()

        publisher = asyncio.create_task(publish())
        await halfway.wait()
        stream = await subscribed(w.bob, "orders.seam", from_offset=1)  # joins mid-stream
        got = await take(stream, total)
        await publisher
        assert [m["offset"] for m in got] == list(range(1, total + 1))
        assert [m["payload"] for m in got] == list(range(total))
        await stream.aclose()  # type: ignore[attr-defined]

    run(test, tmp_path)


def test_retention_trims_and_resuming_from_a_trimmed_offset_is_out_of_range(tmp_path: Path) -> None:
    config = TopicsConfig(rules=RULES, durable=[DurableTopic("orders.>", keep=3)], sweep_interval=3600)

    async def test(w: World) -> None:
        for i in range(10):
            await w.ada.messages.publish(topic="orders.eu", payload=i)
        assert await w.topics.sweep() == 7
        with pytest.raises(bastion.OutOfRange, match="earliest kept is 8") as info:
            await take(w.bob.stream("messages.subscribe", pattern="orders.eu", from_offset=2), 2)
        assert info.value.details["earliest"] == 8
        stream = await subscribed(w.bob, "orders.eu", from_offset=0)
        assert [m["payload"] for m in await take(stream, 3)] == [7, 8, 9]
        await stream.aclose()  # type: ignore[attr-defined]

    run(test, tmp_path, config)


def test_retention_by_age_and_live_relay_expiry(tmp_path: Path) -> None:
    config = TopicsConfig(rules=RULES, durable=[DurableTopic("orders.>", keep=0, max_age=60)], sweep_interval=3600)

    async def test(w: World) -> None:
        for i in range(4):
            await w.ada.messages.publish(topic="orders.eu", payload=i)
        await w.ada.messages.publish(topic="chat.lobby", payload=b"live")
        assert await w.topics.sweep(now=time.time() + 20) == 0  # young enough (relay_seconds is 30)
        assert await w.topics.sweep(now=time.time() + 61) == 5  # 4 durable, 1 live relayed
        info = await w.ada.messages.topic_info(topic="orders.eu")
        assert (info["first_offset"], info["last_offset"]) == (5, 4)
        assert await w.ada.messages.publish(topic="orders.eu", payload=4) == 5

    run(test, tmp_path, config)


def test_a_drain_before_the_replay_begins_resumes_from_the_offset_asked_for(tmp_path: Path) -> None:
    """The drain's ending (Context.end_at_drain) came in the window between joining the hub and the replay's
    first read: a live message buffered meanwhile (offset 1001) was taken for the first not delivered, and
    the client told to resume past 10..1000, which it had not been sent (review)."""

    async def test(w: World) -> None:
        sub = _Subscription(w.topics, SimpleNamespace(principal=ADA), "orders.eu", 10)  # type: ignore[arg-type]
        live = TopicMessage(1, "orders.eu", 1001, "ada", b"x", {}, 0.0)
        sub.subscriber.offer(live, {"type": "message", "topic": "orders.eu", "offset": 1001})  # type: ignore[arg-type]
        ending = sub.drained(False)
        assert ending.details["resume_from"] == 10, ending.details
        assert ending.details["dropped"] == 1

    run(test, tmp_path)


def slow_config(buffer: int) -> TopicsConfig:
    return TopicsConfig(rules=RULES, durable=[DurableTopic("orders.>")], sweep_interval=3600, subscriber_buffer=buffer)


def test_a_subscriber_that_stops_reading_holds_up_no_one_and_is_told_where_to_resume(tmp_path: Path) -> None:
    async def test(w: World) -> None:
        total = 300
        slow = await subscribed(w.bob, "orders.eu")
        fast = await subscribed(w.ada, "orders.eu")
        received: list[int] = []

        async def read_fast() -> None:
            async for message in fast:
                received.append(message["offset"])
                if len(received) == total:
                    return

        reader = asyncio.create_task(read_fast())
        started = time.monotonic()
        for i in range(total):  # the publisher never waits for the slow subscriber
            await w.ada.messages.publish(topic="orders.eu", payload=i)
            if i % 4 == 3:  # but keeps pace with the fast one, so that a burst the store's feed hands
                await _eventually(lambda i=i: len(received) > i)  # over at once fits its buffer of 8
        publishing = time.monotonic() - started
        await reader
        assert received == list(range(1, total + 1))  # the other subscriber got every one
        # The slow subscriber's buffer on the server stayed bounded.
        buffers = [len(s.buffer) for s in w.topics.hub._subscribers]
        assert len(buffers) == 2 and max(buffers) <= 8, buffers
        got = []
        with pytest.raises(bastion.ResourceExhausted, match="from_offset=") as info:
            async for message in slow:
                got.append(message["offset"])
        details = info.value.details
        assert details["dropped"] > 0 and details["resume_from"] == got[-1] + 1
        assert got == list(range(1, details["resume_from"]))
        rest = await subscribed(w.bob, "orders.eu", from_offset=details["resume_from"])
        assert [m["offset"] for m in await take(rest, total - len(got))] == list(range(len(got) + 1, total + 1))
        await rest.aclose()  # type: ignore[attr-defined]
        assert publishing < DEADLINE / 2

    run(test, tmp_path, slow_config(8))


def test_a_slow_live_subscriber_is_told_how_many_it_dropped(tmp_path: Path) -> None:
    async def test(w: World) -> None:
        slow = await subscribed(w.bob, "chat.>")
        for i in range(100):
            await w.ada.messages.publish(topic="chat.lobby", payload=i)
        got = []
        with pytest.raises(bastion.ResourceExhausted, match=r"(messages were|message was) dropped") as info:
            async for message in slow:
                got.append(message["payload"])
        assert got == list(range(len(got)))
        # Counted until the stream ended (a message the feed had not reached yet is not counted).
        assert 0 < info.value.details["dropped"] <= 100 - len(got)
        assert "resume_from" not in info.value.details

    run(test, tmp_path, slow_config(4))


def test_limits_on_payload_headers_and_subscriptions(tmp_path: Path) -> None:
    config = TopicsConfig(
        rules=RULES, max_payload_bytes=100, max_headers=2, max_subscribers=3, max_subscribers_per_user=2,
        sweep_interval=3600,
    )  # fmt: skip

    async def test(w: World) -> None:
        with pytest.raises(bastion.InvalidArgument, match="max_payload_bytes"):
            await w.ada.messages.publish(topic="chat.x", payload=b"x" * 200)
        with pytest.raises(bastion.InvalidArgument, match="max_headers"):
            await w.ada.messages.publish(topic="chat.x", payload=b"", headers={"a": "1", "b": "2", "c": "3"})
        with pytest.raises(bastion.InvalidArgument, match="max_header_bytes"):
            await w.ada.messages.publish(topic="chat.x", payload=b"", headers={"a": "x" * 5000})
        streams = [await subscribed(w.ada, "chat.>") for _ in range(2)]
        with pytest.raises(bastion.ResourceExhausted, match="max_subscribers_per_user"):
            await anext(w.ada.stream("messages.subscribe", pattern="chat.>"))
        streams.append(await subscribed(w.bob, "chat.>"))
        with pytest.raises(bastion.ResourceExhausted, match=r"max_subscribers\)"):
            await anext(w.eve.stream("messages.subscribe", pattern="news.>"))
        for stream in streams:
            await stream.aclose()  # type: ignore[attr-defined]
        assert len(w.topics.hub) == 0 or await _eventually(lambda: len(w.topics.hub) == 0)

    run(test, tmp_path, config)


def test_subscriptions_opened_at_once_cannot_all_pass_the_limits(tmp_path: Path) -> None:
    config = TopicsConfig(rules=RULES, max_subscribers=3, max_subscribers_per_user=2, sweep_interval=3600)

    async def opened(stream: AsyncIterator[Any]) -> str:
        try:
            return str((await anext(stream))["type"])
        except bastion.ResourceExhausted as e:
            return "per user" if "max_subscribers_per_user" in e.message else "server"

    async def test(w: World) -> None:
        # Each checked the limits, then waited to join the hub: all used to pass (6 open of a limit of 2).
        mine = [w.ada.stream("messages.subscribe", pattern="chat.>") for _ in range(6)]
        assert sorted(await asyncio.gather(*map(opened, mine))) == ["per user"] * 4 + ["start"] * 2
        others = [w.bob.stream("messages.subscribe", pattern="chat.>") for _ in range(2)]
        assert sorted(await asyncio.gather(*map(opened, others))) == ["server", "start"]
        assert len(w.topics.hub) == 3
        for stream in mine + others:
            await stream.aclose()  # type: ignore[attr-defined]

    run(test, tmp_path, config)


async def _eventually(check: Callable[[], bool]) -> bool:
    deadline = time.monotonic() + 5
    while not check():
        assert time.monotonic() < deadline
        await asyncio.sleep(0.01)
    return True


def test_subscribers_end_unavailable_with_where_to_resume_when_the_service_stops(tmp_path: Path) -> None:
    async def test(w: World) -> None:
        stream = await subscribed(w.bob, "orders.eu")
        await w.ada.messages.publish(topic="orders.eu", payload=0)
        assert (await anext(stream))["offset"] == 1
        await w.topics.aclose()
        with pytest.raises(bastion.Unavailable, match="from_offset=2") as info:
            await anext(stream)
        assert info.value.details["resume_from"] == 2

    run(test, tmp_path)


def test_another_process_on_the_same_store_delivers_within_a_second(tmp_path: Path) -> None:
    """Two Topics on one store, as two workers (SQLite) or replicas (PostgreSQL) would be."""

    async def test(w: World) -> None:
        other = Topics(w.store, CONFIG)
        await other.start()
        try:
            async with MemoryServer([topics_service(other)]) as server:
                remote = server.client(principal=ADA)
                stream = await subscribed(w.bob, "chat.>")
                durable = await subscribed(w.bob, "orders.eu", from_offset=1)
                for i in range(3):
                    sent = time.monotonic()
                    await remote.messages.publish(topic="chat.lobby", payload=i)
                    offset = await remote.messages.publish(topic="orders.eu", payload=i)
                    async with asyncio.timeout(1.0):
                        live, kept = await anext(stream), await anext(durable)
                    assert time.monotonic() - sent < 1.0
                    assert (live["payload"], live["publisher"]) == (i, "ada")
                    assert (kept["payload"], kept["offset"]) == (i, offset)
                await stream.aclose()  # type: ignore[attr-defined]
                await durable.aclose()  # type: ignore[attr-defined]
        finally:
            await other.aclose()

    run(test, tmp_path)


def test_a_publishers_durable_and_live_messages_arrive_in_the_order_published(tmp_path: Path) -> None:
    # Alone on its store, a live message skips the log -- but never overtakes the
    # durable messages its publisher sent before it.
    async def test(w: World) -> None:
        sub = await subscribed(w.admin, ">")
        sent = []
        for i in range(20):
            topic = "orders.eu" if i % 3 else "chat.lobby"
            await w.ada.messages.publish(topic=topic, payload=i)
            sent.append((topic, i))
        got = [(item["topic"], item["payload"]) for item in await take(sub, len(sent))]
        assert got == sent
        await sub.aclose()  # type: ignore[attr-defined]

    run(test, tmp_path, relay=False)


def test_a_logged_message_that_is_not_one_messagepack_value_is_skipped_and_the_feed_goes_on(tmp_path: Path) -> None:
    async def test(w: World) -> None:
        sub = await subscribed(w.bob, "chat.>")
        good = msgspec.msgpack.encode({"n": 1})
        for bad in (good[:-1], good + b"\x00", b"\xc1"):  # truncated, trailing bytes, no such opcode
            seq, _ = await w.store.topics_append("chat.lobby", False, "ada", bad, {}, time.time())
            w.topics.hub.appended(seq)
        await w.ada.messages.publish(topic="chat.lobby", payload={"n": 2})
        assert (await anext(sub))["payload"] == {"n": 2}
        await sub.aclose()  # type: ignore[attr-defined]

    run(test, tmp_path)


def test_a_wide_subscription_remembers_a_bounded_number_of_topics_and_says_when_it_forgot(tmp_path: Path) -> None:
    # A pattern's stream remembered the last offset of every durable topic it delivered, without bound:
    # memory grew with the topics, and the ending's resume_offsets outgrew a frame (then sent without details).
    config = TopicsConfig(
        rules=RULES, durable=[DurableTopic("orders.>", keep=10)], sweep_interval=3600, subscriber_buffer=4,
        max_topic_length=1000, max_durable_topics_per_user=2000,
    )  # fmt: skip
    names = [f"orders.{i:04d}{'x' * 980}" for i in range(1100)]  # 1100 topics of 1 KB: over 1 MB of resume_offsets

    unread = 30  # more than bob's stream absorbs unread: its credit (a window of 16 at most), 1 in hand, a buffer of 4

    async def test(w: World) -> None:
        sub = await subscribed(w.bob, "orders.>")
        for name in names:
            await w.ada.messages.publish(topic=name, payload=0)
            assert (await anext(sub))["topic"] == name
        # The feed hands messages to subscribers after publish returns, at its own pace: bob's stream overflows
        # only if the feed reaches them all before bob reads, so ada's own subscription, read as she publishes,
        # says when it has (the feed offers each message to every subscriber at once).
        witness = await subscribed(w.ada, "orders.>")
        for i in range(unread):  # not read by bob meanwhile
            await w.ada.messages.publish(topic=names[0], payload=i + 1)
            assert (await anext(witness))["payload"] == i + 1
        await witness.aclose()  # type: ignore[attr-defined]
        got = []
        with pytest.raises(bastion.ResourceExhausted, match="fell behind") as info:
            async for message in sub:
                got.append(message["payload"])
        details = info.value.details
        assert 0 < details["dropped"] <= unread - len(got)  # a message the feed had not reached yet is not counted
        assert details["resume_offsets_partial"] is True  # it delivered more topics than it remembers
        offsets = details["resume_offsets"]
        assert 0 < len(offsets) <= 1024 and offsets[names[0]] == 2 + len(got)  # the first dropped comes first
        assert sum(len(name) for name in offsets) <= 128 * 1024
        assert all(offsets[name] == 2 for name in names[1:] if name in offsets)

    async def main() -> None:
        async with asyncio.timeout(120), world(tmp_path, config) as w:
            await test(w)

    asyncio.run(main())


def test_a_retention_sweep_over_many_topics_takes_a_few_transactions_not_one_per_topic(tmp_path: Path) -> None:
    config = TopicsConfig(
        rules=RULES, durable=[DurableTopic("orders.>", keep=2, max_age=60)], sweep_interval=3600,
        max_durable_topics_per_user=10_000,
    )  # fmt: skip
    topics = 600

    def transactions(store: Store) -> int:
        stats = store.stats
        return stats.get("commits", 0) + stats.get("calls", 0)  # SQLite's commits, or PostgreSQL's calls

    async def test(w: World) -> None:
        for i in range(topics):
            for n in range(3):
                await w.ada.messages.publish(topic=f"orders.t{i}", payload=n)
        before = transactions(w.store)
        assert await w.topics.sweep() == topics  # each topic down to its keep of 2
        by_count = transactions(w.store) - before
        before = transactions(w.store)
        assert await w.topics.sweep(now=time.time() + 120) == 2 * topics  # everything past max_age
        by_age = transactions(w.store) - before
        before = transactions(w.store)
        assert await w.topics.sweep(now=time.time() + 120) == 0  # all empty: forgotten, in one go
        assert await w.store.topics_heads("", 10) == []
        forgetting = transactions(w.store) - before
        # Bounded work per transaction (SWEEP_PAGE messages) and a page of heads per read: a handful each.
        assert max(by_count, by_age, forgetting) <= 12, (by_count, by_age, forgetting)

    async def main() -> None:
        async with asyncio.timeout(120), world(tmp_path, config) as w:
            await test(w)

    asyncio.run(main())


def test_the_hubs_routes_stay_bounded_in_subscribers_listed_not_only_in_topics(tmp_path: Path) -> None:
    # The hub remembered, for each of up to 4096 topics, the list of subscribers wanting it: with every
    # subscription on ">" (max_subscribers is 4096) that was 4096 x 4096 entries, some 128 MiB per process.
    from bastion.services.topics_hub import _ROUTE_ENTRIES, Hub, Subscriber, TopicAccess
    from bastion.store.topics import TopicMessage

    async def main() -> None:
        async with open_store(service_store(tmp_path)) as store:
            hub = Hub(store)
            access = TopicAccess([])
            subscribers = [Subscriber(">", TESTER, access, 1, 1 << 20) for _ in range(400)]
            for subscriber in subscribers:
                await hub.join(subscriber)
            topics = 2 * _ROUTE_ENTRIES // len(subscribers)  # well within the 4096 topics remembered
            for i in range(topics):
                hub._fan_out(TopicMessage(i + 1, f"t.{i}", None, "ada", b"\xc0", {}, 0.0))
                assert sum(len(route) for route in hub._routes.values()) <= _ROUTE_ENTRIES
            assert all(s.dropped + len(s.buffer) == topics for s in subscribers)  # each was offered every one

    asyncio.run(main())
