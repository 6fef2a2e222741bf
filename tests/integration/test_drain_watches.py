"""A draining server ends the streams a client resumes (watches, subscriptions) at once.

Such a stream never finishes by itself: the drain used to wait out the whole
grace period for it and then cut it off, so every rolling restart with a
watcher open took the full grace period. Methods marked ``resumable`` are
ended with UNAVAILABLE as the drain begins (other calls still finish). A
subscription ends with the details of its own ending: what it dropped (its
buffer, not sent), and where to resume so that nothing is lost.
"""

from __future__ import annotations

import asyncio
import signal
import time
from pathlib import Path
from typing import Any

import pytest

import bastion
from bastion.client.aio import Client
from tests.conftest import StartServer
from tests.support.server import ServerProcess

GRACE = "20"  # seconds: far longer than any of these tests may take


@pytest.mark.parametrize(
    ("method", "args"),
    [
        ("kv.watch", {"prefix": "drain:"}),
        ("messages.subscribe", {"pattern": "drain.>"}),
    ],
)
def test_a_draining_server_ends_open_watches_at_once(server_factory: StartServer, method: str, args: Any) -> None:
    server = server_factory(env={"BASTION_LIMITS__GRACE_PERIOD": GRACE})

    async def main() -> tuple[float, bastion.Unavailable, int | None]:
        async with Client(server.address, token=server.token, timeout=60) as client:
            events = client.stream(method, **args).__aiter__()
            assert (await anext(events))["type"] == "start"
            began = time.monotonic()
            server.signal(signal.SIGTERM)
            with pytest.raises(bastion.Unavailable) as ended:
                await anext(events)
            took = time.monotonic() - began
            return took, ended.value, ended.value.retry_after

    took, error, retry_after = asyncio.run(main())
    assert took < 5, f"the stream ended {took:.1f} s after SIGTERM (grace period {GRACE} s)"
    assert "draining" in error.message, error.message
    assert retry_after is not None
    began = time.monotonic()
    assert server.stop(timeout=15) == 0
    assert time.monotonic() - began < 5, "the server waited out its grace period"


TOPICS = """
[[messages.topics.durable]]
pattern = "orders.>"
keep = 10000
"""
PUBLISHED = 80  # well over what the client's stream credit lets the server send: the rest wait in its buffer


async def _stalled_then_drained(
    server: ServerProcess, pattern: str, topic: str, replayed: int = 0
) -> tuple[list[Any], bastion.Unavailable]:
    """A subscriber reading nothing while ``PUBLISHED`` messages reach it (another one reads them all, so
    each was offered to both), then a drain: what the stalled one received, and how it ended. With
    ``replayed``: that many are published first, and the stalled subscriber replays them (from_offset=0)."""
    async with (
        Client(server.address, token=server.token, timeout=60) as slow,
        Client(server.address, token=server.token, timeout=60) as fast,
    ):
        for i in range(replayed):
            await fast.messages.publish(topic=topic, payload=i)
        replay = {"from_offset": 0} if replayed else {}
        stalled = slow.stream("messages.subscribe", pattern=pattern, **replay).__aiter__()
        seen = fast.stream("messages.subscribe", pattern=pattern).__aiter__()
        assert (await anext(stalled))["type"] == (await anext(seen))["type"] == "start"
        for i in range(replayed, PUBLISHED):
            await fast.messages.publish(topic=topic, payload=i)
        assert [(await anext(seen))["payload"] for _ in range(replayed, PUBLISHED)] == list(range(replayed, PUBLISHED))
        server.signal(signal.SIGTERM)
        received = []
        with pytest.raises(bastion.Unavailable) as ended:
            async for item in stalled:
                received.append(item)
        with pytest.raises(bastion.Unavailable) as other:
            await anext(seen)
        assert other.value.details["dropped"] == 0, other.value.details
        return received, ended.value


@pytest.mark.parametrize("replayed", [0, PUBLISHED - 10], ids=["live", "replaying"])
def test_a_drain_ends_a_durable_subscription_saying_where_to_resume(
    server_factory: StartServer, store_url: str, tmp_path: Path, replayed: int
) -> None:
    """The drain's ending names the first message the client did not get and counts those it drops:
    resuming there on the restarted server misses nothing and repeats nothing. Also when the drain
    comes in the middle of a replay (from_offset), with newer messages buffered behind it."""
    (tmp_path / "topics.toml").write_text(TOPICS)
    env = {
        "BASTION_STORE": store_url,
        "BASTION_CONFIG": str(tmp_path / "topics.toml"),
        "BASTION_LIMITS__GRACE_PERIOD": GRACE,
    }
    first = server_factory(env=env, name="first")
    token = first.token
    received, error = asyncio.run(_stalled_then_drained(first, "orders.eu", "orders.eu", replayed))
    assert received, "the client's window of messages was sent before the drain"
    offsets = [m["offset"] for m in received]
    assert offsets == list(range(1, len(received) + 1)), offsets
    assert "draining" in error.message and error.retry_after is not None, error.message
    assert error.details["resume_from"] == len(received) + 1, error.details
    # Counted: what was sent to the stream but not to the client -- while replaying, the message in hand
    # and the live ones buffered behind the replay (the replay's pages not read yet never were).
    dropped = PUBLISHED - len(received) if not replayed else PUBLISHED - replayed + 1
    assert error.details == {"dropped": dropped, "resume_from": len(received) + 1}, error.details
    assert first.stop(timeout=15) == 0

    second = server_factory(env=env, name="second")

    async def resume() -> list[int]:
        async with Client(second.address, token=token, timeout=60) as client:
            again = client.stream("messages.subscribe", pattern="orders.eu", from_offset=error.details["resume_from"])
            items = again.__aiter__()
            assert (await anext(items))["type"] == "start"
            return [(await anext(items))["offset"] for _ in range(PUBLISHED - len(offsets))]

    assert offsets + asyncio.run(resume()) == list(range(1, PUBLISHED + 1))


def test_a_drain_counts_the_live_messages_it_drops(server_factory: StartServer) -> None:
    server = server_factory(env={"BASTION_LIMITS__GRACE_PERIOD": GRACE})
    received, error = asyncio.run(_stalled_then_drained(server, "chat.>", "chat.lobby"))
    assert [m["payload"] for m in received] == list(range(len(received)))
    assert error.details == {"dropped": PUBLISHED - len(received)}, error.details
    assert error.details["dropped"] > 0, "no message waited in the server's buffer"
    assert f"{PUBLISHED - len(received)} messages were dropped" in error.message, error.message
