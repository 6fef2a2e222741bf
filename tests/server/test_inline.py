"""Handlers that cannot suspend run inline (``Entry.inline``, ``ServerSession._run_inline``).

An ``async def`` with no ``await``, ``async for`` or ``async with`` always
ends in its first step, so the session runs it at once instead of in a task.
These tests hold it to what a task would have done: the same answers and
errors, a fresh context per call, the scheduler's admission and counts, the
rate limit, ``calls_in_flight`` -- over a real server on loopback TCP.
"""

from __future__ import annotations

import asyncio
import contextvars
import functools
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import msgspec
import pytest

import bastion
from bastion import Principal, Server, Service
from bastion.protocol.messages import Call, Hello
from bastion.security.authn import StaticTokens
from bastion.security.ratelimit import Limit, RateLimitConfig, RateLimiter
from bastion.server.dispatch import MethodTable, never_suspends
from bastion.server.scheduler import Scheduler, SchedulerConfig
from bastion.service import Context

TOKEN = "bst_inline-test-token-0123456789abcdef"
ADA = Principal("ada", frozenset({"user"}))

seen: contextvars.ContextVar[int] = contextvars.ContextVar("seen", default=0)
release = asyncio.Event()  # replaced per test (an Event binds to its first loop)


def make_service() -> Service:
    svc = Service("inl")

    @svc.method
    async def echo(value: int) -> int:
        return value

    @svc.method
    async def where() -> dict[str, Any]:
        before = seen.get()
        seen.set(before + 1)  # must not leak into the next call
        return {"task": asyncio.current_task() is not None, "seen_before": before}

    @svc.method
    async def fail(kind: str) -> int:
        if kind == "coded":
            raise bastion.InvalidArgument("kind is coded")
        raise ValueError("a handler bug")

    @svc.method
    async def big(size: int) -> bytes:
        return b"x" * size

    @svc.method
    async def stats(ctx: Context) -> dict[str, Any]:
        return {"in_flight": ctx.server.stats()["calls_in_flight"], "method": ctx.method.full_name}

    @svc.method
    async def hold() -> str:
        await release.wait()
        return "held"

    return svc


async def serving(body: Callable[[bastion.Client, Server], Awaitable[None]], **options: Any) -> None:
    global release
    release = asyncio.Event()
    server = Server([make_service()], authenticator=StaticTokens({TOKEN: ADA}), **options)
    await server.start("127.0.0.1", 0)
    try:
        async with bastion.Client(f"127.0.0.1:{server.port}", token=TOKEN, insecure=True, timeout=5) as client:
            await body(client, server)
    finally:
        release.set()
        await server.shutdown(grace=1)


def run(body: Callable[[bastion.Client, Server], Awaitable[None]], **options: Any) -> None:
    async def guarded() -> None:
        async with asyncio.timeout(20):
            await serving(body, **options)

    asyncio.run(guarded())


# -- which handlers -----------------------------------------------------------------------------


async def plain(x: int) -> int:
    return x + 1


async def awaits(x: int) -> int:
    await asyncio.sleep(0)
    return x


async def iterates(x: AsyncIterator[int]) -> int:
    async for _ in x:
        pass
    return 0


async def enters(x: Any) -> int:
    async with x:
        return 0


async def comprehends(xs: list[Awaitable[int]]) -> list[int]:
    return [await x for x in xs]


async def generates(x: int) -> AsyncIterator[int]:
    yield x


def synchronous(x: int) -> int:
    return x


class Methods:
    async def plain(self, x: int) -> int:
        return x


def test_only_handlers_without_await_async_for_or_async_with_never_suspend() -> None:
    assert never_suspends(plain)
    assert never_suspends(Methods().plain)  # a bound method: its function is read
    for handler in (awaits, iterates, enters, comprehends, generates, synchronous):
        assert not never_suspends(handler), handler.__name__
    # Not read, so not trusted: wrappers run in a task.
    assert not never_suspends(functools.partial(plain, 1))
    assert not never_suspends(lambda x: plain(x))


def test_the_method_table_marks_inline_only_unary_async_methods_that_never_suspend() -> None:
    table = MethodTable([make_service()])
    inline = {name for name, entry in table.entries.items() if entry.inline}
    assert inline == {"inl.echo", "inl.where", "inl.fail", "inl.big", "inl.stats"}


# -- what a task would have done -----------------------------------------------------------------


def test_an_inline_call_answers_runs_without_a_task_and_in_a_fresh_context() -> None:
    async def body(client: bastion.Client, server: Server) -> None:
        assert await asyncio.gather(*(client.call("inl.echo", value=i) for i in range(50))) == list(range(50))
        first = await client.call("inl.where")
        second = await client.call("inl.where")
        assert first == second == {"task": False, "seen_before": 0}  # nothing leaked from the first call
        counts = server.scheduler.stats()
        assert counts["submitted"] == counts["started"] == counts["completed"] == 52
        assert counts["running"] == 0
        # Counted in the metrics per read, as a batch: every call, its status, its latency.
        snapshot = server.metrics.snapshot()
        assert snapshot["calls"]["inl.echo"] == {"OK": 50}
        assert snapshot["calls"]["inl.where"] == {"OK": 2}
        *buckets, total = snapshot["latency"]["inl.echo"]
        assert sum(buckets) == 50 and 0 < total < 50 * 5

    run(body)


def test_inline_failures_get_the_same_coded_answers_and_the_connection_carries_on(
    caplog: pytest.LogCaptureFixture,
) -> None:
    async def body(client: bastion.Client, server: Server) -> None:
        with pytest.raises(bastion.InvalidArgument, match="kind is coded"):
            await client.call("inl.fail", kind="coded")
        with pytest.raises(bastion.InternalError, match="request id"):
            await client.call("inl.fail", kind="bug")
        with pytest.raises(bastion.CallError) as too_large:
            await client.call("inl.big", size=server.limits.max_frame + 1)
        assert too_large.value.status is not bastion.Status.OK
        assert await client.call("inl.echo", value=7) == 7
        assert server.stats()["internal_errors_total"] == 1

    run(body)
    assert "a handler bug" in caplog.text  # logged with its traceback, as in a task


def test_an_inline_call_counts_itself_in_flight_and_reads_its_context() -> None:
    async def body(client: bastion.Client, server: Server) -> None:
        assert await client.call("inl.stats") == {"in_flight": 1, "method": "inl.stats"}
        assert server.stats()["calls_in_flight"] == 0

    run(body)


def test_an_inline_call_waits_its_turn_behind_queued_calls() -> None:
    """With every slot taken, a call that could run inline queues like any other: no overtaking."""

    async def body(client: bastion.Client, server: Server) -> None:
        held = asyncio.ensure_future(client.call("inl.hold"))
        while server.scheduler.stats()["running"] < 1:  # noqa: ASYNC110 - polls the server's own count
            await asyncio.sleep(0.005)
        echo = asyncio.ensure_future(client.call("inl.echo", value=1))
        while server.scheduler.stats()["queued"] < 1:  # noqa: ASYNC110
            await asyncio.sleep(0.005)
        assert not echo.done()
        release.set()
        assert await held == "held"
        assert await echo == 1

    run(body, scheduler=Scheduler(SchedulerConfig(max_concurrency=1)))


def test_inline_calls_are_rate_limited() -> None:
    limiter = RateLimiter(RateLimitConfig(per_principal=Limit(rate=0.001, burst=3)))

    async def body(client: bastion.Client, server: Server) -> None:
        for i in range(3):
            assert await client.call("inl.echo", value=i) == i
        with pytest.raises(bastion.ResourceExhausted):
            await client.call("inl.echo", value=3)

    run(body, limiter=limiter)


def test_a_limiter_on_its_own_clock_is_charged_on_that_clock() -> None:
    """Sessions hand an in-memory limiter the time of the read, unless it has a clock of its own."""
    now = [1000.0]
    limiter = RateLimiter(RateLimitConfig(per_principal=Limit(rate=1, burst=2)), clock=lambda: now[0])

    async def body(client: bastion.Client, server: Server) -> None:
        assert [await client.call("inl.echo", value=i) for i in range(2)] == [0, 1]
        with pytest.raises(bastion.ResourceExhausted) as refused:
            await client.call("inl.echo", value=2)
        assert refused.value.retry_after == pytest.approx(1.0)
        now[0] += 1.0  # one token back, on the limiter's clock alone
        assert await client.call("inl.echo", value=3) == 3
        with pytest.raises(bastion.ResourceExhausted):
            await client.call("inl.echo", value=4)

    run(body, limiter=limiter)


def test_a_peer_that_does_not_read_cannot_make_inline_answers_pile_up() -> None:
    """One read of 200 calls, each answered with 256 KiB, from a peer that reads nothing yet:
    the answers are written as they pass the high-water mark, writing pauses, and the calls
    after that wait in tasks for the peer -- the server holds about a megabyte, not 50 MiB."""
    size, count = 256 * 1024, 200

    async def body(client: bastion.Client, server: Server) -> None:
        reader, writer = await asyncio.open_connection("127.0.0.1", server.port)

        def frames(*messages: object) -> bytes:
            return b"".join(len(m).to_bytes(4, "big") + m for m in map(msgspec.msgpack.encode, messages))

        async def read() -> list[Any]:
            length = int.from_bytes(await reader.readexactly(4), "big")
            return msgspec.msgpack.decode(await reader.readexactly(length))  # type: ignore[no-any-return]

        writer.write(frames(Hello(1, "raw-test/1", TOKEN)))
        assert (await read())[0] == 2  # Welcome
        args = msgspec.Raw(msgspec.msgpack.encode({"size": size}))
        writer.write(frames(*(Call(i, "inl.big", args) for i in range(1, count + 1))))  # one write
        while server.stats()["calls_total"] < count:  # noqa: ASYNC110 - polls the server's own count
            await asyncio.sleep(0.005)
        host, port = writer.get_extra_info("sockname")[:2]
        (session,) = [s for s in server.sessions if s.link is not None and s.link.peer == f"{host}:{port}"]
        assert session.link is not None and session.link.transport is not None
        held = session.core.pending_output + session.link.transport.get_write_buffer_size()
        assert held < 4 * size + (1 << 20), held  # the high-water mark (1 MiB) and a frame or so
        assert server.stats()["calls_in_flight"] > 0  # the rest wait for the peer in their tasks
        answers: dict[int, int] = {}
        while len(answers) < count:
            kind, call_id, value, *_ = await read()
            assert kind == 4, (kind, call_id, value)  # Result
            answers[call_id] = len(value)
        assert answers == dict.fromkeys(range(1, count + 1), size)
        writer.close()

    run(body)


class Demoting(StaticTokens):
    """Tokens whose principal loses every role once ``demoted`` is set (seen at revalidation)."""

    demoted = False

    async def revalidate(self, principal: Principal) -> Principal | None:
        if self.demoted:
            return Principal(principal.name, frozenset(), token_id=principal.token_id)
        return principal


def test_a_role_lost_at_revalidation_is_enforced_on_the_open_connection() -> None:
    """The session remembers which methods its principal was admitted to, for that principal
    object only: a revalidated principal is checked afresh."""
    svc = Service("roles")

    @svc.method(roles=["user"])
    async def guarded() -> str:
        return "in"

    authenticator = Demoting({TOKEN: Principal("ada", frozenset({"user"}), token_id="t1")})

    async def main() -> None:
        server = Server([svc], authenticator=authenticator, revalidate_interval=0.02)
        await server.start("127.0.0.1", 0)
        try:
            async with bastion.Client(f"127.0.0.1:{server.port}", token=TOKEN, insecure=True, timeout=5) as client:
                assert await client.call("roles.guarded") == "in"
                assert await client.call("roles.guarded") == "in"  # admitted from the session's memory
                authenticator.demoted = True
                deadline = asyncio.get_running_loop().time() + 5
                while True:
                    try:
                        await client.call("roles.guarded")
                    except bastion.PermissionDenied:
                        break
                    assert asyncio.get_running_loop().time() < deadline, "the lost role was never enforced"
                    await asyncio.sleep(0.01)
        finally:
            await server.shutdown(grace=1)

    asyncio.run(main())
