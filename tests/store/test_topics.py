"""The topics domain of every backend: the log's seq order, per-topic offsets, replay, the feed, retention."""

from __future__ import annotations

import asyncio

import pytest

from bastion.exceptions import InvalidArgument
from bastion.store import Store
from bastion.store.topics import TopicPosition
from tests.store.conftest import MakeStore

NOW = 1_000_000.0


async def test_appends_take_a_store_wide_seq_and_durable_topics_their_own_offsets(store: Store) -> None:
    assert await store.topics_position() == TopicPosition(0, 0)
    assert await store.topics_append("orders.eu", True, "ada", b"\x01", {"k": "v"}, NOW) == (1, 1)
    assert await store.topics_append("chat.room", False, "bob", b"\x02", {}, NOW) == (2, None)
    assert await store.topics_append("orders.us", True, "ada", b"\x03", {}, NOW) == (3, 1)
    assert await store.topics_append("orders.eu", True, "eve", b"\x04", {}, NOW + 1) == (4, 2)
    assert (await store.topics_position()).seq == 4
    head = await store.topics_head("orders.eu")
    assert head is not None and (head.first_offset, head.last_offset) == (1, 2)
    assert await store.topics_head("chat.room") is None  # live topics have no head
    assert [h.topic for h in await store.topics_heads("", 10)] == ["orders.eu", "orders.us"]
    assert [h.topic for h in await store.topics_heads("orders.eu", 10)] == ["orders.us"]


async def test_the_feed_returns_every_message_after_a_seq_in_order_with_its_fields(store: Store) -> None:
    for i in range(5):
        await store.topics_append(f"t.{i % 2}", i % 2 == 0, f"u{i}", bytes([i]), {"i": str(i)}, NOW + i)
    messages, trimmed = await store.topics_feed(0, 100)
    assert trimmed == 0
    assert [m.seq for m in messages] == [1, 2, 3, 4, 5]
    assert [m.offset for m in messages] == [1, None, 2, None, 3]
    first = messages[0]
    assert (first.topic, first.publisher, first.payload, first.headers, first.at) == (
        "t.0",
        "u0",
        b"\x00",
        {"i": "0"},
        NOW,
    )
    page, _ = await store.topics_feed(2, 2)
    assert [m.seq for m in page] == [3, 4]
    empty, trimmed = await store.topics_feed(5, 10)
    assert (empty, trimmed) == ([], 0)


async def test_replay_reads_one_topic_by_offset_up_to_a_seq(store: Store) -> None:
    for i in range(6):
        await store.topics_append("a" if i % 2 else "b", True, "ada", bytes([i]), {}, NOW)
    # a: seq 2, 4, 6 -> offsets 1, 2, 3
    assert [m.offset for m in await store.topics_replay("a", 1, 6, 10)] == [1, 2, 3]
    assert [m.offset for m in await store.topics_replay("a", 2, 6, 10)] == [2, 3]
    assert [m.offset for m in await store.topics_replay("a", 1, 4, 10)] == [1, 2]
    assert [m.offset for m in await store.topics_replay("a", 1, 6, 2)] == [1, 2]
    assert await store.topics_replay("a", 4, 6, 10) == []


async def test_a_replay_page_is_bounded_in_bytes_and_says_whether_more_may_follow(store: Store) -> None:
    for i in range(6):  # each message: 1000 bytes of payload and 2 of headers ("{}")
        await store.topics_append("t", True, "ada", bytes([i]) * 1000, {}, NOW)
    await store.topics_append("u", True, "ada", b"x" * 5000, {}, NOW)
    page = store.topics_replay_page
    assert [(m.offset, len(m.payload)) for m in (await page("t", 1, 7, 10, 2500))[0]] == [(1, 1000), (2, 1000)]
    assert (await page("t", 1, 7, 10, 2500))[1] is True  # cut by bytes
    assert [m.offset for m in (await page("t", 3, 7, 10, 10_000))[0]] == [3, 4, 5, 6]
    assert (await page("t", 3, 7, 10, 10_000))[1] is False  # the end
    assert [m.offset for m in (await page("t", 1, 7, 3, 10_000))[0]] == [1, 2, 3]
    assert (await page("t", 1, 7, 3, 10_000))[1] is True  # cut by the limit
    assert [m.offset for m in (await page("t", 1, 4, 10, 10_000))[0]] == [1, 2, 3, 4]  # up to seq 4
    (one,), more = await page("u", 1, 7, 10, 100)  # a message larger than the bound comes alone
    assert (one.offset, len(one.payload), more) == (1, 5000, False)
    assert await page("t", 7, 7, 10, 100) == ([], False)


async def test_retention_trims_the_oldest_by_count_then_by_age_and_records_it(store: Store) -> None:
    for i in range(10):
        await store.topics_append("t", True, "ada", b"x", {}, NOW + i)
    await store.topics_append("other", True, "ada", b"x", {}, NOW)  # seq 11
    assert await store.topics_trim("t", 3, None, 1000) == 3  # offsets 1..3 (seq 1..3)
    head = await store.topics_head("t")
    assert head is not None and (head.first_offset, head.last_offset) == (4, 10)
    assert (await store.topics_position()).trimmed == 3
    # By age: everything appended before NOW + 6 goes (offsets 4, 5, 6), stopping at the first newer one.
    assert await store.topics_trim("t", 0, NOW + 6, 1000) == 3
    assert [m.offset for m in await store.topics_replay("t", 1, 100, 100)] == [7, 8, 9, 10]
    # A page limit bounds one call; nothing to do is 0.
    assert await store.topics_trim("t", 9, None, 2) == 2
    assert await store.topics_trim("t", 8, None, 10) == 0
    assert (await store.topics_position()).trimmed == 8
    _, trimmed = await store.topics_feed(0, 100)
    assert trimmed == 8
    assert [m.offset for m in await store.topics_replay("other", 1, 100, 10)] == [1]  # untouched
    # Offsets go on from where they were after a trim.
    assert (await store.topics_append("t", True, "ada", b"x", {}, NOW))[1] == 11


async def test_live_messages_are_removed_by_age_without_touching_durable_ones(store: Store) -> None:
    await store.topics_append("live", False, "ada", b"1", {}, NOW)
    await store.topics_append("keep", True, "ada", b"2", {}, NOW)
    await store.topics_append("live", False, "ada", b"3", {}, NOW + 10)
    assert await store.topics_trim_live(NOW + 5, 100) == 1
    messages, trimmed = await store.topics_feed(0, 10)
    assert ([m.payload for m in messages], trimmed) == ([b"2", b"3"], 0)


async def test_concurrent_appends_get_distinct_gapless_offsets(store: Store) -> None:
    results = await asyncio.gather(*(store.topics_append("t", True, "ada", b"x", {}, NOW) for _ in range(50)))
    assert sorted(offset for _, offset in results) == list(range(1, 51))
    assert sorted(seq for seq, _ in results) == list(range(1, 51))
    messages, _ = await store.topics_feed(0, 100)
    assert [m.offset for m in messages] == list(range(1, 51))  # seq order is offset order


async def test_the_log_survives_reopening(make_store: MakeStore) -> None:
    async with make_store() as store:
        await store.topics_append("t", True, "ada", b"kept", {}, NOW)
    async with make_store() as store:
        (message,) = await store.topics_replay("t", 1, 10, 10)
        assert (message.payload, message.offset) == (b"kept", 1)
        assert await store.topics_append("t", True, "ada", b"next", {}, NOW) == (2, 2)


async def test_an_integer_past_64_bits_is_invalid_argument_on_every_backend(store: Store) -> None:
    await store.topics_append("orders.eu", True, "ada", b"\x01", {}, NOW)
    for offset in (2**63, 2**64 - 1):  # what a client's uint64 may hold; SQLite's INTEGER cannot
        with pytest.raises(InvalidArgument, match="value rejected"):
            await store.topics_replay("orders.eu", offset, 10, 10)
        with pytest.raises(InvalidArgument, match="value rejected"):
            await store.topics_feed(offset, 10)
    assert [m.offset for m in await store.topics_replay("orders.eu", 1, 10, 10)] == [1]  # nothing else changed
