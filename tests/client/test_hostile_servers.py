"""Both clients against servers that misbehave: real TCP, frames written by hand (tests/support/hostile_server.py).

Every piece of bad input from a server must reach the caller as a bastion
error that says what went wrong -- never a bare ValueError, never a hang --
and must not leave the client unable to make its next call.
"""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from bastion import Client, SyncClient
from bastion.exceptions import RemoteProtocolError
from bastion.status import Status
from tests.support.hostile_server import BAD_UTF8, RESULT, HostileServer, Peer, frame, result_frame


def run(coro: Any) -> Any:
    async def guarded() -> Any:
        async with asyncio.timeout(20):
            return await coro

    return asyncio.run(guarded())


async def bad_utf8_then_echo(peer: Peer) -> None:
    """Answers call 1 with a str that is not UTF-8, later calls with their own id."""
    await peer.handshake()
    while True:
        call = await peer.read_call()
        if call[1] == 1:
            peer.send_raw(result_frame(1, BAD_UTF8))
        else:
            peer.send(RESULT, call[1], call[1])


@pytest.mark.parametrize("how", ["call", "invoke"])
def test_a_result_that_is_not_utf8_is_a_protocol_error_not_a_unicode_error(how: str) -> None:
    """The frame decoder skips over a Result's value; decoding it later raised a bare UnicodeDecodeError
    out of ``await client.call(...)`` -- not a BastionError, so code catching those missed it."""

    async def main(address: str) -> None:
        async with Client(address, insecure=True, timeout=5) as client:
            with pytest.raises(RemoteProtocolError, match="not valid MessagePack") as caught:
                if how == "call":
                    await client.call("x.y")
                else:
                    await client.invoke("x.y", {}, idempotent=True)
            assert caught.value.status is Status.INVALID_ARGUMENT
            assert await client.call("x.y") == 2  # the framing was intact: the connection serves on

    with HostileServer(bad_utf8_then_echo) as server:
        run(main(server.address))
        assert len(server.peers) == 1


def test_a_stream_item_that_is_not_utf8_is_a_protocol_error() -> None:
    async def script(peer: Peer) -> None:
        await peer.handshake()
        call = await peer.read_call()
        peer.send(7, call[1], "fine")
        peer.send_raw(frame(b"\x93\x07" + bytes([call[1]]) + BAD_UTF8))  # an Item
        peer.send(RESULT, call[1], None)
        await peer.until_closed()

    async def main(address: str) -> None:
        async with Client(address, insecure=True, timeout=5) as client:
            seen = []
            with pytest.raises(RemoteProtocolError, match="not valid MessagePack"):
                async for item in client.stream("x.items"):
                    seen.append(item)
            assert seen == ["fine"]

    with HostileServer(script) as server:
        run(main(server.address))


def test_the_sync_client_reports_a_result_that_is_not_utf8_as_a_protocol_error() -> None:
    with HostileServer(bad_utf8_then_echo) as server, SyncClient(server.address, insecure=True, timeout=5) as client:
        with pytest.raises(RemoteProtocolError, match="not valid MessagePack"):
            client.call("x.y")
        assert client.call("x.y") == 2
