"""bastion.server.deadlines: many call deadlines in 10 ms slots, never early."""

from __future__ import annotations

import asyncio

from bastion.server.deadlines import RESOLUTION, Deadlines


class Holder:
    def __init__(self, loop: asyncio.AbstractEventLoop, expect: int) -> None:
        self.loop = loop
        self.expired: dict[int, float] = {}
        self.expect = expect
        self.all_in = asyncio.Event()

    def _expire(self, call_id: int) -> None:
        self.expired[call_id] = self.loop.time()
        if len(self.expired) >= self.expect:
            self.all_in.set()


async def test_a_deadline_fires_at_or_after_it_never_before() -> None:
    loop = asyncio.get_running_loop()
    deadlines, holder = Deadlines(), Holder(loop, expect=5)
    start = loop.time()
    whens = {call_id: start + 0.02 + call_id * 0.013 for call_id in range(1, 6)}
    for call_id, when in whens.items():
        deadlines.arm(loop, when, holder, call_id)
    assert len(deadlines) == 5
    await asyncio.wait_for(holder.all_in.wait(), 5)
    assert set(holder.expired) == set(whens)
    for call_id, fired in holder.expired.items():
        # uvloop's clock has millisecond resolution: allow one tick early.
        assert whens[call_id] - 0.0011 <= fired <= whens[call_id] + RESOLUTION + 0.05
    assert len(deadlines) == 0


async def test_a_disarmed_call_is_never_expired_and_others_in_its_slot_still_are() -> None:
    loop = asyncio.get_running_loop()
    deadlines, holder = Deadlines(), Holder(loop, expect=1)
    when = loop.time() + 0.03
    slot = deadlines.arm(loop, when, holder, 1)
    assert deadlines.arm(loop, when, holder, 2) == slot  # one slot, one loop timer
    deadlines.disarm(slot, holder, 1)
    deadlines.disarm(slot, holder, 99)  # never armed: nothing happens
    await asyncio.wait_for(holder.all_in.wait(), 5)
    # The slot fired once, for both: call 1 was not in it any more, and nothing is left to fire.
    assert set(holder.expired) == {2}
    assert len(deadlines) == 0
