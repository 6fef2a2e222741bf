"""In-flight slots: how many more calls a connection may have open (its ``max_inflight``).

The async client bounds its calls by the server's ``max_inflight`` with
these (bastion/client/_connection.py); the gateway's direct sessions bound
theirs the same way (bastion/server/direct.py).
"""

from __future__ import annotations

import asyncio
from collections import deque

from bastion.exceptions import DeadlineExceeded

__all__ = ["Slots"]


class Slots:
    """How many more calls the server lets this connection have open (its ``max_inflight``).

    ``asyncio.Semaphore`` without its per-acquire scan of waiters: a free slot
    is taken with no await at all, and a freed one goes to the longest waiter.
    """

    __slots__ = ("free", "loop", "waiters")

    def __init__(self, loop: asyncio.AbstractEventLoop, size: int) -> None:
        self.loop = loop
        self.free = size
        self.waiters: deque[asyncio.Future[None]] = deque()

    def try_acquire(self) -> bool:
        """Take a free slot now, if there is one and nobody waits for it."""
        if self.free > 0 and not self.waiters:
            self.free -= 1
            return True
        return False

    async def acquire(self, timeout: float | None = None) -> bool:
        """Take a slot, waiting in turn for one; False if none came within ``timeout`` seconds."""
        if self.try_acquire():
            return True
        waiter: asyncio.Future[None] = self.loop.create_future()
        self.waiters.append(waiter)
        timer = None if timeout is None else self.loop.call_later(max(0.0, timeout), _give_up, waiter)
        try:
            await waiter  # release hands its slot over by resolving this
        except _GaveUp:
            if waiter in self.waiters:  # (release skips a waiter that is done, dropping it)
                self.waiters.remove(waiter)
            return False
        except asyncio.CancelledError:
            if waiter.done() and not waiter.cancelled() and waiter.exception() is None:
                self.release()  # handed a slot as we were cancelled: pass it on
            elif waiter in self.waiters:  # (a release since the cancel may have dropped it already)
                self.waiters.remove(waiter)
            raise
        finally:
            if timer is not None:
                timer.cancel()
        return True

    async def acquire_within(self, timeout: float | None, what: str) -> float | None:
        """Take a slot, waiting in turn for one; what is left of ``timeout`` then.

        The wait is part of a call's time: if no slot comes within ``timeout``,
        DeadlineExceeded (naming ``what``), and the call is never sent.
        """
        if timeout is None:
            await self.acquire()
            return None
        waited_from = self.loop.time()
        if not await self.acquire(timeout):
            raise DeadlineExceeded(f"{what}: no free slot within {timeout}s (max_inflight calls in flight)")
        return max(0.0, timeout - (self.loop.time() - waited_from))

    def release(self, n: int = 1) -> None:
        """Give back ``n`` slots: to the longest waiters first, the rest become free."""
        waiters = self.waiters
        while n and waiters:
            waiter = waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)
                n -= 1
        self.free += n


class _GaveUp(Exception):
    """A waiter's ``timeout`` passed before a slot came to it."""


def _give_up(waiter: asyncio.Future[None]) -> None:
    if not waiter.done():
        waiter.set_exception(_GaveUp())
