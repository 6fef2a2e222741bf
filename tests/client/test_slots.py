"""The async client keeps its calls in flight within the server's max_inflight (``Slots``)."""

from __future__ import annotations

import asyncio

import pytest

import bastion.testing
from bastion import DeadlineExceeded, Service
from bastion.client._connection import Slots
from bastion.server.server import ServerLimits


def run(coro: object) -> None:
    async def guarded() -> None:
        async with asyncio.timeout(20):
            await coro  # type: ignore[misc]

    asyncio.run(guarded())


def test_free_slots_are_taken_at_once_then_callers_wait_their_turn_in_order() -> None:
    async def main() -> None:
        slots = Slots(asyncio.get_running_loop(), 2)
        assert slots.try_acquire() and slots.try_acquire()
        assert not slots.try_acquire()
        order: list[int] = []

        async def wait(n: int) -> None:
            await slots.acquire()
            order.append(n)

        waiters = [asyncio.create_task(wait(n)) for n in range(3)]
        await asyncio.sleep(0)  # let them queue
        assert order == [] and len(slots.waiters) == 3
        slots.release()
        slots.release()
        await asyncio.sleep(0)
        assert order == [0, 1]  # the longest waiters first
        assert not slots.try_acquire()  # nobody may jump the queue past the third waiter
        slots.release()
        await asyncio.gather(*waiters)
        assert order == [0, 1, 2] and slots.free == 0

    run(main())


def test_a_cancelled_waiter_gives_up_its_place_and_a_slot_it_was_handed_goes_on() -> None:
    async def main() -> None:
        slots = Slots(asyncio.get_running_loop(), 1)
        assert slots.try_acquire()
        first = asyncio.create_task(slots.acquire())
        second = asyncio.create_task(slots.acquire())
        await asyncio.sleep(0)
        first.cancel()  # still waiting: it leaves the queue
        await asyncio.sleep(0)
        assert first.cancelled() and len(slots.waiters) == 1
        third = asyncio.create_task(slots.acquire())
        await asyncio.sleep(0)
        slots.release()  # handed to second ...
        second.cancel()  # ... which is cancelled before it runs: the slot passes to third
        await third
        assert second.cancelled() and slots.free == 0 and not slots.waiters

    run(main())


def test_a_waiter_cancelled_just_before_a_release_ends_cancelled_and_the_slot_is_free() -> None:
    async def main() -> None:
        slots = Slots(asyncio.get_running_loop(), 1)
        assert slots.try_acquire()
        waiting = asyncio.create_task(slots.acquire())
        await asyncio.sleep(0)
        waiting.cancel()  # its waiter is cancelled now; the task learns it on its next step
        slots.release()  # passes over the cancelled waiter: the slot becomes free
        await asyncio.gather(waiting, return_exceptions=True)
        assert waiting.cancelled()  # not a ValueError from removing a waiter already gone
        assert slots.free == 1 and not slots.waiters

    run(main())


def test_a_slot_is_never_free_while_callers_wait_for_one() -> None:
    """``CallPath.call`` takes a free slot without looking at the waiters: none wait while one is free."""

    async def main() -> None:
        slots = Slots(asyncio.get_running_loop(), 2)

        def check() -> None:
            assert not (slots.free > 0 and slots.waiters)

        assert slots.try_acquire() and slots.try_acquire()
        waiters = [asyncio.create_task(slots.acquire()) for _ in range(4)]
        await asyncio.sleep(0)
        check()
        waiters[1].cancel()  # leaves the queue
        await asyncio.sleep(0)
        check()
        for n in (1, 2, 3):  # to the waiters first, then free
            slots.release(n)
            check()
            await asyncio.sleep(0)
            check()
        await asyncio.gather(*waiters, return_exceptions=True)
        # The three waiters served hold their slots; the last three given back are free.
        assert slots.free == 3 and not slots.waiters

    run(main())


def test_a_waiter_with_a_timeout_gives_up_its_place_when_no_slot_comes() -> None:
    async def main() -> None:
        loop = asyncio.get_running_loop()
        slots = Slots(loop, 1)
        assert slots.try_acquire()
        started = loop.time()
        assert await slots.acquire(0.05) is False
        assert loop.time() - started >= 0.05 and not slots.waiters
        slots.release()  # nobody waits: the slot is free again, not handed to the one that gave up
        assert slots.free == 1
        assert await slots.acquire(0.05) is True and slots.free == 0  # taken at once
        waiting = asyncio.create_task(slots.acquire(5.0))
        await asyncio.sleep(0)
        slots.release()  # in time
        assert await waiting is True and slots.free == 0 and not slots.waiters

    run(main())


def test_a_waiter_failed_then_cancelled_does_not_give_back_a_slot_it_never_had() -> None:
    async def main() -> None:
        slots = Slots(asyncio.get_running_loop(), 1)
        assert slots.try_acquire()
        waiting = asyncio.create_task(slots.acquire())
        await asyncio.sleep(0)
        slots.waiters[0].set_exception(ConnectionError("closed"))  # as a closing connection fails its waiters
        waiting.cancel()  # before the task learns of it
        await asyncio.gather(waiting, return_exceptions=True)
        assert waiting.cancelled()
        assert slots.free == 0  # the one slot is still held by its taker: none was made up

    run(main())


service = Service("probe")


@service.method
async def hold(seconds: float) -> int:
    await asyncio.sleep(seconds)
    return 1


def test_more_calls_than_max_inflight_wait_for_slots_instead_of_being_refused() -> None:
    async def main() -> None:
        limits = ServerLimits(max_inflight=2)
        async with bastion.testing.connect(service, limits=limits, timeout=10) as client:
            results = await asyncio.gather(*(client.probe.hold(seconds=0.01) for _ in range(10)))
        assert results == [1] * 10

    run(main())


def test_closing_the_client_fails_the_calls_waiting_for_a_slot_and_opens_no_new_connection() -> None:
    async def main() -> None:
        limits = ServerLimits(max_inflight=1)
        async with bastion.testing.connect(service, limits=limits, timeout=10) as client:
            running = asyncio.ensure_future(client.probe.hold(seconds=0.5))
            waiting = asyncio.ensure_future(client.probe.hold(seconds=0.01))
            for _ in range(100):  # until the second call waits for the slot the first holds
                await asyncio.sleep(0.005)
                conn = client._conn
                if conn is not None and conn.slots is not None and conn.slots.waiters:
                    break
            else:
                raise AssertionError("the second call never waited for a slot")
            await client.close()
            outcomes = await asyncio.gather(running, waiting, return_exceptions=True)
            # Both fail as closed: the waiter is not started on the closing connection, nor
            # retried on a new one (the client stays closed, with no connection open).
            assert [type(o).__name__ for o in outcomes] == ["ClientClosed", "ClientClosed"], outcomes
            assert client._conn is None

    run(main())


def test_the_wait_for_a_slot_counts_against_the_calls_timeout() -> None:
    async def main() -> None:
        limits = ServerLimits(max_inflight=1)
        async with bastion.testing.connect(service, limits=limits) as client:
            loop = asyncio.get_running_loop()
            running = asyncio.ensure_future(client.probe.hold(seconds=5.0))
            for _ in range(200):  # until the first call holds the one slot
                await asyncio.sleep(0.005)
                conn = client._conn
                if conn is not None and conn.slots is not None and conn.slots.free == 0:
                    break
            started = loop.time()
            with pytest.raises(DeadlineExceeded, match="no free slot"):
                await client.invoke("probe.hold", {"seconds": 0.0}, timeout=0.1)
            assert 0.1 <= loop.time() - started < 2.0  # not until the first call ends, 5 s on
            # A slot that comes late leaves the call only the rest of its time.
            waiting = asyncio.ensure_future(client.invoke("probe.hold", {"seconds": 5.0}, timeout=0.6))
            await asyncio.sleep(0.4)
            started = loop.time()
            running.cancel()  # frees the slot: the waiter is sent with about 0.2 s left
            with pytest.raises(DeadlineExceeded):
                await waiting
            assert loop.time() - started < 0.5  # not the whole 0.6 s again
            # Calls on the client's default timeout take the inline path's waiting branch.
            running = asyncio.ensure_future(client.invoke("probe.hold", {"seconds": 5.0}, timeout=10.0))
            await asyncio.sleep(0.05)
            client.timeout = 0.1
            with pytest.raises(DeadlineExceeded, match="no free slot"):
                await client.probe.hold(seconds=0.0)
            running.cancel()
            await asyncio.gather(running, return_exceptions=True)

    run(main())
