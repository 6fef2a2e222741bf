"""The built-in services, written with the public service API only.

``admin`` and ``auth`` are plain services. ``kv``, ``files``, ``jobs`` and
the backups behind ``admin.backup`` are *components*: a service plus the
background work it needs (expiry sweeps, job runners, scheduled backups),
started after the store opens and closed before it closes.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable, Coroutine, Iterable
from typing import Any, Protocol

from bastion.exceptions import CallError
from bastion.service import Service
from bastion.store._access import Notifying

__all__ = ["Background", "Component", "HostedComponent", "every", "on_wakeup"]


class Component(Protocol):
    """Background work with a lifecycle; ``bastion serve`` drives it."""

    async def start(self) -> None:
        """Start background work; called once the store is open."""

    async def aclose(self) -> None:
        """Stop background work; idempotent; called before the store closes."""


class HostedComponent(Component, Protocol):
    """A component that is also a service."""

    @property
    def service(self) -> Service: ...


class Background:
    """A component's background tasks and its store notifications, started and stopped together.

    ``start`` listens on the store's ``channel`` (other processes' changes:
    ``on_notify``) and starts one task per ``(name, coroutine function)``;
    ``stop`` stops listening, then cancels the tasks and waits for them.
    """

    def __init__(self) -> None:
        self._tasks: list[asyncio.Task[None]] = []
        self._unlisten: Callable[[], Awaitable[None]] | None = None

    async def start(
        self,
        store: Notifying,
        channel: str,
        on_notify: Callable[[], None],
        work: Iterable[tuple[str, Callable[[], Coroutine[Any, Any, None]]]],
    ) -> None:
        if self._tasks:
            return
        self._unlisten = await store.listen(channel, on_notify)
        self._tasks = [asyncio.create_task(run(), name=name) for name, run in work]

    async def stop(self) -> None:
        unlisten, self._unlisten = self._unlisten, None
        if unlisten is not None:
            await unlisten()
        tasks, self._tasks = self._tasks, []
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task


async def on_wakeup(
    wakeup: asyncio.Event, interval: float, step: Callable[[], Awaitable[object]], log: logging.Logger, what: str
) -> None:
    """Run ``step`` whenever ``wakeup`` is set, and at least every ``interval`` seconds (a poll), forever.

    A store that fails (``CallError``) is logged and tried again at the next wakeup or poll.
    """
    while True:
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(interval):
                await wakeup.wait()
        wakeup.clear()
        try:
            await step()
        except CallError as exc:
            log.warning("%s: %s", what, exc.message)


async def every(interval: float, step: Callable[[], Awaitable[object]], log: logging.Logger, what: str) -> None:
    """Run ``step`` every ``interval`` seconds, forever; a ``CallError`` is logged and the next run goes ahead."""
    while True:
        await asyncio.sleep(interval)
        try:
            await step()
        except CallError as exc:
            log.warning("%s: %s", what, exc.message)
