"""Mailboxes on a running ``bastion serve`` against hostile users: what one user can cost the server and others."""

from __future__ import annotations

import asyncio
import contextlib
from pathlib import Path
from typing import Any

from bastion.client.aio import Client
from tests.conftest import StartServer
from tests.support.server import read_rss_kib


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
