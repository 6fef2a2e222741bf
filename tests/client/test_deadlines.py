"""A connection's call deadlines (``Deadlines``): one loop timer per slot of ``resolution`` seconds, not per call."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from bastion.client._connection import Deadlines, Expired

RESOLUTION = 0.02


class CountingLoop:
    """The running loop, counting the timers asked of it."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.timers = 0

    def time(self) -> float:
        return self.loop.time()

    def call_at(self, when: float, callback: Any, *args: Any) -> asyncio.TimerHandle:
        self.timers += 1
        return self.loop.call_at(when, callback, *args)


def run(coro: Any) -> Any:
    async def guarded() -> Any:
        async with asyncio.timeout(10):
            return await coro

    return asyncio.run(guarded())


def test_a_deadline_fires_never_early_and_at_most_a_slot_late() -> None:
    async def main() -> None:
        loop = asyncio.get_running_loop()
        deadlines = Deadlines(loop, RESOLUTION)
        answer: asyncio.Future[Any] = loop.create_future()
        start = loop.time()
        deadlines.arm(answer, 0.05)
        with pytest.raises(Expired):
            await answer
        late = loop.time() - start - 0.05
        assert 0 <= late < RESOLUTION + 0.05  # a slot, plus the loop's own slack on a busy machine
        assert len(deadlines) == 0 and not deadlines.armed

    run(main())


def test_calls_in_one_slot_share_one_timer_and_disarmed_ones_are_left_alone() -> None:
    async def main() -> None:
        loop = asyncio.get_running_loop()
        counting = CountingLoop(loop)
        deadlines = Deadlines(counting, 1.0)  # type: ignore[arg-type]
        answers: list[asyncio.Future[Any]] = [loop.create_future() for _ in range(100)]
        slots = [deadlines.arm(answer, 0.01) for answer in answers]
        assert counting.timers <= 2 and len(deadlines) == 100  # one slot (two if a boundary fell in between)
        for slot, answer in zip(slots[:60], answers[:60], strict=True):
            answer.set_result("in time")
            deadlines.disarm(slot, answer)
        assert len(deadlines) == 40
        await asyncio.sleep(1.05)  # the slot's timer has fired
        assert all(answer.result() == "in time" for answer in answers[:60])
        assert all(isinstance(answer.exception(), Expired) for answer in answers[60:])
        assert len(deadlines) == 0

    run(main())


def test_an_answer_that_came_first_is_not_touched_by_its_slot_firing() -> None:
    async def main() -> None:
        loop = asyncio.get_running_loop()
        deadlines = Deadlines(loop, RESOLUTION)
        answer: asyncio.Future[Any] = loop.create_future()
        deadlines.arm(answer, 0.01)
        answer.set_result(1)  # answered, but not disarmed (a caller cancelled in between, say)
        await asyncio.sleep(0.01 + 2 * RESOLUTION)
        assert answer.result() == 1
        deadlines.disarm(12345, answer)  # disarming an unknown or fired slot is harmless

    run(main())


def test_slots_emptied_by_answers_are_dropped_with_their_timers_and_the_rest_still_fire() -> None:
    """A client spreading its timeouts over days would keep a timer per slot ever armed; past a
    thousand slots the empty ones are dropped, and the answers still armed expire as before."""

    async def main() -> None:
        loop = asyncio.get_running_loop()
        deadlines = Deadlines(loop, 0.0001)  # many slots within a fraction of a second
        answers: list[asyncio.Future[Any]] = [loop.create_future() for _ in range(3000)]
        kept = set(range(0, 1500, 100))
        slots = [deadlines.arm(answer, 0.05 + n * 0.0001) for n, answer in enumerate(answers[:1500])]
        for n, slot in enumerate(slots):
            if n not in kept:
                deadlines.disarm(slot, answers[n])
        for n in range(1500, 3000):  # the first of these sweeps the 1485 empty slots
            deadlines.arm(answers[n], 0.05 + n * 0.0001)
        live = sum(not handle.cancelled() for handle in loop._scheduled)  # type: ignore[attr-defined]
        assert live <= len(kept) + 1500 + 5  # not one per slot ever armed
        expected = [answers[n] for n in sorted(kept | set(range(1500, 3000)))]
        results = await asyncio.gather(*expected, return_exceptions=True)
        assert all(isinstance(r, Expired) for r in results)
        assert not any(answers[n].done() for n in range(1500) if n not in kept)
        assert len(deadlines) == 0 and not deadlines.timers

    run(main())
