"""bastion.server.deadlines: many call deadlines in 10 ms slots, never early.

Deadlines are on ``time.monotonic``'s clock (the session's and the scheduler's);
each slot's loop timer is set on the loop's clock when the slot is made.
"""

from __future__ import annotations

import asyncio
import time

import uvloop

from bastion.server.deadlines import RESOLUTION, Deadlines


class Holder:
    def __init__(self, loop: asyncio.AbstractEventLoop, expect: int) -> None:
        self.loop = loop
        self.expired: dict[int, float] = {}
        self.expect = expect
        self.all_in = asyncio.Event()

    def _expire(self, call_id: int) -> None:
        self.expired[call_id] = time.monotonic()
        if len(self.expired) >= self.expect:
            self.all_in.set()


async def test_a_deadline_fires_at_or_after_it_never_before() -> None:
    loop = asyncio.get_running_loop()
    deadlines, holder = Deadlines(), Holder(loop, expect=5)
    start = time.monotonic()
    whens = {call_id: start + 0.02 + call_id * 0.013 for call_id in range(1, 6)}
    for call_id, when in whens.items():
        deadlines.arm(loop, when, holder, call_id)
    assert len(deadlines) == 5
    await asyncio.wait_for(holder.all_in.wait(), 5)
    assert set(holder.expired) == set(whens)
    for call_id, fired in holder.expired.items():
        assert whens[call_id] <= fired <= whens[call_id] + RESOLUTION + 0.05
    assert len(deadlines) == 0


def test_a_deadline_on_the_monotonic_clock_fires_at_or_after_it_on_uvloop_too() -> None:
    """uvloop's loop clock is not ``time.monotonic`` (milliseconds, read once per loop turn): a slot's
    timer that comes early by ``time.monotonic`` waits out the rest, so no deadline fires before it."""
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        runner.run(test_a_deadline_fires_at_or_after_it_never_before())


async def test_a_disarmed_call_is_never_expired_and_others_in_its_slot_still_are() -> None:
    loop = asyncio.get_running_loop()
    deadlines, holder = Deadlines(), Holder(loop, expect=1)
    when = time.monotonic() + 0.03
    slot = deadlines.arm(loop, when, holder, 1)
    assert deadlines.arm(loop, when, holder, 2) == slot  # one slot, one loop timer
    deadlines.disarm(slot, holder, 1)
    deadlines.disarm(slot, holder, 99)  # never armed: nothing happens
    await asyncio.wait_for(holder.all_in.wait(), 5)
    # The slot fired once, for both: call 1 was not in it any more, and nothing is left to fire.
    assert set(holder.expired) == {2}
    assert len(deadlines) == 0


async def test_slots_emptied_by_answers_are_dropped_and_the_rest_still_fire() -> None:
    """Past a thousand slots the empty ones are dropped with their timers (a caller may spread its
    timeouts over days); the calls still armed fire as before, the disarmed ones never."""
    loop = asyncio.get_running_loop()
    deadlines = Deadlines(resolution=0.0001)  # many slots within a fraction of a second
    start = time.monotonic() + 0.05
    kept = set(range(0, 1500, 100))
    holder = Holder(loop, expect=len(kept) + 1500)
    slots = {call_id: deadlines.arm(loop, start + call_id * 0.0001, holder, call_id) for call_id in range(1500)}
    for call_id, slot in slots.items():
        if call_id not in kept:
            deadlines.disarm(slot, holder, call_id)
    for call_id in range(1500, 3000):  # the first of these sweeps the 1485 empty slots
        deadlines.arm(loop, start + call_id * 0.0001, holder, call_id)
    timers = sum(not handle.cancelled() for handle in loop._scheduled)  # type: ignore[attr-defined]
    assert timers <= len(kept) + 1500 + 5  # not one per slot ever armed
    await asyncio.wait_for(holder.all_in.wait(), 5)
    assert set(holder.expired) == kept | set(range(1500, 3000))
    assert len(deadlines) == 0
