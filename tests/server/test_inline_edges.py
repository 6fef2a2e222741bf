"""The inline path (``ServerSession._run_inline``) where it could differ from the task path.

Found by a review of the inline path; each was a regression or an older
fault, fixed with its test here.

Each test drives a real server on loopback TCP, with raw frames where the
order of frames inside one read matters (a client library would not put
them there on purpose). Every inline case is paired with the same handler
made to ``await`` (so it runs in a task), which shows what the task path
does with the same frames. (The shared-limiter test is the exception: it
needs two workers, so it drives two limiters over one shared table instead.)
"""

from __future__ import annotations

import asyncio
import collections
import math
import os
from collections.abc import Awaitable, Callable
from typing import Any

import msgspec
import pytest

import bastion
from bastion import Principal, Server, Service
from bastion.protocol.messages import Call, Cancel, Hello
from bastion.security.authn import StaticTokens
from bastion.security.ratelimit import Limit, RateLimitConfig
from bastion.security.ratelimit_shared import SharedRateLimiter, SharedTable

TOKEN = "bst_inline-review-token-0123456789abcdef"
ADA = Principal("ada", frozenset({"user"}))

ran: collections.Counter[str] = collections.Counter()  # handler bodies entered, by name


def make_service() -> Service:
    svc = Service("rv")

    @svc.method
    async def echo(value: int) -> int:
        return value

    @svc.method
    async def bump(name: str) -> int:  # no await: runs inline
        ran[name] += 1
        return ran[name]

    @svc.method
    async def bump_in_task(name: str) -> int:  # the same, in a task
        ran[name] += 1
        await asyncio.sleep(0)
        return ran[name]

    @svc.method
    async def refuse() -> int:  # no await: runs inline
        # retry_after from a rate that came out 0: the answer cannot be encoded (OverflowError).
        raise bastion.Unavailable("busy", retry_after=math.inf)

    @svc.method
    async def refuse_in_task() -> int:
        await asyncio.sleep(0)
        raise bastion.Unavailable("busy", retry_after=math.inf)

    return svc


class Raw:
    """A client speaking frames directly, so that several land in one read of the server."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer

    @classmethod
    async def connect(cls, server: Server) -> Raw:
        reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
        raw = cls(reader, writer)
        raw.send(Hello(1, "review/1", TOKEN))
        assert (await raw.read())[0] == 2  # Welcome
        return raw

    def send(self, *messages: object) -> None:
        """All of ``messages`` in one write (one read, on loopback)."""
        frames = map(msgspec.msgpack.encode, messages)
        self.writer.write(b"".join(len(m).to_bytes(4, "big") + m for m in frames))

    async def read(self) -> list[Any]:
        length = int.from_bytes(await self.reader.readexactly(4), "big")
        return msgspec.msgpack.decode(await self.reader.readexactly(length))  # type: ignore[no-any-return]

    async def answers_until(self, call_id: int) -> dict[int, list[Any]]:
        """Every answer (Result 4, Error 5) read up to and including ``call_id``'s, by call id."""
        answers: dict[int, list[Any]] = {}
        async with asyncio.timeout(5):
            while call_id not in answers:
                message = await self.read()
                if message[0] in (4, 5):
                    answers[message[1]] = message
        return answers

    def close(self) -> None:
        self.writer.close()


def args(**values: Any) -> msgspec.Raw:
    return msgspec.Raw(msgspec.msgpack.encode(values))


def run(body: Callable[[Server], Awaitable[None]]) -> None:
    async def main() -> None:
        server = Server([make_service()], authenticator=StaticTokens({TOKEN: ADA}))
        await server.start("127.0.0.1", 0)
        try:
            async with asyncio.timeout(20):
                await body(server)
        finally:
            await server.shutdown(grace=1)

    ran.clear()
    asyncio.run(main())


# -- a Call and its Cancel in one read ----------------------------------------------------------


@pytest.mark.parametrize("method", ["rv.bump_in_task", "rv.bump"])
def test_a_call_cancelled_in_the_same_read_never_runs(method: str) -> None:
    """The core closes a call whose Cancel is in the same read before the session sees either.
    The task path then never starts the handler and counts the call CANCELLED (session.py's
    docstring: "a Call and its Cancel in one read"); the inline path must not run it either
    (it did at first: its side effects happened for an abandoned call, counted OK)."""

    async def body(server: Server) -> None:
        raw = await Raw.connect(server)
        raw.send(Call(1, method, args(name="cancelled")), Cancel(1), Call(2, "rv.echo", args(value=2)))
        answers = await raw.answers_until(2)
        assert answers == {2: [4, 2, 2]}  # nothing for the cancelled call
        assert ran["cancelled"] == 0, "the handler of a call cancelled before it started ran"
        assert server.metrics.snapshot()["calls"][method] == {"CANCELLED": 1}
        raw.close()

    run(body)


# -- an answer that cannot be sent ------------------------------------------------------------


@pytest.mark.parametrize("method", ["rv.refuse_in_task", "rv.refuse"])
def test_an_error_that_cannot_be_encoded_fails_its_call_not_the_connection(method: str) -> None:
    """An error answer that cannot be sent as raised (here OverflowError from retry_after=inf;
    an Error frame over the peer's max_frame, or details that do not encode, raise
    LocalProtocolError) must fail its own call only. Inline, such an exception once escaped
    ``_on_call`` into ``Link.data_received``, which asyncio treats as fatal: the connection
    closed, with the rest of the read unprocessed."""

    async def body(server: Server) -> None:
        raw = await Raw.connect(server)
        raw.send(Call(1, method, args()), Call(2, "rv.echo", args(value=2)))
        try:
            answers = await raw.answers_until(2)
        except asyncio.IncompleteReadError:
            pytest.fail(f"{method}: the connection was closed by one call's unsendable error")
        assert answers[2] == [4, 2, 2]
        assert server.stats()["connections"] == 1
        raw.close()

    run(body)


@pytest.mark.parametrize("method", ["rv.refuse_in_task", "rv.refuse"])
def test_an_error_that_cannot_be_encoded_is_still_answered(method: str) -> None:
    """When the error cannot be sent as raised, the call still gets an answer: its code and a
    short message (``ServerSession._send_error``), as ``_fail`` does for a GoAway whose reason
    does not fit. (Before, on both paths, the client waited out its deadline.)"""

    async def body(server: Server) -> None:
        raw = await Raw.connect(server)
        raw.send(Call(1, method, args()))
        try:
            answers = await raw.answers_until(1)
        except (TimeoutError, asyncio.IncompleteReadError):
            pytest.fail(f"{method}: the call was never answered")
        assert answers[1][0] == 5  # an Error of some kind
        raw.close()

    run(body)


# -- the shared limiter, with the read's clock ------------------------------------------------


def test_a_shared_bucket_is_not_refilled_twice_by_a_worker_charging_on_an_older_clock() -> None:
    """Sessions pass the time their read arrived as ``now``: a call late in a long read (behind
    other inline handlers) is charged at an earlier time than another worker's call charged
    meanwhile. The shared table must keep the later stamp; writing the earlier one back made
    the next check refill the overlap again, so more calls passed than rate x time + burst
    allows. (Two workers over one table, as tests/integration/test_workers.py.)"""
    config = RateLimitConfig(per_principal=Limit(rate=2, burst=2))
    table = SharedTable.create(64)
    first = SharedRateLimiter(config, table)
    second = SharedRateLimiter(config, SharedTable(os.dup(table.fileno())))
    passed = 0
    # Worker 2 at t=0.5; worker 1, still in a read that arrived at t=0; worker 2 at t=0.5.
    for limiter, now in ((second, 0.5), (first, 0.0), (second, 0.5)):
        try:
            limiter.check_sync(ADA, "192.0.2.1", "rv.echo", None, now)
            passed += 1
        except bastion.ResourceExhausted:
            pass
    # By t=0.5 a bucket created full at t=0.5 (burst 2) has paid for two calls, not three.
    assert passed == 2
