"""Answers too large for the peer's own max_frame are sent short, and said so in the log only a few
times: the peer chooses its max_frame (1 KiB at least) and the method name an error repeats, so
without a budget each of its calls wrote a warning line.

A real server (in-process, loopback TCP) and an anonymous raw peer.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import msgspec
import pytest

from bastion import Server, Service
from bastion.observability.loglimit import LOG_BURST
from bastion.status import Status

HELLO, WELCOME, CALL, ERROR = 1, 2, 3, 5
CALLS = 50


def frame(message: object) -> bytes:
    body = msgspec.msgpack.encode(message)
    return len(body).to_bytes(4, "big") + body


async def read(reader: asyncio.StreamReader) -> list[Any]:
    length = int.from_bytes(await reader.readexactly(4), "big")
    message: list[Any] = msgspec.msgpack.decode(await reader.readexactly(length))
    return message


def test_answers_over_the_peers_max_frame_are_logged_a_few_times(caplog: pytest.LogCaptureFixture) -> None:
    svc = Service("u")

    @svc.method(public=True)
    async def echo(value: int) -> int:
        return value

    async def main() -> None:
        server = Server([svc])
        await server.start("127.0.0.1", 0)
        try:
            async with asyncio.timeout(20):
                reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
                writer.write(frame([HELLO, 1, "u/1", None, 16, 1024, {}]))  # the smallest max_frame allowed
                assert (await read(reader))[0] == WELCOME
                method = "u." + "x" * 2000  # repeated in the refusal: over 1 KiB
                writer.write(b"".join(frame([CALL, i, method, {}]) for i in range(1, CALLS + 1)))
                for _ in range(CALLS):
                    answer = await read(reader)
                    assert answer[0] == ERROR and answer[2] == Status.UNAUTHENTICATED, answer
                writer.close()
        finally:
            await server.shutdown(grace=1)

    with caplog.at_level(logging.WARNING, logger="bastion.server"):
        asyncio.run(main())
    lines = [r for r in caplog.records if "could not be sent as it was" in r.getMessage()]
    assert 1 <= len(lines) <= LOG_BURST, len(lines)
