"""Calls refused before they run (unknown method, denied, bad arguments) are charged to the caller's
rate limit like any other: each costs the server a lookup, a decode and an answer, and a caller
that only sends such calls must not send them without limit.

A real server (in-process, loopback TCP) with a small per-source limit; an anonymous raw peer.
"""

from __future__ import annotations

import asyncio
from typing import Any

import msgspec
import pytest

from bastion import Server, Service
from bastion.security.ratelimit import Limit, RateLimitConfig, RateLimiter
from bastion.status import Status

HELLO, WELCOME, CALL, RESULT, ERROR = 1, 2, 3, 4, 5
BURST = 5


def frame(message: object) -> bytes:
    body = msgspec.msgpack.encode(message)
    return len(body).to_bytes(4, "big") + body


def make_service() -> Service:
    svc = Service("rl")

    @svc.method(public=True)
    async def echo(value: int) -> int:
        return value

    @svc.method
    async def private() -> str:
        return "secret"

    return svc


async def read(reader: asyncio.StreamReader) -> list[Any]:
    length = int.from_bytes(await reader.readexactly(4), "big")
    message: list[Any] = msgspec.msgpack.decode(await reader.readexactly(length))
    return message


@pytest.mark.parametrize(
    ("method", "args", "refusal"),
    [
        ("rl.private", {}, Status.UNAUTHENTICATED),
        ("rl.echo", {"value": "not a number"}, Status.INVALID_ARGUMENT),
        ("rl.nothing_here", {}, Status.UNAUTHENTICATED),  # anonymous: not told whether it exists
    ],
    ids=["denied", "invalid", "unknown"],
)
def test_refused_calls_spend_the_callers_rate_limit(method: str, args: dict[str, Any], refusal: Status) -> None:
    async def main() -> None:
        limiter = RateLimiter(RateLimitConfig(per_source=Limit(rate=0.001, burst=BURST)))
        server = Server([make_service()], limiter=limiter)
        await server.start("127.0.0.1", 0)
        try:
            async with asyncio.timeout(20):
                reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
                writer.write(frame([HELLO, 1, "rl/1", None, 16, 1 << 20, {}]))
                assert (await read(reader))[0] == WELCOME
                writer.write(b"".join(frame([CALL, i, method, args]) for i in range(1, 21)))
                answers = [await read(reader) for _ in range(20)]
                statuses = [a[2] for a in answers]
                assert all(a[0] == ERROR for a in answers), answers
                assert statuses[:BURST] == [refusal] * BURST
                assert statuses[BURST:] == [Status.RESOURCE_EXHAUSTED] * (20 - BURST), statuses
                assert "rate limited" in answers[-1][3]
                assert server.stats()["rejected_rate_limited"] == 20 - BURST
                writer.write(frame([CALL, 21, "rl.echo", {"value": 1}]))  # the budget is spent for good calls too
                assert (await read(reader))[2] == Status.RESOURCE_EXHAUSTED
                writer.close()
        finally:
            await server.shutdown(grace=1)

    asyncio.run(main())


class NamesAsked(RateLimiter):
    """The real limiter, remembering the method names it was asked to charge."""

    def __init__(self, config: RateLimitConfig) -> None:
        super().__init__(config)
        self.names: set[str] = set()

    def check_sync(
        self, principal: Any, source: str, method: str, cost: float | None = None, now: float | None = None
    ) -> None:
        self.names.add(method)
        super().check_sync(principal, source, method, cost, now)


def test_a_refused_unknown_method_is_charged_under_one_name_not_the_peers() -> None:
    """The limiter caches what each method name charges: charging a refused call under the name the peer
    sent let one anonymous connection fill those caches with up to 4096 names of a frame each (GBs)."""

    async def main() -> None:
        limiter = NamesAsked(RateLimitConfig(per_source=Limit(rate=1000.0, burst=1000)))
        server = Server([make_service()], limiter=limiter)
        await server.start("127.0.0.1", 0)
        try:
            async with asyncio.timeout(20):
                reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
                writer.write(frame([HELLO, 1, "rl/1", None, 16, 1 << 20, {}]))
                assert (await read(reader))[0] == WELCOME
                names = [f"rl.x{i}{'y' * 1000}" for i in range(50)]
                writer.write(b"".join(frame([CALL, i, name, {}]) for i, name in enumerate(names, 1)))
                answers = [await read(reader) for _ in names]
                assert {a[2] for a in answers} == {Status.UNAUTHENTICATED}
                writer.write(frame([CALL, 99, "rl.echo", {"value": "bad"}]))  # a known method keeps its name
                assert (await read(reader))[2] == Status.INVALID_ARGUMENT
                writer.close()
            assert not limiter.names & set(names)
            assert "rl.echo" in limiter.names and len(limiter.names) == 2, limiter.names
        finally:
            await server.shutdown(grace=1)

    asyncio.run(main())
