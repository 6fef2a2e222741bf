"""The async client's side of one connection: its calls in flight, their deadlines, its stream credit.

``ClientConnection`` is the ``Session`` a ``Link`` drives (bastion/transport/aio.py):
it turns the core's events into the answers of its calls -- a unary call's
bare future, or a ``Pending`` for a call with a stream -- and ``Client``
(bastion/client/aio.py) starts calls on it. ``Slots`` bounds the calls in
flight by the server's ``max_inflight``; a call gives its slot back when it
leaves the connection, however it ends. ``Deadlines`` fails the calls whose
own deadline passes, with one loop timer per slot of time, not per call.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import os
import socket
import weakref
from collections import deque
from collections.abc import AsyncGenerator, AsyncIterable, AsyncIterator, Iterable, Mapping
from typing import Any

import msgspec

from bastion._slots import Slots
from bastion.client._common import (
    COLLECTED_ITEM_COST,
    MAX_COLLECTED_BYTES,
    PingMeter,
    build_hello,
    collected_too_much,
    error_from,
    goaway_error,
)
from bastion.client.balancer import ReconnectBackoff
from bastion.exceptions import ConnectError, ConnectionClosed, UsageError, error_for_status
from bastion.protocol.connection import Connection, ProtocolLimits
from bastion.protocol.messages import Credit, Error, GoAway, Item, Message, Ping, Result, Welcome
from bastion.protocol.state import ConnectionState, Role
from bastion.security.tls import ALPN_PROTOCOL
from bastion.transport.aio import Link, translate_error

__all__ = [
    "NO_OPTIONS",
    "ONE_LOOP",
    "WRITE_HIGH_WATER",
    "CallOptions",
    "ClientClosed",
    "ClientConnection",
    "Deadlines",
    "Expired",
    "InFlight",
    "Pending",
    "Slots",
    "aiter_items",
    "cancel_unless_closed",
    "cancelling",
    "expire",
    "fail",
]

_OPEN = ConnectionState.OPEN
#: ``Future.set_result``, unbound: ``answer.set_result`` is a method lookup the interpreter does
#: not cache for a Future (it has an instance dict), once per answer.
_set_result = asyncio.Future.set_result


class ClientClosed(ConnectionClosed):
    """A call's connection was closed by ``Client.close``: never retried."""


class Pending:
    """The client-side state of a call with a stream either way (a unary call is a bare future).

    ``done`` is the call's answer: the Result's raw value -- or, for a call
    that ``collect``s the items it is sent (the unary form of a stream),
    the list of their raw values when any came. ``slot``: the call holds
    one of the connection's ``Slots``, given back when it ends.
    """

    __slots__ = ("collect", "collected", "credit", "done", "items", "slot", "waiter")

    def __init__(self, done: asyncio.Future[Any], *, slot: bool) -> None:
        self.done = done
        self.items: deque[msgspec.Raw] = deque()
        self.waiter: asyncio.Future[None] | None = None
        self.credit: asyncio.Event | None = None
        self.collect = False
        self.collected = 0  # what the items collected count against ``max_collected_bytes``
        self.slot = slot

    def wake(self) -> None:
        if self.waiter is not None and not self.waiter.done():
            self.waiter.set_result(None)

    def finish(self, value: Any) -> None:
        if not self.done.done():
            self.done.set_result(list(self.items) if self.collect and self.items else value)
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


#: The write buffer's high-water mark of a client's ``Link`` (its ``write_high_water``): output
#: queued past it is written at once, not at the end of the loop turn (``CallPath.call`` too).
WRITE_HIGH_WATER = 1 << 20

#: A call's options on the hot path (``CallPath.call_on``): its priority and its metadata.
CallOptions = tuple[int | None, dict[str, str] | None]
NO_OPTIONS: CallOptions = (None, None)

#: A call in flight, as its connection keeps it: a unary call's bare future
#: (its result is the Result's raw value), or a ``Pending``.
InFlight = asyncio.Future[Any] | Pending


#: What a client used from two event loops is told.
ONE_LOOP = "a Client belongs to the event loop it connected on (make one per event loop, or per thread)"


def cancel_unless_closed(future: asyncio.Future[Any] | None) -> None:
    """Cancel ``future`` (a task, say) unless its event loop has closed: nothing can run on that loop again."""
    if future is not None and not future.get_loop().is_closed():
        future.cancel()


def cancelling() -> int:
    """Whether the running task is being cancelled (a pending ``cancel()``), not just seeing another's."""
    task = asyncio.current_task()
    return task.cancelling() if task is not None else 0


def fail(call: InFlight, exc: BaseException) -> None:
    """End a call in flight with ``exc`` (unless it has ended)."""
    if isinstance(call, Pending):
        call.fail(exc)
    elif not call.done():
        call.set_exception(exc)
        call.exception()  # mark retrieved: its caller may be gone


def _holds_slot(call: InFlight) -> bool:
    return not isinstance(call, Pending) or call.slot


def expire(answer: asyncio.Future[Any]) -> None:
    """A call's deadline timer: fail its answer with ``Expired`` unless it has come."""
    if not answer.done():
        answer.set_exception(Expired())


#: Seconds per deadline slot: how late a call's own deadline may fire, at most.
DEADLINE_RESOLUTION = 0.01
_SWEEP_MIN = 1024  # deadline slots kept before the empty ones are looked for


class Deadlines:
    """The deadlines of one connection's calls, in slots of ``resolution`` seconds.

    A loop timer per call (``call_later``, then ``cancel`` when the answer
    comes first, which is nearly always) would be most of what a deadline
    costs. Instead calls are grouped by the slot their deadline falls in:
    arming a call adds its answer to its slot's dict and disarming removes
    it, both O(1), and one loop timer per slot -- started by the slot's
    first call, kept until it fires even if its calls all answer -- fails
    what is left with ``Expired``. A deadline therefore fires between 0 and
    ``resolution`` seconds late, never early. A slot kept for nothing costs a
    timer until then, which calls with timeouts spread over days would pile
    up: once there are many slots, the empty ones are dropped and their
    timers cancelled (``_sweep``, amortised O(1) per new slot). (The server's
    deadlines work the same way: bastion/server/deadlines.py.)
    """

    __slots__ = ("armed", "loop", "resolution", "sweep_at", "timers")

    def __init__(self, loop: asyncio.AbstractEventLoop, resolution: float = DEADLINE_RESOLUTION) -> None:
        self.loop = loop
        self.resolution = resolution
        #: slot number -> the answers whose deadline falls in it (a dict: ordered, O(1) removal)
        self.armed: dict[int, dict[asyncio.Future[Any], None]] = {}
        self.timers: dict[int, asyncio.TimerHandle] = {}  # each slot's
        self.sweep_at = _SWEEP_MIN

    def __len__(self) -> int:
        """Calls armed and not yet disarmed or expired."""
        return sum(len(answers) for answers in self.armed.values())

    def arm(self, answer: asyncio.Future[Any], timeout: float) -> int:
        """Fail ``answer`` with ``Expired`` ``timeout`` seconds from now (or a little later); its slot, to disarm."""
        slot = math.ceil((self.loop.time() + timeout) / self.resolution)
        answers = self.armed.get(slot)
        if answers is None:
            if len(self.armed) >= self.sweep_at:
                self._sweep()
            answers = self.armed[slot] = {}
            self.timers[slot] = self.loop.call_at(slot * self.resolution, self._fire, slot)
        answers[answer] = None
        return slot

    def disarm(self, slot: int, answer: asyncio.Future[Any]) -> None:
        """The call ended in time (or its slot fired already): forget it."""
        answers = self.armed.get(slot)
        if answers is not None:
            answers.pop(answer, None)

    def _sweep(self) -> None:
        """Drop the slots whose calls have all ended, and their timers; sweep again only once the
        slots have doubled, so each new slot pays O(1) for it."""
        armed, timers = self.armed, self.timers
        for slot in [slot for slot, answers in armed.items() if not answers]:
            del armed[slot]
            timers.pop(slot).cancel()
        self.sweep_at = max(_SWEEP_MIN, 2 * len(armed))

    def _fire(self, slot: int) -> None:
        self.timers.pop(slot, None)
        for answer in self.armed.pop(slot, ()):
            expire(answer)


class Expired(Exception):
    """A call's own deadline passed before its answer came (never the server's DEADLINE_EXCEEDED)."""


#: Every ClientConnection not yet collected: a forked child must not touch its parent's sockets.
_LIVE: weakref.WeakSet[ClientConnection] = weakref.WeakSet()


def _after_fork_in_child() -> None:
    for connection in list(_LIVE):
        connection.forget_after_fork()


os.register_at_fork(after_in_child=_after_fork_in_child)


class ClientConnection:
    """The client's side of one connection (a ``Session`` for ``Link``).

    ``pending`` maps each call in flight to its answer. A call holding one of
    the ``slots`` (every call but a server stream's) gives it back when it
    leaves ``pending``: answered, cancelled, or failed with the connection --
    the answers in one read give theirs back together.
    """

    def __init__(
        self, limits: ProtocolLimits, hello_token: str | None, name: str, max_collected: int = MAX_COLLECTED_BYTES
    ) -> None:
        self.core = Connection(Role.CLIENT, limits)
        #: The most a call collecting a server stream's items may take (``max_collected_bytes``).
        self.max_collected = max_collected
        self.limits = limits
        self.link: Link | None = None
        self.pending: dict[int, InFlight] = {}
        self.loop = asyncio.get_running_loop()
        self.welcome: asyncio.Future[Welcome] = self.loop.create_future()
        self.closed = False
        self.went_away = False  # the server sent GoAway (it is draining)
        #: Its event loop closed under it (``left_behind``): never lost, nor usable again.
        self.orphaned = False
        #: The server closed the connection in the handshake without sending a byte.
        self.closed_silently = False
        self.slots: Slots | None = None
        self.deadlines = Deadlines(self.loop)
        self._pings = PingMeter(self.loop.time)  # a flood is dropped (``_on_ping``)
        self._token = hello_token
        self._name = name
        self._shutdown_guard: AsyncGenerator[None, None] | None = self._close_at_loop_shutdown()
        with contextlib.suppress(StopIteration):  # run to its ``yield``, now: the loop takes note of it
            self._shutdown_guard.asend(None).send(None)
        _LIVE.add(self)

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
        pending = self.pending
        freed = 0  # slots the calls answered here held
        for event in events:
            if type(event) is Result:
                call = pending.pop(event.id, None)
                if call is None:
                    continue
                if type(call) is Pending:
                    freed += call.slot
                    call.finish(event.value)
                    continue
                freed += 1  # the usual answer: a unary call's bare future
                try:  # noqa: SIM105 - free when nothing is raised; suppress() is a context manager per answer
                    _set_result(call, event.value)  # type: ignore[arg-type]
                except asyncio.InvalidStateError:  # it expired, or its caller was cancelled
                    pass
                continue
            cls = type(event)
            if cls is Item:
                self._on_item(event)  # type: ignore[arg-type]
            elif cls is Error:
                call = pending.pop(event.id, None)  # type: ignore[union-attr]
                if call is not None:
                    freed += _holds_slot(call)
                    fail(call, error_from(event))  # type: ignore[arg-type]
            elif cls is Credit:
                call = pending.get(event.id)  # type: ignore[union-attr]
                if type(call) is Pending and call.credit is not None:
                    call.credit.set()
            elif cls is Welcome:
                self.slots = Slots(self.loop, event.max_inflight)  # type: ignore[union-attr]
                if not self.welcome.done():
                    self.welcome.set_result(event)  # type: ignore[arg-type]
            elif cls is GoAway:
                self._on_goaway(event)  # type: ignore[arg-type]
            elif cls is Ping:
                self._on_ping()
        if freed:
            self._release(freed)
            if self.went_away:  # drained once its last call is answered
                self._close_if_drained()

    def _on_item(self, item: Item) -> None:
        call = self.pending.get(item.id)
        if call is None:
            return
        if not isinstance(call, Pending):  # a unary call to a server stream: it collects the items
            call = self.pending[item.id] = Pending(call, slot=True)
            call.collect = True
        if call.collect:  # granted back at once, so bounded here: a stream that never ends must not
            call.collected += len(item.value) + COLLECTED_ITEM_COST
            if call.collected > self.max_collected:
                self.cancel(item.id)
                call.items.clear()
                call.fail(collected_too_much(self.max_collected))
                return
            self.grant(item.id, 1)
        call.items.append(item.value)
        call.wake()

    def _on_ping(self) -> None:
        """A Ping, its Pong queued by the core: past ``MAX_PINGS`` in ``PING_WINDOW`` seconds, drop the
        connection (a server that floods Pings and does not read the Pongs would grow them without end)."""
        flood = self._pings.received()
        if flood is not None and self.link is not None:
            self.core.data_to_send()  # the Pongs queued: never sent
            self.core.close()
            self.link.drop(flood)

    def _on_goaway(self, goaway: GoAway) -> None:
        if not self.welcome.done():
            exc = error_for_status(goaway.code, goaway.message or "handshake refused")
            self.welcome.set_exception(exc)
            return
        self.went_away = True
        for call_id in [i for i in self.pending if i > goaway.last_id]:
            fail(self._forget(call_id), goaway_error(goaway, call_id))  # type: ignore[arg-type]
        self._close_if_drained()

    def on_close(self, exc: BaseException | None) -> None:
        self.closed = True
        guard, self._shutdown_guard = self._shutdown_guard, None
        if guard is not None:  # closed now (it finds the connection closed), not when collected
            with contextlib.suppress(StopIteration):
                guard.aclose().send(None)
        error = translate_error(exc)
        if not self.welcome.done():
            self.closed_silently = self.link is not None and not self.link.received_any
            self.welcome.set_exception(ConnectError(f"handshake failed: {error}"))
            self.welcome.exception()  # marked retrieved: the attempt waiting for it may be gone (cancelled)
        calls = list(self.pending.values())
        self.pending.clear()
        for call in calls:
            fail(call, ConnectionClosed(str(error)))
        # Callers waiting for a slot get one, and find the connection closed.
        self._release(sum(_holds_slot(call) for call in calls))

    # -- event loops --------------------------------------------------------------------

    def check_loop(self) -> bool:
        """Whether this connection may serve the running event loop; UsageError if another loop, still
        open, holds it (a Client used from two threads' loops); False, and ``left_behind``, if its loop has
        closed (a Client kept from one ``asyncio.run`` to the next), so the caller opens another."""
        if self.loop is asyncio.get_running_loop():
            return True
        if not self.loop.is_closed():
            raise UsageError(f"this Client's connection belongs to another event loop, still running: {ONE_LOOP}")
        self.left_behind()
        return False

    async def _close_at_loop_shutdown(self) -> AsyncGenerator[None, None]:
        """Suspended at its ``yield`` while the connection is open, so that the event loop's asyncgen
        hooks hold it: ``loop.shutdown_asyncgens`` -- which ``asyncio.run`` and ``asyncio.Runner`` call
        before they close the loop -- closes it, and it closes the connection while the loop can still
        close its transport (a client nobody closed kept the socket until the garbage collector found it).
        """
        try:
            yield
        finally:
            self._shutdown_guard = None  # running: ``on_close`` must not close it again
            if not self.closed:
                self.orphaned = True  # not lost: a connection on the next loop owes no reconnect backoff
                self.abandon(ClientClosed("the event loop is shutting down"))
                if self.link is not None:
                    self.link.close()
                    # Unless closed already: a TLS close waits for the peer's close_notify, and a close
                    # waits for the peer to take what is queued; the loop is about to close.
                    self.link.abort()
                self.core.close()

    def left_behind(self) -> None:
        """Its event loop has closed: forget the connection, unused. Its transport was that loop's and
        cannot be closed now; shutting its socket down tells the server at once (the descriptor itself
        closes when it is collected). A loop closed by ``asyncio.run`` or ``asyncio.Runner`` leaves
        nothing behind (``_close_at_loop_shutdown``); one closed by hand, without
        ``loop.shutdown_asyncgens()`` first, does."""
        self.orphaned = self.closed = True
        self.core.close()
        self.pending.clear()
        sock = self.link.transport.get_extra_info("socket") if self.link and self.link.transport else None
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)

    def forget_after_fork(self) -> None:
        """In a forked child: forget the connection, and put a dead socket where the parent's was.

        The descriptor the child inherited is the parent's socket itself, and a child forked from a running
        loop also holds that loop's copy, with the socket registered in the epoll set both processes share:
        a GoAway or TLS close_notify the child's copy wrote as it closed (``asyncio.run``'s cleanup after a
        ``sys.exit``), or its removal of the socket from that set, broke the parent's connection. Under the
        same descriptor number the child now has a socket whose peer is gone: its copy of the loop reads an
        end of file there, writes reach no one, and removing it from the epoll set finds no entry (entries
        are kept per open socket), so the parent's stays. The child's calls open their own connection.
        """
        self.orphaned = self.closed = True
        self.pending.clear()
        sock = self.link.transport.get_extra_info("socket") if self.link and self.link.transport else None
        fd = sock.fileno() if sock is not None else -1
        if fd < 0:
            return
        dead, peer = socket.socketpair()
        with dead, peer, contextlib.suppress(OSError):
            os.dup2(dead.fileno(), fd, inheritable=False)

    # -- calls --------------------------------------------------------------------------

    @property
    def usable(self) -> bool:
        return not self.closed and self.core.state is _OPEN

    def start(
        self,
        method: str,
        args: dict[str, Any],
        timeout: float | None,
        stream: bool,
        options: Mapping[str, Any],
        *,
        slot: bool = False,
    ) -> tuple[int, Pending]:
        """Send a call (``args`` already checked by ``check_args``) with a ``Pending``; ``slot``: it holds one.

        ``options``: its ``priority`` and ``metadata``, if any.
        """
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
        pending = self.pending[call_id] = Pending(self.loop.create_future(), slot=slot)
        assert self.link is not None
        self.link.schedule_flush()
        return call_id, pending

    def cancel(self, call_id: int) -> None:
        self._forget(call_id)
        if self.core.send_cancel(call_id) and self.link is not None:
            self.link.schedule_flush()
        self._close_if_drained()

    def abandon(self, exc: BaseException) -> None:
        """Cancel every call in flight and fail it with ``exc`` (wakes whoever awaits it); calls
        waiting for a slot fail with it too, before the slots the cancels free could start them."""
        slots = self.slots
        if slots is not None and slots.waiters:
            waiters, slots.waiters = slots.waiters, deque()
            for waiter in waiters:
                if not waiter.done():
                    waiter.set_exception(exc)
        for call_id, call in list(self.pending.items()):
            self.cancel(call_id)
            fail(call, exc)

    def grant(self, call_id: int, n: int) -> None:
        if self.core.grant(call_id, n) and self.link is not None:
            self.link.schedule_flush()

    def _forget(self, call_id: int) -> InFlight | None:
        """Take a call out of ``pending``, giving back its slot."""
        call = self.pending.pop(call_id, None)
        if call is not None and _holds_slot(call):
            self._release(1)
        return call

    def _release(self, n: int) -> None:
        if self.slots is not None:
            self.slots.release(n)

    def _close_if_drained(self) -> None:
        """After a GoAway: close the connection once no call is left on it (the client will open no
        call on it again, and must not rely on the server to close it)."""
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


async def wait_to_reconnect(backoff: ReconnectBackoff, lost: ClientConnection | None) -> None:
    """Before connecting again: count ``lost`` (the connection that went, if any) against ``backoff``, unless it
    went away in good order (GoAway) or was left behind by a closed event loop; then wait out the backoff."""
    if lost is not None and not (lost.went_away or lost.orphaned):  # lost (or broken by a protocol error)
        backoff.on_lost()
    wait = backoff.delay()
    if wait > 0:
        await asyncio.sleep(wait)


async def aiter_items(items: AsyncIterable[Any] | Iterable[Any]) -> AsyncIterator[Any]:
    if isinstance(items, AsyncIterable):
        async for item in items:
            yield item
    else:
        for item in items:
            yield item
