"""Mailboxes on a running ``bastion serve`` against hostile users: what one user can cost the server and others."""

from __future__ import annotations

import asyncio
import contextlib
from pathlib import Path
from typing import Any

import pytest

import bastion
from bastion import SyncClient
from bastion.client.aio import Client
from tests.conftest import StartServer
from tests.support.server import ServerProcess, read_rss_kib


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
