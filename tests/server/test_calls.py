"""Calls in flight (bastion/server/session.py): multiplexing, deadlines, cancellation, streams.

Through ``bastion.testing``: a real server and client over the in-memory
transport, so every byte still crosses the protocol codec and flow control.
"""

import asyncio
import random
from collections.abc import AsyncIterator
from typing import Any

import pytest

import bastion.testing
from bastion import Context, DeadlineExceeded, Service
from bastion.services import admin
from bastion.testing import ANONYMOUS

WINDOW = 16


class Probe:
    """What the handlers report back to the test: one per test run."""

    def __init__(self) -> None:
        self.started = asyncio.Event()
        self.cancelled = asyncio.Event()
        self.finished = asyncio.Event()
        self.order: list[int] = []
        self.produced = 0
        self.consumed = 0
        self.max_ahead = 0


probe: Probe

service = Service("calls")


@service.method
async def echo(i: int, delay: float) -> int:
    await asyncio.sleep(delay)
    probe.order.append(i)
    return i


@service.method
async def slow(seconds: float = 10.0) -> str:
    probe.started.set()
    try:
        await asyncio.sleep(seconds)
    except asyncio.CancelledError:
        probe.cancelled.set()
        raise
    finally:
        probe.finished.set()
    return "done"


@service.method
async def remaining(ctx: Context) -> float | None:
    return ctx.time_remaining()


@service.method
async def count(n: int) -> AsyncIterator[int]:
    for i in range(n):
        probe.produced = i + 1
        yield i


@service.method
async def endless() -> AsyncIterator[int]:
    probe.started.set()
    i = 0
    try:
        while True:
            yield i
            i += 1
    finally:
        probe.finished.set()


@service.method
async def collect(items: AsyncIterator[int]) -> dict[str, Any]:
    seen = []
    async for item in items:
        seen.append(item)
        for _ in range(3):  # a slow consumer: the client must wait for credit
            await asyncio.sleep(0)
    return {"count": len(seen), "in_order": seen == list(range(len(seen))), "sum": sum(seen)}


@service.method
async def scale(factor: int, xs: AsyncIterator[int]) -> AsyncIterator[int]:
    async for x in xs:
        yield factor * x


def run(coro: Any) -> Any:
    global probe

    async def guarded() -> Any:
        global probe
        probe = Probe()  # its Events belong to this run's loop
        async with asyncio.timeout(15):
            return await coro

    return asyncio.run(guarded())


# -- multiplexing --------------------------------------------------------------------------------


def test_200_concurrent_calls_on_one_connection_are_answered_out_of_order() -> None:
    rng = random.Random(7)
    delays = [rng.uniform(0, 0.05) for _ in range(200)]

    async def main() -> None:
        async with bastion.testing.connect(service) as client:
            results = await asyncio.gather(*(client.calls.echo(i=i, delay=d) for i, d in enumerate(delays)))
            assert results == list(range(200))
            assert sorted(probe.order) == list(range(200))
            assert probe.order != list(range(200))  # answered as they finished, not in call order

    run(main())


# -- deadlines and cancellation --------------------------------------------------------------------


def test_a_deadline_on_a_slow_handler_gives_deadline_exceeded_and_cancels_it() -> None:
    async def main() -> None:
        async with bastion.testing.connect(service) as client:
            loop = asyncio.get_running_loop()
            start = loop.time()
            with pytest.raises(DeadlineExceeded):
                await client.invoke("calls.slow", {}, timeout=0.2)
            assert loop.time() - start < 1.0
            await asyncio.wait_for(probe.cancelled.wait(), 2)
            assert await client.calls.echo(i=1, delay=0) == 1  # the connection carries on

    run(main())


def test_the_server_enforces_the_deadline_a_call_carries() -> None:
    async def main() -> None:
        async with bastion.testing.connect(service) as client:
            # Start the call with a deadline but do not time it out locally:
            # the answer must come from the server's own timer.
            conn = await client._connection()
            _, pending = conn.start("calls.slow", {}, 0.1, False, {})
            with pytest.raises(DeadlineExceeded, match="deadline exceeded"):
                await pending.done
            assert probe.cancelled.is_set()

    run(main())


def test_the_handler_sees_the_time_remaining() -> None:
    async def main() -> None:
        async with bastion.testing.connect(service) as client:
            left = await client.invoke("calls.remaining", {}, timeout=2)
            assert 1.0 < left <= 2.0
            assert await client.calls.remaining() is None

    run(main())


def test_a_client_cancelled_call_cancels_the_handler() -> None:
    async def main() -> None:
        async with bastion.testing.connect(service) as client:
            task = asyncio.ensure_future(client.calls.slow())
            await asyncio.wait_for(probe.started.wait(), 2)
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
            await asyncio.wait_for(probe.cancelled.wait(), 2)
            assert await client.calls.echo(i=2, delay=0) == 2

    run(main())


def test_closing_a_server_stream_early_stops_the_handler() -> None:
    async def main() -> None:
        async with bastion.testing.connect(service) as client:
            stream = client.stream("calls.endless")
            assert [await anext(stream) for _ in range(3)] == [0, 1, 2]
            await stream.aclose()  # type: ignore[attr-defined]
            await asyncio.wait_for(probe.finished.wait(), 2)
            assert await client.calls.echo(i=3, delay=0) == 3

    run(main())


# -- streams -----------------------------------------------------------------------------------------


def test_a_server_stream_of_1000_items_arrives_complete_and_in_order() -> None:
    async def main() -> None:
        limits = bastion.ServerLimits(window=WINDOW)
        async with bastion.testing.connect(service, limits=limits) as client:
            assert client.limits.window == WINDOW  # the credit the client grants the server
            received = []
            async for item in client.stream("calls.count", n=1000):
                received.append(item)
                if len(received) <= 100:  # a slow reader for a while: the server must wait
                    for _ in range(5):
                        await asyncio.sleep(0)
                    probe.max_ahead = max(probe.max_ahead, probe.produced - len(received))
            assert received == list(range(1000))
            # The handler never ran more than a window (plus the item waiting for credit) ahead.
            assert 0 < probe.max_ahead <= WINDOW + 1
            assert await client.calls.count(n=1000) == list(range(1000))  # collected by call()

    run(main())


def test_a_client_stream_of_1000_items() -> None:
    async def main() -> None:
        limits = bastion.ServerLimits(window=WINDOW)
        async with bastion.testing.connect(service, limits=limits) as client:
            assert client.welcome is not None and client.welcome.window == WINDOW
            result = await client.calls.collect.upload(range(1000))
            assert result == {"count": 1000, "in_order": True, "sum": sum(range(1000))}

            async def generated() -> AsyncIterator[int]:
                for i in range(1000):
                    yield i

            assert (await client.calls.collect.upload(generated()))["count"] == 1000
            assert (await client.calls.collect.upload([]))["count"] == 0

    run(main())


def test_a_bidirectional_stream() -> None:
    async def main() -> None:
        async with bastion.testing.connect(service) as client:
            out = [x async for x in client.stream("calls.scale", range(500), factor=3)]
            assert out == [3 * i for i in range(500)]

    run(main())


# -- introspection -----------------------------------------------------------------------------------


def test_admin_methods_lists_services_with_schemas() -> None:
    async def main() -> list[dict[str, Any]]:
        async with bastion.testing.connect([admin.service, service]) as client:
            return await client.admin.methods()

    services = {svc["name"]: svc for svc in run(main())}
    assert set(services) == {"admin", "calls"}
    methods = {m["name"]: m for m in services["calls"]["methods"]}
    assert methods["calls.echo"]["kind"] == "unary"
    assert methods["calls.echo"]["params"]["properties"] == {"i": {"type": "integer"}, "delay": {"type": "number"}}
    assert methods["calls.echo"]["params"]["required"] == ["i", "delay"]
    assert methods["calls.echo"]["result"] == {"type": "integer"}
    assert methods["calls.count"]["kind"] == "server_stream"
    assert methods["calls.collect"]["kind"] == "client_stream"
    assert methods["calls.collect"]["input"] == {"type": "integer"}
    assert methods["calls.scale"]["kind"] == "bidi_stream"
    assert "ctx" not in methods["calls.remaining"]["params"].get("properties", {})
    assert {"admin.health", "admin.methods", "admin.stats"} <= {m["name"] for m in services["admin"]["methods"]}


def test_admin_health_works_for_anonymous_callers() -> None:
    async def main() -> dict[str, Any]:
        async with bastion.testing.connect([admin.service, service], principal=ANONYMOUS) as client:
            return await client.admin.health()

    health = run(main())
    assert health["status"] == "ok"
    assert health["version"] == bastion.__version__


def test_a_handler_raising_generator_exit_is_answered_and_gives_its_slot_back() -> None:
    """GeneratorExit from a handler (not its coroutine closed as the loop went away) is a failure like
    any other: before, the call was never answered and its scheduler slot stayed taken."""
    odd = bastion.Service("odd")

    @odd.method
    async def leave() -> None:
        await asyncio.sleep(0)
        raise GeneratorExit

    async def main() -> None:
        async with bastion.testing.MemoryServer(odd) as memory:
            client = memory.client(timeout=5)
            with pytest.raises(bastion.InternalError):
                await client.odd.leave()
            assert memory.server.scheduler.stats()["running"] == 0

    run(main())
