"""Mailboxes on a running ``bastion serve`` against hostile users: what one user can cost the server and others."""

from __future__ import annotations

import asyncio
import contextlib
import signal
import time
from pathlib import Path
from typing import Any

import pytest

import bastion
from bastion import SyncClient
from bastion.client.aio import Client
from tests.conftest import StartServer
from tests.support.server import ServerProcess, read_rss_kib
from tests.support.stores import store_location


def _tokens(server: ServerProcess, *names: str) -> dict[str, str]:
    with SyncClient(server.address, token_file=str(server.token_file), timeout=10) as root:
        for name in names:
            root.auth.create_user(name=name)
        return {name: root.auth.create_token(user=name)["token"] for name in names}


@pytest.mark.parametrize("limit", ["messages", "bytes"])
def test_one_sender_cannot_fill_anothers_mailbox(server_factory: StartServer, limit: str) -> None:
    """One user sending to another until refused leaves room for everyone else's mail.

    Before the fix a single sender could fill the whole mailbox (with the
    default quotas, 400 sends of 256 KiB: forty seconds at the default rate),
    and from then on every other user's mail to it was refused.
    """
    env = {"BASTION_MESSAGES__MAILBOX_MESSAGES": "40", "BASTION_MESSAGES__MAILBOX_BYTES": "400000"}
    server = server_factory(env=env)
    tokens = _tokens(server, "mallory", "bob", "cy")
    body = b"." * (9_000 if limit == "messages" else 30_000)

    async def main() -> None:
        async with (
            Client(server.address, token=tokens["mallory"], timeout=60) as mallory,
            Client(server.address, token=tokens["cy"], timeout=60) as cy,
            Client(server.address, token=tokens["bob"], timeout=60) as bob,
        ):
            sent = 0
            with pytest.raises(bastion.ResourceExhausted) as refused:
                while sent < 100:
                    await mallory.messages.send(to=["bob"], subject="spam", body=body)
                    sent += 1
            assert refused.value.details["mailbox"] == "bob"
            assert refused.value.details["limit"] == f"sender_{limit}"
            assert "messages.mailbox_sender_share" in refused.value.message
            assert sent == 4 if limit == "messages" else sent * len(body) < 40_000
            answer = await cy.messages.send(to=["bob"], subject="the real one", body=body)
            assert answer["recipients"] == ["bob"]
            inbox = (await bob.messages.inbox())["messages"]
            assert [m["sender"] for m in inbox] == ["cy"] + ["mallory"] * sent
            await bob.messages.delete(ids=[inbox[-1]["id"]])  # room again for one more from mallory
            await mallory.messages.send(to=["bob"], subject="spam", body=body)
            with pytest.raises(bastion.ResourceExhausted):
                await mallory.messages.send(to=["bob", "cy"], subject="spam", body=body)
            assert (await cy.messages.unread())["total"] == 0  # all or nothing: cy got none of it either
            for _ in range(8):  # one's own mailbox is one's own business
                await mallory.messages.send(to=["mallory"], subject="note", body=body)

    asyncio.run(main())


def test_watchers_that_never_read_hold_little_server_memory(server_factory: StartServer, tmp_path: Path) -> None:
    """A watch suspended between two items must not hold a whole page of full-size bodies.

    One user fills their own mailbox with large messages, then opens every
    watch they are allowed from the first id and reads one message of each:
    each watch is now parked in the middle of a page. Before the fix each
    held 64 bodies of 256 KiB (16 MiB), 256 MiB for one user's 16 watches.
    """
    server = server_factory()
    body = b"x" * (250 * 1024)

    async def main() -> tuple[int, int]:
        async with Client(server.address, token=server.token, timeout=120) as client:
            for i in range(64):
                await client.messages.send(to=["admin"], subject=f"big {i}", body=body)
            before = read_rss_kib(server.pid)
            async with contextlib.AsyncExitStack() as stack:
                for _ in range(16):
                    stream: Any = client.stream("messages.watch", from_id=1)
                    stack.push_async_callback(stream.aclose)
                    events = stream.__aiter__()
                    assert (await anext(events))["type"] == "start"
                    event = await anext(events)
                    assert (event["type"], event["id"]) == ("mail", 1)
                during = read_rss_kib(server.pid)
            return before, during

    before, during = asyncio.run(main())
    grown_mib = (during - before) / 1024
    assert grown_mib < 64, f"16 parked watches grew the server by {grown_mib:.0f} MiB"


def test_a_watch_resumed_on_another_replica_after_one_stops_misses_nothing_and_repeats_nothing(
    server_factory: StartServer, tmp_path: Path
) -> None:
    """Two replicas share PostgreSQL; the one holding a watch (and taking half the sends) stops mid-stream.

    The sender retries on the other replica with the same client_id; the
    watcher resumes there with from_id = last seen + 1. Every message
    arrives exactly once, in order.
    """
    location = store_location("postgresql", tmp_path, "shared")
    a = server_factory(env={"BASTION_STORE": location}, name="a")
    b = server_factory(env={"BASTION_STORE": location}, name="b")
    admin = (a if a.token_file.exists() else b).token
    with SyncClient(b.address, token=admin, timeout=10) as root:
        for name in ("ada", "bob"):
            root.auth.create_user(name=name)
        tokens = {name: root.auth.create_token(user=name)["token"] for name in ("ada", "bob")}
    total = 40

    async def send_all(stopped: asyncio.Event) -> None:
        async with Client(a.address, token=tokens["ada"]) as on_a, Client(b.address, token=tokens["ada"]) as on_b:
            for i in range(total):
                args = {"to": ["bob"], "subject": str(i), "client_id": f"m-{i}"}
                if i == total // 2:
                    stopped.set()
                    assert await asyncio.to_thread(a.stop) == 0  # drains: its watch ends after the grace period
                try:
                    await (on_a if i % 2 and not stopped.is_set() else on_b).messages.send(**args)
                except (bastion.Unavailable, bastion.TransportError):
                    await on_b.messages.send(**args)

    async def watch(stopped: asyncio.Event) -> list[int]:
        seen: list[int] = []
        for address in (a.address, b.address):
            args = {} if not seen else {"from_id": seen[-1] + 1}
            try:
                async with Client(address, token=tokens["bob"], timeout=60) as client:
                    stream: Any = client.stream("messages.watch", **(args or {"from_id": 1}))
                    async for event in stream:
                        if event["type"] == "mail":
                            assert event["message"]["subject"] == str(len(seen))
                            seen.append(event["id"])
                            if len(seen) == total:
                                await stream.aclose()
                                return seen
            except (bastion.Unavailable, bastion.TransportError):
                assert stopped.is_set()
        return seen

    async def main() -> list[int]:
        stopped = asyncio.Event()
        seen, _ = await asyncio.gather(watch(stopped), send_all(stopped))
        return seen

    assert asyncio.run(main()) == list(range(1, total + 1))
    with SyncClient(b.address, token=tokens["bob"], timeout=10) as bob:
        assert bob.messages.unread()["total"] == total


def test_a_draining_server_ends_open_watches_at_once_instead_of_holding_its_shutdown(
    server_factory: StartServer,
) -> None:
    """A watch never finishes by itself: the drain waited the whole grace period for it, then cut it off.

    Now the watch ends within a poll of the drain starting, with
    UNAVAILABLE telling the client to watch again elsewhere, after the
    mail already committed; and the server exits without waiting out the
    grace period.
    """
    server = server_factory(env={"BASTION_LIMITS__GRACE_PERIOD": "20"})

    async def main() -> tuple[float, bastion.Unavailable]:
        async with Client(server.address, token=server.token, timeout=60) as client:
            stream: Any = client.stream("messages.watch")
            events = stream.__aiter__()
            assert (await anext(events))["type"] == "start"
            await client.messages.send(to=["admin"], subject="before the drain")
            assert (await anext(events))["message"]["subject"] == "before the drain"
            began = time.monotonic()
            server.signal(signal.SIGTERM)
            with pytest.raises(bastion.Unavailable) as ended:
                await anext(events)
            return time.monotonic() - began, ended.value

    took, error = asyncio.run(main())
    assert took < 5, f"the watch ended {took:.1f} s after SIGTERM (grace period 20 s)"
    assert "watch again with from_id" in error.message, error.message
    began = time.monotonic()
    assert server.stop(timeout=15) == 0
    assert time.monotonic() - began < 5
