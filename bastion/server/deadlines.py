"""Call deadlines for a whole server, in slots of ``RESOLUTION`` seconds.

A loop timer per call (``call_at``, then ``cancel`` when the handler
answers first, which is nearly always) is most of what a deadline costs on a
busy server. ``Deadlines`` groups calls by the slot their deadline falls in:
arming a call adds it to its slot's dict and disarming removes it, both
O(1), and one loop timer per slot -- started by the slot's first call, kept
until it fires even if its calls all answer -- expires what is left. A
deadline therefore fires between 0 and ``RESOLUTION`` seconds late, never
early. A slot kept for nothing costs a timer until then, which a caller
spreading its timeouts over days would pile up (any ``timeout_ms`` is
valid): once there are many slots, the empty ones are dropped and their
timers cancelled (``_sweep``, amortised O(1) per new slot).

Deadlines are on ``time.monotonic``'s clock, as the session and the scheduler
keep them, so arming a call reads no clock; a slot's timer is set on the
loop's clock when the slot is made, and one that comes early by
``time.monotonic`` (uvloop's clock counts milliseconds, read once a loop
turn) waits out the rest.
"""

from __future__ import annotations

import asyncio
import math
import time
from typing import Protocol

__all__ = ["RESOLUTION", "Deadlines", "Expirable"]

#: Seconds per slot: how late a deadline may fire at most.
RESOLUTION = 0.01
_SWEEP_MIN = 1024  # slots kept before the empty ones are looked for


class Expirable(Protocol):
    """What holds calls with deadlines (a session)."""

    def _expire(self, call_id: int) -> None: ...


class Deadlines:
    """The armed deadlines of one event loop's calls."""

    def __init__(self, resolution: float = RESOLUTION) -> None:
        self.resolution = resolution
        self._slots: dict[int, dict[tuple[Expirable, int], None]] = {}
        self._timers: dict[int, asyncio.TimerHandle] = {}  # each slot's
        self._sweep_at = _SWEEP_MIN

    def __len__(self) -> int:
        """Calls armed and not yet disarmed or expired."""
        return sum(len(calls) for calls in self._slots.values())

    def arm(self, loop: asyncio.AbstractEventLoop, when: float, holder: Expirable, call_id: int) -> int:
        """Expire ``holder``'s call ``call_id`` at ``when`` (``time.monotonic``, the calls' deadlines'
        clock) or a little later; its slot, to disarm. The slot's loop timer is set on ``loop``'s clock
        when the slot is made: a call pays no clock reading of its own."""
        slot = math.ceil(when / self.resolution)
        calls = self._slots.get(slot)
        if calls is None:
            if len(self._slots) >= self._sweep_at:
                self._sweep()
            calls = self._slots[slot] = {}
            at = loop.time() + (slot * self.resolution - time.monotonic())
            self._timers[slot] = loop.call_at(at, self._fire, slot, loop)
        calls[holder, call_id] = None
        return slot

    def disarm(self, slot: int, holder: Expirable, call_id: int) -> None:
        """The call ended in time (or was never armed in ``slot``): forget it."""
        calls = self._slots.get(slot)
        if calls is not None:
            calls.pop((holder, call_id), None)

    def _sweep(self) -> None:
        """Drop the slots whose calls have all answered, and their timers; sweep again only once
        the slots have doubled, so each new slot pays O(1) for it."""
        slots, timers = self._slots, self._timers
        for slot in [slot for slot, calls in slots.items() if not calls]:
            del slots[slot]
            timers.pop(slot).cancel()
        self._sweep_at = max(_SWEEP_MIN, 2 * len(slots))

    def _fire(self, slot: int, loop: asyncio.AbstractEventLoop) -> None:
        left = slot * self.resolution - time.monotonic()
        if left > 0:  # early by time.monotonic: uvloop's clock is in milliseconds, read once a loop turn;
            # a millisecond more, or uvloop rounds a shorter wait to none and the loop spins until then
            self._timers[slot] = loop.call_at(loop.time() + left + 0.001, self._fire, slot, loop)
            return
        self._timers.pop(slot, None)
        for holder, call_id in self._slots.pop(slot, {}):
            holder._expire(call_id)
