"""An authenticator that fails (its store unreachable) is logged a few times per 10 s, not once per
handshake and once per connection every revalidation: during an outage every client (and any peer
that cares to) reconnecting, and every open connection every ``revalidate_interval``, wrote a
traceback each.

A real server (in-process, loopback TCP) with an authenticator whose store is down.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import msgspec
import pytest

from bastion import Principal, Server, Service
from bastion.observability.loglimit import LOG_BURST
from bastion.security.authn import PeerInfo
from bastion.status import Status

HELLO, WELCOME, GOAWAY = 1, 2, 12
ADA = Principal("ada", frozenset({"user"}), mechanism="token", token_id="t1")  # revocable: revalidated


class StoreDown:
    """Authenticates (or revalidates) against a store that cannot be reached."""

    def __init__(self, *, handshakes: bool) -> None:
        self.handshakes = handshakes
        self.revalidations = 0
        self.many_revalidations = asyncio.Event()

    async def authenticate(self, token: str | None, peer: PeerInfo) -> Principal:
        if self.handshakes:
            raise OSError("credential store unreachable")
        return ADA

    async def revalidate(self, principal: Principal) -> Principal | None:
        self.revalidations += 1
        if self.revalidations >= 200:
            self.many_revalidations.set()
        raise OSError("credential store unreachable")


def frame(message: object) -> bytes:
    body = msgspec.msgpack.encode(message)
    return len(body).to_bytes(4, "big") + body


async def hello(port: int) -> tuple[asyncio.StreamWriter, list[Any]]:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(frame([HELLO, 1, "outage/1", "bst_some-token", 16, 1 << 20, {}]))
    length = int.from_bytes(await reader.readexactly(4), "big")
    return writer, msgspec.msgpack.decode(await reader.readexactly(length))


def failures(caplog: pytest.LogCaptureFixture, text: str) -> int:
    return sum(1 for r in caplog.records if r.name == "bastion.server" and text in r.getMessage())


def test_failing_handshakes_log_a_few_tracebacks(caplog: pytest.LogCaptureFixture) -> None:
    async def main() -> None:
        server = Server([Service("o")], authenticator=StoreDown(handshakes=True))
        await server.start("127.0.0.1", 0)
        try:
            async with asyncio.timeout(20):
                for _ in range(30):
                    writer, answer = await hello(server.port)
                    assert answer[0] == GOAWAY and answer[2] == Status.INTERNAL, answer
                    writer.close()
        finally:
            await server.shutdown(grace=1)

    with caplog.at_level(logging.ERROR, logger="bastion.server"):
        asyncio.run(main())
    assert 1 <= failures(caplog, "authenticator failed") <= LOG_BURST


def test_failing_revalidations_log_a_few_tracebacks(caplog: pytest.LogCaptureFixture) -> None:
    async def main() -> None:
        authenticator = StoreDown(handshakes=False)
        server = Server([Service("o")], authenticator=authenticator, revalidate_interval=0.01)
        await server.start("127.0.0.1", 0)
        writers = []
        try:
            async with asyncio.timeout(20):
                for _ in range(10):
                    writer, answer = await hello(server.port)
                    assert answer[0] == WELCOME, answer
                    writers.append(writer)
                await authenticator.many_revalidations.wait()  # the connections are kept meanwhile
        finally:
            for writer in writers:
                writer.close()
            await server.shutdown(grace=1)

    with caplog.at_level(logging.ERROR, logger="bastion.server"):
        asyncio.run(main())
    assert 1 <= failures(caplog, "revalidation failed") <= LOG_BURST
