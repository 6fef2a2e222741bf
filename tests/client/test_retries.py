"""Clients retry overloaded calls: idempotent ones only, honouring retry-after, the deadline and a budget.

The async client runs against a real server in memory (``bastion.testing``);
the sync client against a real ``bastion.Server`` on a free loopback port,
on its own event loop in a thread. The handlers fail with
``Unavailable(retry_after=...)`` their first ``fail`` times and record when
each invocation began. The test's own ``admin`` service stands in for the
built-in one so tests can count how often the client asks for the method
listing.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import threading
import time
from collections.abc import AsyncIterator, Iterator
from typing import Any

import pytest

import bastion.testing
from bastion import Context, InvalidArgument, ResourceExhausted, Server, Service, SyncClient, Unavailable
from bastion.client.aio import Client
from bastion.client.policy import NotStarted, RetryBudget, RetryPolicy

RETRY_AFTER = 0.05


class Flaky:
    """How the handlers behave and what they saw."""

    def __init__(self) -> None:
        self.fail = 0  # fail this many invocations of each method first
        self.retry_after: float | None = RETRY_AFTER
        self.error: type[Unavailable] | type[ResourceExhausted] = Unavailable
        self.seen: dict[str, list[float]] = {}
        self.listings = 0

    def enter(self, name: str) -> None:
        times = self.seen.setdefault(name, [])
        times.append(time.monotonic())
        if len(times) <= self.fail:
            raise self.error(f"{name} is busy", retry_after=self.retry_after)

    def count(self, name: str) -> int:
        return len(self.seen.get(name, []))


flaky = Flaky()
svc = Service("flaky")
listing = Service("admin")


@svc.method(public=True, idempotent=True)
async def read(key: str) -> str:
    flaky.enter("read")
    return f"value of {key}"


@svc.method(public=True)
async def write(key: str) -> str:
    flaky.enter("write")
    return f"wrote {key}"


@svc.method(public=True)
async def invalid() -> None:
    flaky.enter("invalid")
    raise InvalidArgument("never retried")


@svc.method(public=True, idempotent=True)
async def total(xs: AsyncIterator[int]) -> int:
    values = [x async for x in xs]
    flaky.enter("total")
    return sum(values)


@svc.method(public=True, idempotent=True)
async def count_to(n: int) -> AsyncIterator[int]:
    flaky.enter("count_to")
    for i in range(n):
        yield i


@listing.method(public=True, idempotent=True)
async def methods(ctx: Context) -> list[dict[str, Any]]:
    flaky.listings += 1
    return ctx.server.describe()


SERVICES = [svc, listing]


@pytest.fixture(autouse=True)
def _fresh_state() -> Iterator[None]:
    global flaky
    flaky = Flaky()
    yield


def run(coro: Any) -> Any:
    async def guarded() -> Any:
        async with asyncio.timeout(20):
            return await coro

    return asyncio.run(guarded())


def quick(**kwargs: Any) -> RetryPolicy:
    """A policy whose own backoff is zero, so every wait observed is the server's retry-after."""
    return RetryPolicy(random=lambda: 0.0, **kwargs)


@contextlib.asynccontextmanager
async def client_for(
    services: list[Service] = SERVICES, retry: RetryPolicy | None = None, timeout: float | None = None
) -> AsyncIterator[Client]:
    async with bastion.testing.MemoryServer(services) as memory:
        client = memory.client(timeout=timeout)
        client.retry = retry if retry is not None else quick()
        yield client


def gaps(times: list[float]) -> list[float]:
    return [b - a for a, b in itertools.pairwise(times)]


# -- the async client --------------------------------------------------------------------------


def test_an_idempotent_method_succeeds_after_retries_spaced_by_retry_after() -> None:
    async def main() -> None:
        flaky.fail = 2
        async with client_for() as client:
            assert await client.flaky.read(key="k") == "value of k"  # idempotency learnt from the server
        assert flaky.count("read") == 3
        assert all(gap >= RETRY_AFTER - 0.002 for gap in gaps(flaky.seen["read"])), gaps(flaky.seen["read"])
        assert flaky.listings == 1

    run(main())


def test_a_caller_can_declare_a_call_idempotent() -> None:
    async def main() -> None:
        flaky.fail = 1
        async with client_for(services=[svc]) as client:  # no listing to learn from
            assert await client.invoke("flaky.write", {"key": "k"}, idempotent=True) == "wrote k"
        assert flaky.count("write") == 2

    run(main())


def test_a_non_idempotent_method_is_never_retried() -> None:
    async def main() -> None:
        flaky.fail = 1
        async with client_for() as client:
            with pytest.raises(Unavailable, match="write is busy") as info:
                await client.flaky.write(key="k")
            assert info.value.retry_after == RETRY_AFTER  # the caller still sees the server's hint
            assert flaky.count("write") == 1
            flaky.fail = 2
            with pytest.raises(Unavailable):
                await client.invoke("flaky.read", {"key": "k"}, idempotent=False)  # the caller's word wins
            assert flaky.count("read") == 1

    run(main())


def test_without_a_method_listing_nothing_is_retried() -> None:
    async def main() -> None:
        flaky.fail = 1
        async with client_for(services=[svc]) as client:  # admin.methods: UNIMPLEMENTED
            with pytest.raises(Unavailable):
                await client.flaky.read(key="k")
        assert flaky.count("read") == 1

    run(main())


def test_non_retryable_statuses_are_not_retried() -> None:
    async def main() -> None:
        async with client_for() as client:
            with pytest.raises(InvalidArgument):
                await client.invoke("flaky.invalid", idempotent=True)
        assert flaky.count("invalid") == 1 and flaky.listings == 0

    run(main())


def test_resource_exhausted_is_retried_too_and_attempts_are_capped() -> None:
    async def main() -> None:
        flaky.fail, flaky.error = 10, ResourceExhausted
        async with client_for(retry=quick(max_attempts=4)) as client:
            with pytest.raises(ResourceExhausted):
                await client.flaky.read(key="k")
        assert flaky.count("read") == 4

    run(main())


def test_the_listing_is_fetched_once_per_connection_and_never_for_calls_that_succeed() -> None:
    async def main() -> None:
        async with client_for() as client:
            for _ in range(20):
                await client.flaky.read(key="k")
            assert flaky.listings == 0  # success pays nothing
            flaky.fail = 21 + 3
            # Concurrent failures share one fetch; later ones on the same connection use it.
            results = await asyncio.gather(*(client.flaky.read(key="k") for _ in range(3)), return_exceptions=True)
            assert results == ["value of k"] * 3
            assert flaky.listings == 1
            flaky.fail = flaky.count("read") + 1
            assert await client.flaky.read(key="k") == "value of k"
            assert flaky.listings == 1
            await client.close()  # a new connection may reach a new server: ask again
            flaky.fail = flaky.count("read") + 1
            assert await client.flaky.read(key="k") == "value of k"
            assert flaky.listings == 2

    run(main())


def test_no_retry_outlives_the_deadline() -> None:
    async def main() -> None:
        flaky.fail, flaky.retry_after = 5, 0.5
        async with client_for() as client:
            started = time.monotonic()
            with pytest.raises(Unavailable):
                await client.invoke("flaky.read", {"key": "k"}, timeout=0.3)
            assert time.monotonic() - started < 0.25  # gave up at once rather than sleep past the deadline
            assert flaky.count("read") == 1

            flaky.retry_after = 0.1
            flaky.fail = flaky.count("read") + 5
            with pytest.raises(Unavailable):
                await client.invoke("flaky.read", {"key": "k"}, timeout=0.35)
            assert flaky.count("read") - 1 in (2, 3)  # retries while 0.1s waits still fit in 0.35s
            assert time.monotonic() - started < 1.0

    run(main())


def test_a_retry_after_longer_than_max_delay_is_left_to_the_caller() -> None:
    async def main() -> None:
        flaky.fail, flaky.retry_after = 1, 5.0
        async with client_for() as client:
            with pytest.raises(Unavailable) as info:
                await client.flaky.read(key="k")
        assert info.value.retry_after == 5.0 and flaky.count("read") == 1

    run(main())


def test_the_budget_stops_a_retry_storm() -> None:
    async def main() -> None:
        flaky.fail, flaky.retry_after = 10_000, None
        storm = 50
        budget = RetryBudget(ratio=0.1, min_per_second=0.0, capacity=2.0)
        async with client_for(retry=quick(budget=budget)) as client:
            results = await asyncio.gather(
                *(client.invoke("flaky.read", {"key": "k"}, idempotent=True) for _ in range(storm)),
                return_exceptions=True,
            )
        assert all(isinstance(r, Unavailable) for r in results)
        retries = flaky.count("read") - storm
        # Without the budget: 2 * storm. With it: what the bucket holds (capacity 2; a
        # burst of requests cannot fill it beyond that) plus 10% of later requests.
        assert retries == 2

    run(main())


def test_an_upload_is_retried_only_when_its_items_can_be_sent_again() -> None:
    async def main() -> None:
        flaky.fail = 1
        async with client_for() as client:
            assert await client.flaky.total.upload([1, 2, 3]) == 6
            assert flaky.count("total") == 2
            flaky.fail = 3
            with pytest.raises(Unavailable):
                await client.flaky.total.upload(iter([1, 2, 3]))  # a one-shot iterator: once only
            assert flaky.count("total") == 3

    run(main())


def test_a_server_stream_collected_by_call_starts_over_on_retry() -> None:
    async def main() -> None:
        flaky.fail = 1
        async with client_for() as client:
            assert await client.flaky.count_to(n=3) == [0, 1, 2]
            assert flaky.count("count_to") == 2

    run(main())


def test_retry_none_disables_retries() -> None:
    async def main() -> None:
        flaky.fail = 1
        async with bastion.testing.MemoryServer(SERVICES) as memory:
            client = memory.client()
            client.retry = None
            with pytest.raises(Unavailable):
                await client.invoke("flaky.read", {"key": "k"}, idempotent=True)
        assert flaky.count("read") == 1 and flaky.listings == 0
        assert Client("localhost:1", retry=None).retry is None

    run(main())


async def _race_with_goaway(memory: bastion.testing.MemoryServer, client: Client) -> Any:
    """Send a call and, before the server reads it, have the server send GoAway."""
    await client.connect()
    call = asyncio.ensure_future(client.invoke("flaky.write", {"key": "k"}))
    await asyncio.sleep(0)  # the call is sent (or about to be); the server has not read it
    for session in list(memory.server.sessions):
        session.drain()
    return await call


def test_a_call_the_goaway_proves_never_started_is_replayed_once_on_a_new_connection() -> None:
    async def main() -> None:
        async with bastion.testing.MemoryServer(SERVICES) as memory:
            client = memory.client()
            assert await _race_with_goaway(memory, client) == "wrote k"  # not idempotent, yet safe
            assert flaky.count("write") == 1
            assert memory.server.counters["connections"] == 2

            client.retry = None
            with pytest.raises(NotStarted, match="safe to retry") as info:
                await _race_with_goaway(memory, client)
            assert isinstance(info.value, Unavailable)
            assert flaky.count("write") == 1

    run(main())


# -- the sync client -----------------------------------------------------------------------------


@contextlib.contextmanager
def threaded_server(services: list[Service]) -> Iterator[str]:
    """A real plaintext ``Server`` on a free loopback port, on an event loop in a thread."""
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()

    async def start() -> Server:
        server = Server(services)
        await server.start("127.0.0.1", 0)
        return server

    server = asyncio.run_coroutine_threadsafe(start(), loop).result(5)
    try:
        yield f"127.0.0.1:{server.port}"
    finally:
        asyncio.run_coroutine_threadsafe(server.shutdown(grace=1), loop).result(10)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(5)
        loop.close()


def test_the_sync_client_retries_idempotent_calls_and_only_those() -> None:
    with threaded_server(SERVICES) as address, SyncClient(address, insecure=True, retry=quick(), timeout=5) as client:
        flaky.fail = 2
        assert client.flaky.read(key="k") == "value of k"
        assert flaky.count("read") == 3 and flaky.listings == 1
        assert all(gap >= RETRY_AFTER - 0.002 for gap in gaps(flaky.seen["read"]))

        flaky.fail = 1
        with pytest.raises(Unavailable):
            client.flaky.write(key="k")
        assert flaky.count("write") == 1
        assert client.invoke("flaky.write", {"key": "k"}, idempotent=True) == "wrote k"
        assert flaky.count("write") == 2

        flaky.fail = flaky.count("read") + 1
        flaky.retry_after = 0.5
        with pytest.raises(Unavailable):
            client.invoke("flaky.read", {"key": "k"}, timeout=0.3)  # the retry would outlive the deadline
        assert flaky.listings == 1  # once per connection
    with threaded_server([svc]) as address, SyncClient(address, insecure=True, retry=quick()) as client:
        flaky.fail = flaky.count("read") + 1
        with pytest.raises(Unavailable):
            client.flaky.read(key="k")  # no listing: not known idempotent


def test_the_sync_client_budget_and_disabled_retries() -> None:
    with threaded_server(SERVICES) as address:
        flaky.fail, flaky.retry_after = 10_000, None
        budget = RetryBudget(ratio=0.1, min_per_second=0.0, capacity=1.0)
        with SyncClient(address, insecure=True, retry=quick(budget=budget)) as client:
            for _ in range(30):
                with pytest.raises(Unavailable):
                    client.invoke("flaky.read", {"key": "k"}, idempotent=True)
        assert flaky.count("read") - 30 == 3  # the first call (a full bucket), then one in ten
        with SyncClient(address, insecure=True, retry=None) as client, pytest.raises(Unavailable):
            client.invoke("flaky.read", {"key": "k"}, idempotent=True)
        assert flaky.count("read") - 31 == 3
        with SyncClient(address, insecure=True, timeout=0.2) as client:  # the default policy
            started = time.monotonic()
            with pytest.raises(Unavailable):
                client.invoke("flaky.read", {"key": "k"}, idempotent=True)
            assert time.monotonic() - started < 0.2  # 3 attempts, the waits within the deadline
        assert flaky.count("read") - 34 == 3


def test_closing_the_sync_client_ends_a_call_waiting_to_retry() -> None:
    """``close`` from another thread fails the call in progress at once -- but not one waiting out the wait
    before its retry: that wait held no lock and nothing ended it, so the call slept on, then opened a new
    connection on the client just closed and carried on as if nothing had happened."""
    from bastion.client._connection import ClientClosed
    from tests.support.server import wait_for

    with threaded_server(SERVICES) as address:
        flaky.fail, flaky.retry_after = 1, 1.5
        client = SyncClient(address, insecure=True, retry=quick(max_delay=5.0), timeout=10)
        outcome: list[Any] = []

        def call() -> None:
            try:
                outcome.append(client.flaky.read(key="k"))
            except Exception as exc:
                outcome.append(exc)

        caller = threading.Thread(target=call)
        caller.start()
        # refused once, and known idempotent: waiting to retry
        wait_for(lambda: flaky.count("read") == 1 and flaky.listings == 1, 5, what="the first attempt")
        started = time.monotonic()
        client.close()
        caller.join(5)
        assert time.monotonic() - started < 0.5
        assert len(outcome) == 1 and isinstance(outcome[0], ClientClosed), outcome
        assert flaky.count("read") == 1  # no retry on the closed client


def test_closing_the_async_client_ends_a_call_waiting_to_retry() -> None:
    """The async client's too: a call waiting to retry when ``close`` came slept on, then opened a new
    connection on the closed client and carried on."""
    from bastion.client._connection import ClientClosed
    from tests.adversity.test_hostile_peers import poll

    async def main() -> None:
        async with client_for(retry=quick(max_delay=5.0), timeout=10) as client:
            flaky.fail, flaky.retry_after = 1, 1.5
            call = asyncio.ensure_future(client.flaky.read(key="k"))
            # refused once, and known idempotent: waiting to retry
            await poll(lambda: flaky.count("read") == 1 and flaky.listings == 1, "the first attempt")
            loop = asyncio.get_running_loop()
            started = loop.time()
            await client.close()
            with pytest.raises(ClientClosed):
                await call
            assert loop.time() - started < 0.5
            assert flaky.count("read") == 1  # no retry on the closed client

    run(main())


def test_closing_the_async_client_between_attempts_ends_a_call_retrying_at_once() -> None:
    """A retry with no wait before it (the server gave no retry-after, the policy's backoff is zero) did not look
    whether ``close`` had come since the attempt before, as the wait does: it opened a new connection on the
    closed client and carried on. ``close`` comes here as the policy draws the backoff's jitter, between the two
    attempts (``close`` awaits nothing: the coroutine runs to its end at once)."""
    from bastion.client._connection import ClientClosed

    clients: list[Client] = []

    def close_then_no_jitter() -> float:
        with contextlib.suppress(StopIteration):
            clients[0].close().send(None)
        return 0.0

    async def main() -> None:
        async with client_for(retry=RetryPolicy(random=close_then_no_jitter), timeout=10) as client:
            clients.append(client)
            await client.connect()
            flaky.fail, flaky.retry_after = 1, None
            with pytest.raises(ClientClosed):
                await client.flaky.read(key="k")
            assert flaky.count("read") == 1  # no retry on the closed client

    run(main())
