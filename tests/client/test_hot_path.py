"""The async client's usual call: a bare future per unary call, slots given back by the connection.

``CallPath.call`` (a single-server client's ``call``) sends a unary call in a
free slot with no ``Pending`` and no await, in one coroutine; the call's slot
is given back when the call leaves the connection's ``pending`` -- answered,
failed, cancelled, expired, or lost with the connection. These tests check
each way out gives the slot back and leaves nothing behind, that a unary call
to a server stream still collects its items, that a subclass overriding
``_attempt`` sees every attempt, the usual call's first one included, that
the calls of one loop turn are written together (output past the write
buffer's high-water mark at once), and what the usual call's frame puts on
the wire.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import pytest

import bastion.testing
from bastion import ConnectionClosed, DeadlineExceeded, InvalidArgument, Service, Unavailable
from bastion.client._connection import WRITE_HIGH_WATER, ClientConnection, Slots
from bastion.client._path import CallPath
from bastion.client.aio import Client
from bastion.client.policy import RetryPolicy
from bastion.server.server import ServerLimits

service = Service("hot")
started: dict[str, asyncio.Event] = {}
failures = {"left": 0}


@service.method
async def echo(value: Any) -> Any:
    return value


@service.method
async def refuse() -> None:
    raise InvalidArgument("no")


@service.method
async def hang() -> None:
    started["hang"].set()
    await asyncio.sleep(30)


@service.method
async def count(n: int) -> AsyncIterator[int]:
    for i in range(n):
        yield i


@service.method
async def flaky() -> str:
    if failures["left"] > 0:
        failures["left"] -= 1
        raise Unavailable("busy", retry_after=0.001)
    return "ok"


def run(coro: Any) -> Any:
    async def guarded() -> Any:
        started["hang"] = asyncio.Event()
        async with asyncio.timeout(10):
            return await coro

    return asyncio.run(guarded())


def connection(client: Client) -> ClientConnection:
    conn = client._conn
    assert conn is not None
    return conn


def assert_idle(conn: ClientConnection) -> None:
    """No call left in flight, on either side of the client, and every slot free."""
    assert conn.pending == {}
    assert conn.core.open_calls == 0
    assert conn.slots is not None and conn.core.peer_max_inflight == conn.slots.free


def test_answers_and_errors_give_their_slots_back() -> None:
    async def main() -> None:
        async with bastion.testing.connect(service) as client:
            conn = connection(client)
            results = await asyncio.gather(*(client.call("hot.echo", value=i) for i in range(50)))
            assert results == list(range(50))
            with pytest.raises(InvalidArgument):
                await client.call("hot.refuse")
            assert_idle(conn)

    run(main())


def test_a_deadline_cancels_the_call_on_the_server_and_gives_its_slot_back() -> None:
    async def main() -> None:
        async with bastion.testing.connect(service, timeout=0.05) as client:
            conn = connection(client)
            with pytest.raises(DeadlineExceeded, match=r"hot.hang: no answer within 0.05s"):
                await client.call("hot.hang")
            assert_idle(conn)
            assert await client.call("hot.echo", value="after") == "after"

    run(main())


def test_cancelling_the_caller_cancels_the_call_and_gives_its_slot_back() -> None:
    async def main() -> None:
        async with bastion.testing.connect(service) as client:
            conn = connection(client)
            call = asyncio.ensure_future(client.call("hot.hang"))
            await started["hang"].wait()
            assert len(conn.pending) == 1
            call.cancel()
            with pytest.raises(asyncio.CancelledError):
                await call
            assert_idle(conn)

    run(main())


def test_a_lost_connection_fails_the_calls_and_frees_their_slots_for_the_waiters() -> None:
    async def main() -> None:
        limits = ServerLimits(max_inflight=2)
        async with bastion.testing.connect(service, limits=limits) as client:
            conn = connection(client)
            calls = [asyncio.ensure_future(client.call("hot.hang")) for _ in range(4)]
            await started["hang"].wait()
            await asyncio.sleep(0.01)
            assert conn.slots is not None and conn.slots.free == 0 and len(conn.slots.waiters) == 2
            assert conn.link is not None
            conn.link.abort()
            for call in calls:  # the two waiting for a slot find the connection closed, the others lose it
                with pytest.raises(ConnectionClosed):
                    await call
            assert conn.pending == {} and not conn.slots.waiters

    run(main())


def test_a_unary_call_to_a_server_stream_collects_its_items() -> None:
    async def main() -> None:
        async with bastion.testing.connect(service) as client:
            conn = connection(client)
            assert await client.call("hot.count", n=40) == list(range(40))  # more than the window: credit flows
            assert await client.call("hot.count", n=0) is None  # no items: the result itself
            assert_idle(conn)

    run(main())


class CountingClient(Client):
    """Counts the attempts (as tests/support/chaos.py does)."""

    attempts = 0

    async def _attempt(self, *args: Any, **kwargs: Any) -> Any:
        self.attempts += 1
        return await super()._attempt(*args, **kwargs)


def test_a_subclass_overriding_attempt_sees_every_attempt_the_first_included() -> None:
    async def main() -> None:
        async with bastion.testing.MemoryServer([service]) as memory:
            counting = CountingClient("memory", token=memory.client()._token)
            counting._connector = memory._connect
            assert Client._own_attempt and not CountingClient._own_attempt
            try:
                await counting.connect()
                assert await counting.call("hot.echo", value=1) == 1
                assert counting.attempts == 1
                failures["left"] = 2
                assert await counting.invoke("hot.flaky", idempotent=True) == "ok"
                assert counting.attempts == 4  # one call, three attempts
            finally:
                await counting.close()

    run(main())


def test_settings_changed_after_construction_apply_to_the_next_call() -> None:
    """The usual call reads timeout, retry policy and budget from the client's ``_path``: setting them reaches it."""

    async def main() -> None:
        async with bastion.testing.connect(service) as client:
            assert await client.call("hot.echo", value=1) == 1
            client.timeout = 0.05
            assert client.timeout == 0.05
            with pytest.raises(DeadlineExceeded, match=r"hot.hang: no answer within 0.05s"):
                await client.call("hot.hang")
            client.timeout = None
            client.retry = RetryPolicy(base_delay=0.001)
            budget = client.retry_budget
            assert budget is not None and budget.requests == 0
            for i in range(3):
                assert await client.call("hot.echo", value=i) == i
            assert budget.requests == 3  # every call counted, on the usual call's path too
            failures["left"] = 1
            assert await client.invoke("hot.flaky", idempotent=True) == "ok"  # retried
            client.retry = None
            assert client.retry_budget is None
            failures["left"] = 1
            with pytest.raises(Unavailable):
                await client.invoke("hot.flaky", idempotent=True)  # no retry policy: no retry
            assert_idle(connection(client))

    run(main())


def test_a_call_made_on_a_draining_connection_opens_a_new_one() -> None:
    async def main() -> None:
        async with bastion.testing.connect(service) as client:
            old = connection(client)
            old.core.send_goaway()  # this end stops sending calls on it
            assert not old.usable
            assert await client.call("hot.echo", value=2) == 2
            assert connection(client) is not old

    run(main())


def test_slots_release_many_at_once_to_the_waiters_first() -> None:
    async def main() -> None:
        slots = Slots(asyncio.get_running_loop(), 3)
        assert slots.try_acquire() and slots.try_acquire() and slots.try_acquire()
        waiters = [asyncio.ensure_future(slots.acquire()) for _ in range(2)]
        await asyncio.sleep(0)
        slots.release(3)  # two go to the waiters, one is free
        await asyncio.gather(*waiters)
        assert slots.free == 1 and not slots.waiters

    run(main())


def test_a_single_server_clients_call_is_one_coroutine_that_create_task_runs() -> None:
    async def main() -> None:
        async with bastion.testing.connect(service) as client:
            assert client.call.__func__ is CallPath.call  # type: ignore[attr-defined]  # bound on the client
            call = client.call("hot.echo", value=1)
            assert asyncio.iscoroutine(call)
            assert await asyncio.create_task(call) == 1
            assert_idle(connection(client))

    run(main())


class OverridingClient(Client):
    def call(self, method: str, /, **args: Any) -> Any:
        return super().call(method, **args)


def test_balanced_clients_and_subclasses_that_override_call_or_attempt_keep_client_call(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    assert Client("127.0.0.1:7400").call.__func__ is CallPath.call  # type: ignore[attr-defined]
    with monkeypatch.context() as patched:  # a test replacing Client.call reaches the clients it makes then
        replacement = OverridingClient.call
        patched.setattr(Client, "call", replacement)
        assert Client("127.0.0.1:7400").call.__func__ is replacement  # type: ignore[attr-defined]
    assert Client(["127.0.0.1:7400", "127.0.0.1:7401"]).call.__func__ is Client.call  # type: ignore[attr-defined]
    assert OverridingClient("127.0.0.1:7400").call.__func__ is OverridingClient.call  # type: ignore[attr-defined]
    assert CountingClient("127.0.0.1:7400").call.__func__ is Client.call  # type: ignore[attr-defined]

    async def main() -> None:
        async with bastion.testing.MemoryServer([service]) as memory:
            overriding = OverridingClient("memory", token=memory.client()._token)
            overriding._connector = memory._connect
            try:
                assert await overriding.call("hot.echo", value=3) == 3  # before the connection, and on it
                assert await overriding.call("hot.echo", value=4) == 4
            finally:
                await overriding.close()

    run(main())


def test_the_calls_of_one_loop_turn_are_written_together_and_output_past_the_mark_at_once() -> None:
    async def main() -> None:
        async with bastion.testing.connect(service) as client:
            conn = connection(client)
            value = b"x" * 65536
            n = 40  # 2.6 MB of calls, started in one loop turn: past WRITE_HIGH_WATER twice
            queued: list[int] = []

            async def look() -> None:  # runs after the calls' first steps, before the flush they scheduled
                queued.append(len(conn.core.output.buffer))

            calls = [asyncio.ensure_future(client.call("hot.echo", value=value)) for _ in range(n)]
            await asyncio.ensure_future(look())
            assert 0 < queued[0] < WRITE_HIGH_WATER  # the rest was written as it passed the mark
            assert await asyncio.gather(*calls) == [value] * n
            for i in range(3):  # one at a time: each call finds nothing queued, and schedules a flush
                assert await client.call("hot.echo", value=i) == i
            assert_idle(conn)

    run(main())
