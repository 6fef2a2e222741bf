"""The async client's side of one connection: its calls in flight, their deadlines, its stream credit.

``ClientConnection`` is the ``Session`` a ``Link`` drives (bastion/transport/aio.py):
it turns the core's events into the results of ``Pending`` calls, and
``Client`` (bastion/client/aio.py) starts calls on it. ``Slots`` bounds the
calls in flight by the server's ``max_inflight``.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import AsyncIterable, AsyncIterator, Iterable, Mapping
from typing import Any

import msgspec

from bastion.client._common import build_hello, error_from, goaway_error
from bastion.exceptions import ConnectError, ConnectionClosed, error_for_status
from bastion.protocol.connection import Connection, ProtocolLimits
from bastion.protocol.messages import Credit, Error, GoAway, Item, Message, Result, Welcome
from bastion.protocol.state import ConnectionState, Role
from bastion.security.tls import ALPN_PROTOCOL
from bastion.transport.aio import Link, translate_error

__all__ = ["ClientClosed", "ClientConnection", "Expired", "Pending", "Slots", "aiter_items"]

_OPEN = ConnectionState.OPEN


class ClientClosed(ConnectionClosed):
    """A call's connection was closed by ``Client.close``: never retried."""


class Pending:
    """One call's client-side state."""

    __slots__ = ("collect", "credit", "done", "items", "waiter")

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.done: asyncio.Future[Any] = loop.create_future()
        self.items: deque[msgspec.Raw] = deque()
        self.waiter: asyncio.Future[None] | None = None
        self.credit: asyncio.Event | None = None
        self.collect = False

    def wake(self) -> None:
        if self.waiter is not None and not self.waiter.done():
            self.waiter.set_result(None)

    def finish(self, value: Any) -> None:
        if not self.done.done():
            self.done.set_result(value)
        if self.waiter is not None:  # a stream reading items
            self.wake()
        if self.credit is not None:
            self.credit.set()

    def fail(self, exc: BaseException) -> None:
        if not self.done.done():
            self.done.set_exception(exc)
            self.done.exception()  # mark retrieved: a stream may never look
        self.wake()
        if self.credit is not None:
            self.credit.set()

    def expire(self) -> None:
        """The call's deadline timer: fail it with ``Expired`` unless it has ended."""
        self.fail(Expired())


class Expired(Exception):
    """A call's own deadline passed before its answer came (never the server's DEADLINE_EXCEEDED)."""


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

    async def acquire(self) -> None:
        if self.try_acquire():
            return
        waiter: asyncio.Future[None] = self.loop.create_future()
        self.waiters.append(waiter)
        try:
            await waiter  # release hands its slot over by resolving this
        except asyncio.CancelledError:
            if waiter.done() and not waiter.cancelled():
                self.release()  # handed a slot as we were cancelled: pass it on
            else:
                self.waiters.remove(waiter)
            raise

    def release(self) -> None:
        while self.waiters:
            waiter = self.waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)
                return
        self.free += 1


class ClientConnection:
    """The client's side of one connection (a ``Session`` for ``Link``)."""

    def __init__(self, limits: ProtocolLimits, hello_token: str | None, name: str) -> None:
        self.core = Connection(Role.CLIENT, limits)
        self.limits = limits
        self.link: Link | None = None
        self.pending: dict[int, Pending] = {}
        self.loop = asyncio.get_running_loop()
        self.welcome: asyncio.Future[Welcome] = self.loop.create_future()
        self.closed = False
        self.went_away = False  # the server sent GoAway (it is draining)
        #: The server closed the connection in the handshake without sending a byte.
        self.closed_silently = False
        self.slots: Slots | None = None
        self._token = hello_token
        self._name = name

    # -- Session ----------------------------------------------------------------------

    def on_connect(self, link: Link) -> None:
        self.link = link
        if link.ssl_object is not None and link.alpn != ALPN_PROTOCOL:
            if not self.welcome.done():
                self.welcome.set_exception(ConnectError(f"the server did not agree to ALPN {ALPN_PROTOCOL}"))
            link.abort()
            return
        self.core.send_hello(build_hello(self.limits, self._token, self._name))
        self._token = None
        link.flush()

    def on_events(self, events: list[Message]) -> None:
        for event in events:
            cls = type(event)
            if cls is Result:
                pending = self.pending.pop(event.id, None)  # type: ignore[union-attr]
                if pending is not None:
                    pending.finish(event.value)  # type: ignore[union-attr]
            elif cls is Item:
                pending = self.pending.get(event.id)  # type: ignore[union-attr]
                if pending is not None:
                    pending.items.append(event.value)  # type: ignore[union-attr]
                    if pending.collect:
                        self.grant(event.id, 1)  # type: ignore[union-attr]
                    pending.wake()
            elif cls is Error:
                pending = self.pending.pop(event.id, None)  # type: ignore[union-attr]
                if pending is not None:
                    pending.fail(error_from(event))  # type: ignore[arg-type]
            elif cls is Credit:
                pending = self.pending.get(event.id)  # type: ignore[union-attr]
                if pending is not None and pending.credit is not None:
                    pending.credit.set()
            elif cls is Welcome:
                self.slots = Slots(self.loop, event.max_inflight)  # type: ignore[union-attr]
                if not self.welcome.done():
                    self.welcome.set_result(event)  # type: ignore[arg-type]
            elif cls is GoAway:
                self._on_goaway(event)  # type: ignore[arg-type]

    def _on_goaway(self, goaway: GoAway) -> None:
        if not self.welcome.done():
            exc = error_for_status(goaway.code, goaway.message or "handshake refused")
            self.welcome.set_exception(exc)
            return
        self.went_away = True
        for call_id in [i for i in self.pending if i > goaway.last_id]:
            self.pending.pop(call_id).fail(goaway_error(goaway, call_id))
        if not self.pending and self.link is not None:
            self.link.close()

    def on_close(self, exc: BaseException | None) -> None:
        self.closed = True
        error = translate_error(exc)
        if not self.welcome.done():
            self.closed_silently = self.link is not None and not self.link.received_any
            self.welcome.set_exception(ConnectError(f"handshake failed: {error}"))
        for pending in self.pending.values():
            pending.fail(ConnectionClosed(str(error)))
        self.pending.clear()

    # -- calls --------------------------------------------------------------------------

    @property
    def usable(self) -> bool:
        return not self.closed and self.core.state is _OPEN

    def start(
        self, method: str, args: dict[str, Any], timeout: float | None, stream: bool, options: Mapping[str, Any]
    ) -> tuple[int, Pending]:
        """Send a call (``args`` already checked by ``check_args``)."""
        if self.closed or self.core.state is not _OPEN:  # not self.usable
            raise ConnectionClosed("connection is closed or draining")
        timeout_ms = max(1, int(timeout * 1000)) if timeout is not None else None
        call_id = self.core.send_call(
            method,
            args,
            timeout_ms=timeout_ms,
            stream=stream,
            priority=options.get("priority"),
            metadata=options.get("metadata"),
        )
        pending = self.pending[call_id] = Pending(self.loop)
        assert self.link is not None
        self.link.schedule_flush()
        return call_id, pending

    def cancel(self, call_id: int) -> None:
        self.pending.pop(call_id, None)
        if self.core.send_cancel(call_id) and self.link is not None:
            self.link.schedule_flush()
        self._close_if_drained()

    def grant(self, call_id: int, n: int) -> None:
        if self.core.grant(call_id, n) and self.link is not None:
            self.link.schedule_flush()

    def _close_if_drained(self) -> None:
        if self.core.state is ConnectionState.DRAINING and not self.pending and self.link is not None:
            self.link.close()

    def start_sender(
        self, call_id: int, pending: Pending, items: AsyncIterable[Any] | Iterable[Any]
    ) -> asyncio.Future[None]:
        """Send ``items`` in the background; if iterating them raises, the call fails with that error."""
        sender = asyncio.ensure_future(self.send_items(call_id, pending, items))

        def done(task: asyncio.Future[None]) -> None:
            error = None if task.cancelled() else task.exception()
            if error is not None:
                self.cancel(call_id)
                pending.fail(error)

        sender.add_done_callback(done)
        return sender

    async def send_items(self, call_id: int, pending: Pending, items: AsyncIterable[Any] | Iterable[Any]) -> None:
        assert self.link is not None
        pending.credit = asyncio.Event()
        async for item in aiter_items(items):
            while self.core.send_credit(call_id) <= 0:
                if pending.done.done():
                    return
                pending.credit.clear()
                await pending.credit.wait()
            if not self.core.send_item(call_id, item):
                return
            if self.link.writing_paused:
                self.link.flush()
                await self.link.drain()
            else:
                self.link.schedule_flush()
        if self.core.send_end(call_id):
            self.link.schedule_flush()


async def aiter_items(items: AsyncIterable[Any] | Iterable[Any]) -> AsyncIterator[Any]:
    if isinstance(items, AsyncIterable):
        async for item in items:
            yield item
    else:
        for item in items:
            yield item
