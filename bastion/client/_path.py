"""The async client's usual call, read off ``Client.__getattr__``'s slow path (``CallPath``).

``Client`` defines ``__getattr__`` (its service proxies), which puts every
attribute lookup on a client on CPython's slow path. The usual call -- one
server, its connection open -- reads the client at most once and everything
else from here: a single-server client's ``call`` is ``CallPath.call``
itself, one coroutine that plans the call's retries (``Retry``), sends it and
awaits its answer, and hands over to ``Client._retrying`` only if it fails.
Other calls (``invoke``, a balanced client's) make their first attempt with
``CallPath.call_on``.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterable, Coroutine, Iterable
from typing import TYPE_CHECKING, Any

import msgspec

from bastion.client._common import DECODER, VALUE_ERRORS, bad_value
from bastion.client._connection import NO_OPTIONS, WRITE_HIGH_WATER, CallOptions, ClientConnection, Expired, Slots
from bastion.client.policy import RetryBudget, RetryPolicy, is_replayable
from bastion.exceptions import CallError, ConnectionClosed, DeadlineExceeded
from bastion.protocol.state import ConnectionState
from bastion.transport.aio import Link

if TYPE_CHECKING:
    from bastion.client.aio import Client

__all__ = ["PLAIN_RETRY", "CallPath", "Retry", "RetryWaits", "start_in_turn"]

_OPEN = ConnectionState.OPEN
_decode = DECODER.decode
#: A unary call's answer: ``asyncio.Future()``, which takes the running loop itself, costs half what
#: ``loop.create_future()`` does (uvloop's passes the loop by keyword); the loops bastion runs on
#: (asyncio's, uvloop) make that same C Future either way.
_Future = asyncio.Future


class Retry(msgspec.Struct, frozen=True, gc=False):
    """What a call's retries need to know: whether it is idempotent (None: ask), and its deadline.

    (A Struct: one is made per call, in C.)
    """

    idempotent: bool | None
    deadline: float | None


#: The plan of the usual call (no deadline, idempotent if the server says so), made once: it is frozen.
PLAIN_RETRY = Retry(None, None)


class CallPath:
    """A client's usual call, and what it reads of the client, where reading it is fast.

    ``Client`` defines ``__getattr__`` (its service proxies), which puts every
    attribute lookup on a client -- its methods' too -- on CPython's slow
    path: a few hundred instructions each, thousands per call. So the usual
    call reads the client once (``client._path``) and everything else from
    here, a class with slots: the client's timeout, retry policy and budget
    live here (the client's properties of those names read and write them),
    and so does a single-server client's connection.
    """

    __slots__ = ("budget", "client", "conn", "own_attempt", "retry", "timeout")

    def __init__(self, client: Client) -> None:
        self.client = client
        self.conn: ClientConnection | None = None  # never set on a balanced client
        self.timeout: float | None = None
        self.retry: RetryPolicy | None = None
        self.budget: RetryBudget | None = None
        #: Whether ``_attempt`` is the client class's own (see ``Client._own_attempt``).
        self.own_attempt = type(client)._own_attempt

    def invoke(
        self,
        method: str,
        checked: dict[str, Any],
        timeout: float | None,
        options: CallOptions,
        items: AsyncIterable[Any] | Iterable[Any] | None,
        idempotent: bool | None,
    ) -> Coroutine[Any, Any, Any]:
        """``Client.invoke``, its arguments checked: the call's coroutine, its attempts retried as the policy allows.

        The usual call -- retries on, one server, its connection open -- is one
        coroutine: its first attempt (``call_on``), which hands over to the
        retry loop (``Client._retrying``) only if it fails.
        """
        retry, budget = self.retry, self.budget
        if retry is None or budget is None or not (items is None or is_replayable(items)):
            return self.client._attempt(method, checked, timeout, timeout, options, items, [])
        budget.requests += 1  # budget.on_request(), inline: one method call fewer per call
        if timeout is None and idempotent is None:
            plan = PLAIN_RETRY
        else:
            plan = Retry(idempotent, None if timeout is None else retry.clock() + timeout)
        conn = self.conn
        if conn is not None and conn.core.state is _OPEN and not conn.closed:  # conn.usable, without the call
            if self.own_attempt:  # what _attempt does here
                return self.call_on(conn, method, checked, timeout, timeout, options, items, plan)
            return self.client._attempt(method, checked, timeout, timeout, options, items, [], plan)
        return self.client._retrying(method, checked, timeout, options, items, plan, None)

    async def call(self, method: str, /, **args: Any) -> Any:
        """``Client.call`` on a single-server client: the call's one coroutine (see ``Client._init_state``).

        On an open connection, ``invoke``'s usual case, and ``call_on``'s
        steps for a unary call with no options, inline: the call sent in a
        free slot, its answer awaited and decoded, in this one coroutine;
        ``Client._retrying`` takes over only if it fails. Otherwise (no
        connection yet, or it closed) ``invoke``, which connects.
        """
        # Keyword arguments are a fresh dict with str keys: nothing for check_args to do.
        conn = self.conn
        timeout = self.timeout
        if conn is None or (core := conn.core).state is not _OPEN:
            return await self.invoke(method, args, timeout, NO_OPTIONS, None, None)
        retry, budget = self.retry, self.budget
        if retry is None or budget is None:
            plan = None
        else:
            budget.requests += 1  # budget.on_request(), inline
            plan = PLAIN_RETRY if timeout is None else Retry(None, retry.clock() + timeout)
        try:
            slots: Slots = conn.slots  # type: ignore[assignment]  # open: the Welcome came
            if slots.free > 0:  # slots.try_acquire(), without the call (a slot is never free while others wait)
                call_id = core.send_call(method, args, None if timeout is None else max(1, int(timeout * 1000)))
                slots.free -= 1  # taken once the call is sent: a call too large to send takes none
                answer = conn.pending[call_id] = _Future()  # of the running loop: conn.loop, as calls run on it
                link: Link = conn.link  # type: ignore[assignment]  # open, so connected
                # ``link.schedule_flush()``, called only when it has something to do: the first call
                # of a loop turn schedules the flush its others share, and, past the link's
                # high-water mark, a call writes what is queued at once.
                if not link.flush_scheduled or len(core.output.buffer) >= WRITE_HIGH_WATER:
                    link.schedule_flush()
                left = timeout
            else:
                call_id, answer, _, left = await start_in_turn(conn, method, args, timeout, NO_OPTIONS, None)
            if left is None:
                try:
                    raw = await answer
                except asyncio.CancelledError:
                    conn.cancel(call_id)
                    raise
            else:
                slot = conn.deadlines.arm(answer, left)
                try:
                    raw = await answer
                except Expired:
                    conn.cancel(call_id)
                    raise DeadlineExceeded(f"{method}: no answer within {timeout}s") from None
                except asyncio.CancelledError:
                    conn.cancel(call_id)
                    raise
                finally:
                    conn.deadlines.disarm(slot, answer)
        except (CallError, ConnectionClosed) as exc:
            if plan is None:
                raise
            failure = exc
        except RuntimeError:  # "Event loop is closed": the connection is a closed loop's (free unless raised)
            if conn.check_loop():
                raise
            return await self.invoke(method, args, timeout, NO_OPTIONS, None, None)  # on a connection of this loop
        else:
            try:  # free unless it raises: no check per answer
                if type(raw) is list:  # a stream's items, collected
                    return [_decode(r) for r in raw]
                return _decode(raw)
            except VALUE_ERRORS as exc:
                raise bad_value(method, exc) from None
        return await self.client._retrying(method, args, timeout, NO_OPTIONS, None, plan, failure)

    async def call_on(
        self,
        conn: ClientConnection,
        method: str,
        args: dict[str, Any],
        timeout: float | None,
        total: float | None,
        options: CallOptions,
        items: AsyncIterable[Any] | Iterable[Any] | None,
        retry: Retry | None = None,
    ) -> Any:
        """One attempt at a call on ``conn``; with ``retry``, a call's first, which ``_retrying`` continues if it fails.

        A unary call's answer is a bare future, awaited right here. Its
        deadline is armed in the connection's ``Deadlines``, which fail it
        (``Expired``) if it is still waiting then: no loop timer, nor
        ``asyncio.timeout``, per call. The call's slot is given back by the
        connection, when the call leaves it.

        ``CallPath.call`` repeats these steps for the plain call (no options, no
        items), inline in its own coroutine rather than handing over to this one:
        a coroutine and a call fewer on every call. Keep the two in step.
        """
        try:
            core = conn.core
            if core.state is not _OPEN:  # not conn.usable (closed: the core is closed too)
                raise ConnectionClosed("connection is closed or draining")
            slots: Slots = conn.slots  # type: ignore[assignment]  # open: the Welcome came
            if items is None and slots.free > 0 and not slots.waiters:
                # The usual start, inline: the call sent in a free slot (not slots.try_acquire(), without
                # the call), its answer a bare future in ``pending``, no ``Pending`` and no await.
                priority, metadata = options
                call_id = core.send_call(
                    method, args, None if timeout is None else max(1, int(timeout * 1000)), priority, False, metadata
                )
                slots.free -= 1  # taken once the call is sent: a call too large to send takes none
                answer = conn.pending[call_id] = _Future()
                conn.link.schedule_flush()  # type: ignore[union-attr]  # open, so connected
                sender = None
            else:
                call_id, answer, sender, timeout = await start_in_turn(conn, method, args, timeout, options, items)
            slot = conn.deadlines.arm(answer, timeout) if timeout is not None else None
            try:
                raw = await answer
            except Expired:
                conn.cancel(call_id)
                raise DeadlineExceeded(f"{method}: no answer within {total}s") from None
            except asyncio.CancelledError:
                conn.cancel(call_id)
                raise
            finally:
                if slot is not None:
                    conn.deadlines.disarm(slot, answer)
                if sender is not None:
                    sender.cancel()
        except (CallError, ConnectionClosed) as exc:
            if retry is None:
                raise
            failure = exc
        except RuntimeError:  # as in ``call``: the connection may be a closed event loop's
            if conn.check_loop():
                raise
            if retry is None:
                return await self.client._attempt_on_endpoint(method, args, timeout, total, options, items, [])
            return await self.client._retrying(method, args, total, options, items, retry, None)
        else:
            try:  # free unless it raises: no check per answer
                if type(raw) is list:  # a stream's items, collected
                    return [_decode(r) for r in raw]
                return _decode(raw)
            except VALUE_ERRORS as exc:
                raise bad_value(method, exc) from None
        return await self.client._retrying(method, args, total, options, items, retry, failure)


async def start_in_turn(
    conn: ClientConnection,
    method: str,
    args: dict[str, Any],
    timeout: float | None,
    options: CallOptions,
    items: AsyncIterable[Any] | Iterable[Any] | None,
) -> tuple[int, asyncio.Future[Any], asyncio.Future[None] | None, float | None]:
    """``CallPath.call_on``'s start when its usual one cannot: a call with an input stream, or no slot free.

    Takes a slot, waiting its turn for one, then starts the call (and
    the sender of ``items``); the call's id, its answer, its sender and
    what is left of ``timeout``. The wait counts against ``timeout``: a
    call that gets no slot within it fails with DeadlineExceeded, unsent,
    and one that does is sent, and armed, with only the rest.
    """
    slots = conn.slots
    if slots is not None and not slots.try_acquire():
        timeout = await slots.acquire_within(timeout, method)  # what is left of it goes to the server
    try:
        priority, metadata = options
        call_id, pending = conn.start(
            method, args, timeout, items is not None, {"priority": priority, "metadata": metadata}, slot=True
        )
        pending.collect = True  # stream items are granted back as they arrive
        sender = conn.start_sender(call_id, pending, items) if items is not None else None
        return call_id, pending.done, sender, timeout
    except BaseException:
        if slots is not None:
            slots.release()  # the call never started: its slot is still ours
        raise


class RetryWaits:
    """The waits of a client's calls before their retries: ``Client.close`` ends them (``interrupt``), or a
    call that had waited would open a new connection on the closed client and carry on. ``interrupts`` counts
    the closes, so a call retrying at once (no wait) sees one that came since its retry loop began."""

    def __init__(self) -> None:
        self._waiting: set[asyncio.Future[None]] = set()
        self.interrupts = 0  # how many times ``interrupt`` came: a call compares it before each retry

    async def sleep(self, delay: float) -> bool:
        """Wait ``delay`` seconds; True if ``interrupt`` ended the wait."""
        waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiting.add(waiter)
        try:
            await asyncio.wait([waiter], timeout=delay)
        finally:
            self._waiting.discard(waiter)
        return waiter.done()

    def interrupt(self) -> None:
        self.interrupts += 1
        for waiter in self._waiting:
            if not waiter.done() and not waiter.get_loop().is_closed():
                waiter.set_result(None)
