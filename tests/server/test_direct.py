"""The direct session (bastion/server/direct.py): the gateway's door, with the native session's rules.

A real ``Server`` with a token authenticator, called through ``DirectSession``
as the gateway's bridge calls it: the answers and refusals must be those a
native client gets, and limits, cancellation, deadlines and drain must hold.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from typing import Any

import msgspec
import pytest

from bastion import Service
from bastion.config import ServerLimits
from bastion.exceptions import (
    DeadlineExceeded,
    FailedPrecondition,
    InvalidArgument,
    PermissionDenied,
    ResourceExhausted,
    Unauthenticated,
    Unavailable,
    Unimplemented,
)
from bastion.security.authn import PeerInfo, StaticTokens
from bastion.security.principal import Principal
from bastion.server.direct import MAX_RESULT, DirectSession
from bastion.server.server import Server

TOKEN = "bst_direct-test-token-0123456789abcdef"
ROLELESS = "bst_direct-test-roleless-0123456789abcdef"
PEER = "192.0.2.7:41000"


class Point(msgspec.Struct):
    x: int
    y: int


class Probe:
    def __init__(self) -> None:
        self.running = 0
        self.most = 0
        self.release = asyncio.Event()
        self.cancelled = asyncio.Event()


probe: Probe
service = Service("direct")


@service.method(roles={"user"})
async def point(x: int, y: int) -> Point:
    return Point(x, y)


@service.method(roles={"user"})
async def pair(a: str) -> tuple[str, bytes]:
    return a, a.encode()


@service.method(roles={"user"})
async def huge() -> bytes:
    return b"x" * (MAX_RESULT + 1)


@service.method(roles={"user"})
async def unsendable() -> Any:
    return object()


@service.method(roles={"user"})
async def numbers() -> AsyncIterator[int]:
    yield 1


@service.method(roles={"user"})
async def hold() -> int:
    probe.running += 1
    probe.most = max(probe.most, probe.running)
    try:
        await probe.release.wait()
    except asyncio.CancelledError:
        probe.cancelled.set()
        raise
    finally:
        probe.running -= 1
    return probe.most


def args(**kwargs: Any) -> bytes:
    return msgspec.msgpack.encode(kwargs)


def make_server(**limits: Any) -> Server:
    global probe
    probe = Probe()
    tokens = {TOKEN: Principal("ada", frozenset({"user"})), ROLELESS: Principal("bob", frozenset())}
    return Server([service], authenticator=StaticTokens(tokens), limits=ServerLimits(**limits))


async def until(predicate: Callable[[], bool], timeout: float = 5.0) -> None:
    async with asyncio.timeout(timeout):
        while not predicate():  # noqa: ASYNC110 - counts the handlers keep, not events
            await asyncio.sleep(0.005)


async def opened(server: Server, token: str = TOKEN) -> DirectSession:
    session = DirectSession(server, PEER, token)
    await session.start()
    return session


async def test_results_are_what_a_native_client_decodes() -> None:
    server = make_server()
    session = await opened(server)
    assert await session.call("direct.point", args(x=1, y=2)) == {"x": 1, "y": 2}
    assert await session.call("direct.pair", args(a="hi")) == ["hi", b"hi"]
    assert session in server.sessions
    session.close()
    assert session not in server.sessions


async def test_the_servers_own_refusals() -> None:
    server = make_server()
    session = await opened(server)
    with pytest.raises(Unimplemented):
        await session.call("direct.nope", args())
    with pytest.raises(InvalidArgument, match="argument `x`"):
        await session.call("direct.point", args(x="one", y=2))
    roleless = await opened(server, ROLELESS)
    with pytest.raises(PermissionDenied, match="requires role user"):
        await roleless.call("direct.point", args(x=1, y=2))
    assert server.counters["auth_failures_denied"] == 1


async def test_a_bad_token_is_refused_at_the_handshake() -> None:
    server = make_server()
    with pytest.raises(Unauthenticated):
        await opened(server, "bst_wrong")
    assert server.counters["auth_failures_credentials"] == 1
    assert not server.sessions


async def test_a_result_the_wire_cannot_carry_fails_as_natively() -> None:
    session = await opened(make_server())
    with pytest.raises(ResourceExhausted, match="result cannot be sent"):
        await session.call("direct.huge", args())
    with pytest.raises(Exception, match="result cannot be sent"):
        await session.call("direct.unsendable", args())
    assert await session.call("direct.point", args(x=3, y=4)) == {"x": 3, "y": 4}  # the session goes on


async def test_calls_past_max_inflight_wait_for_a_slot() -> None:
    session = await opened(make_server(max_inflight=2))
    calls = [asyncio.ensure_future(session.call("direct.hold", args())) for _ in range(5)]
    await until(lambda: probe.running >= 2)
    await asyncio.sleep(0.05)  # room for a third to start, were it let in
    assert probe.running == 2
    probe.release.set()
    assert await asyncio.gather(*calls) == [2] * 5


async def test_cancelling_the_caller_cancels_the_handler() -> None:
    server = make_server()
    session = await opened(server)
    call = asyncio.ensure_future(session.call("direct.hold", args()))
    await until(lambda: probe.running >= 1)
    call.cancel()
    async with asyncio.timeout(5):
        await probe.cancelled.wait()
    await until(lambda: not session.tickets)
    assert call.cancelled()


async def test_a_deadline_bounds_the_handler() -> None:
    session = await opened(make_server())
    with pytest.raises(DeadlineExceeded):
        await session.call("direct.hold", args(), timeout=0.05)
    assert probe.cancelled.is_set()


async def test_draining_finishes_calls_then_refuses_new_ones() -> None:
    server = make_server()
    session = await opened(server)
    running = asyncio.ensure_future(session.call("direct.hold", args()))
    await until(lambda: probe.running >= 1)
    shutdown = asyncio.ensure_future(server.shutdown(grace=5))
    await until(lambda: not session.open)
    with pytest.raises(Unavailable, match="draining"):
        await session.call("direct.point", args(x=1, y=1))
    probe.release.set()
    assert await running == 1
    async with asyncio.timeout(5):
        await shutdown
    assert session not in server.sessions  # closed once its last call answered


async def test_a_slot_handed_to_a_caller_cancelled_meanwhile_goes_to_the_next() -> None:
    session = await opened(make_server(max_inflight=1))
    first = asyncio.ensure_future(session.call("direct.hold", args()))
    await until(lambda: probe.running == 1)
    second = asyncio.ensure_future(session.call("direct.hold", args()))
    third = asyncio.ensure_future(session.call("direct.hold", args()))
    await asyncio.sleep(0)  # both wait for the slot
    loop = asyncio.get_running_loop()
    # The first call's end hands the slot to the second; cancel the second before it runs.
    first.add_done_callback(lambda _: loop.call_soon(second.cancel))
    probe.release.set()
    assert await first == 1
    async with asyncio.timeout(5):
        assert await third == 1
    assert second.cancelled()


async def test_the_wait_for_a_slot_counts_against_the_calls_deadline() -> None:
    session = await opened(make_server(max_inflight=1))
    first = asyncio.ensure_future(session.call("direct.hold", args()))
    await until(lambda: probe.running == 1)
    loop = asyncio.get_running_loop()
    started = loop.time()
    with pytest.raises(DeadlineExceeded, match="no free slot"):  # the slot never came: never started
        await session.call("direct.hold", args(), timeout=0.1)
    assert 0.1 <= loop.time() - started < 2.0
    assert probe.most == 1 and not session._slots.waiters
    # A slot that comes late leaves the call only the rest of its time.
    waiting = asyncio.ensure_future(session.call("direct.hold", args(), timeout=0.6))
    await asyncio.sleep(0.4)
    started = loop.time()
    first.cancel()  # frees the slot: the waiter is sent with about 0.2 s left, and holds till then
    with pytest.raises(DeadlineExceeded):
        await waiting
    assert loop.time() - started < 0.5  # not the whole 0.6 s again
    assert first.cancelled()


class Pondering(StaticTokens):
    """An authenticator that takes its time (a password hash, a database): until ``decided`` is set."""

    def __init__(self, tokens: dict[str, Principal]) -> None:
        super().__init__(tokens)
        self.decided = asyncio.Event()

    async def authenticate(self, token: str | None, peer: PeerInfo) -> Principal:
        await self.decided.wait()
        return await super().authenticate(token, peer)


async def test_a_handshake_cancelled_midway_leaves_no_session() -> None:
    authenticator = Pondering({TOKEN: Principal("ada", frozenset({"user"}))})
    server = Server([service], authenticator=authenticator)
    session = DirectSession(server, PEER, TOKEN)
    start = asyncio.ensure_future(session.start())
    await until(lambda: session in server.sessions)
    start.cancel()
    with pytest.raises(asyncio.CancelledError):
        await start
    assert session not in server.sessions


async def test_streams_and_overlong_credentials_are_refused() -> None:
    server = make_server()
    session = await opened(server)
    with pytest.raises(FailedPrecondition, match="unary calls only"):
        await session.call("direct.numbers", args())
    with pytest.raises(Unauthenticated, match="too long"):
        await opened(server, "bst_" + "x" * server.limits.handshake_max_frame)
    assert server.sessions == {session}
