"""The async client: one multiplexed connection, many calls in flight.

Theory of operation. ``Client`` opens one connection lazily and reuses it for
every call; if the server sends GoAway, calls already accepted finish on the
old connection and the next call opens a new one. Each call is a ``_Pending``
keyed by call id: unary calls wait on one future; streams read items from a
small queue, returning credit to the server as they consume. The client
sends the call's remaining time as ``timeout_ms`` and also enforces it
locally, cancelling the call on the server when it runs out.

Retries (``bastion.client.policy``). ``invoke`` tries a call again only when
it fails retryably and is known idempotent -- ``idempotent=True``, or the
server's ``admin.methods`` listing, fetched once per connection on the first
such failure -- within the call's one deadline and the client's retry
budget; a call the server's GoAway proves never started is replayed once on
a new connection. Streams (``stream``) and one-shot input iterators are
never retried.
"""

from __future__ import annotations

import asyncio
import ssl
from collections import deque
from collections.abc import AsyncIterable, AsyncIterator, Awaitable, Callable, Iterable, Mapping
from typing import Any

import msgspec

from bastion.client._common import (
    ServiceProxy,
    build_hello,
    check_args,
    decode_value,
    error_from,
    goaway_error,
    silent_close_hint,
)
from bastion.client.base import ClientBase
from bastion.client.policy import (
    LISTING_METHOD,
    LISTING_TIMEOUT,
    IdempotentMethods,
    is_replayable,
)
from bastion.exceptions import CallError, ConnectError, ConnectionClosed, DeadlineExceeded, error_for_status
from bastion.protocol.connection import Connection, ProtocolLimits
from bastion.protocol.messages import Credit, Error, GoAway, Item, Message, Result, Welcome
from bastion.protocol.state import ConnectionState, Role
from bastion.security.tls import ALPN_PROTOCOL
from bastion.transport.aio import Link, translate_error
from bastion.transport.tls_errors import describe_tls_error

__all__ = ["Client"]

_END = object()


class _Pending:
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


class _ClientConnection:
    """The client's side of one connection (a ``Session`` for ``Link``)."""

    def __init__(self, limits: ProtocolLimits, hello_token: str | None, name: str) -> None:
        self.core = Connection(Role.CLIENT, limits)
        self.limits = limits
        self.link: Link | None = None
        self.pending: dict[int, _Pending] = {}
        self.loop = asyncio.get_running_loop()
        self.welcome: asyncio.Future[Welcome] = self.loop.create_future()
        self.closed = False
        #: The server closed the connection in the handshake without sending a byte.
        self.closed_silently = False
        self.slots: asyncio.Semaphore | None = None
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
                self.slots = asyncio.Semaphore(event.max_inflight)  # type: ignore[union-attr]
                if not self.welcome.done():
                    self.welcome.set_result(event)  # type: ignore[arg-type]
            elif cls is GoAway:
                self._on_goaway(event)  # type: ignore[arg-type]

    def _on_goaway(self, goaway: GoAway) -> None:
        if not self.welcome.done():
            exc = error_for_status(goaway.code, goaway.message or "handshake refused")
            self.welcome.set_exception(exc)
            return
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
        return not self.closed and self.core.state is ConnectionState.OPEN

    def start(
        self, method: str, args: dict[str, Any], timeout: float | None, stream: bool, options: Mapping[str, Any]
    ) -> tuple[int, _Pending]:
        """Send a call (``args`` already checked by ``check_args``)."""
        if not self.usable:
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
        pending = self.pending[call_id] = _Pending(self.loop)
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
        self, call_id: int, pending: _Pending, items: AsyncIterable[Any] | Iterable[Any]
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

    async def send_items(self, call_id: int, pending: _Pending, items: AsyncIterable[Any] | Iterable[Any]) -> None:
        assert self.link is not None
        pending.credit = asyncio.Event()
        async for item in _aiter(items):
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


async def _aiter(items: AsyncIterable[Any] | Iterable[Any]) -> AsyncIterator[Any]:
    if isinstance(items, AsyncIterable):
        async for item in items:
            yield item
    else:
        for item in items:
            yield item


class Client(ClientBase):
    """An async bastion client.

    ``Client("host:port", token=..., timeout=...)``; use as ``async with`` or
    call ``close()``. Calls: ``await client.call("svc.method", a=1)`` or
    ``await client.svc.method(a=1)``; server streams: ``async for x in
    client.stream("svc.method", ...)``; client streams: ``await
    client.upload("svc.method", items, ...)``. Settings: see ``ClientBase``.
    """

    def _post_init(self) -> None:
        self._conn: _ClientConnection | None = None
        self._lock: asyncio.Lock | None = None
        # Seam for bastion.testing: given the protocol factory, connect it to
        # something other than a TCP socket (an in-memory server, say).
        self._connector: Callable[[Callable[[], Link]], Awaitable[object]] | None = None
        self._listing: asyncio.Future[None] | None = None

    async def __aenter__(self) -> Client:
        await self.connect()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    def __getattr__(self, name: str) -> ServiceProxy[Client]:
        if name.startswith("_"):
            raise AttributeError(name)
        return ServiceProxy(self, name)

    # -- connection ---------------------------------------------------------------

    async def connect(self) -> None:
        """Open the connection now (calls otherwise open it on first use)."""
        await self._connection()

    async def _connection(self) -> _ClientConnection:
        conn = self._conn
        if conn is not None and conn.usable:
            return conn
        if self._lock is None:
            self._lock = asyncio.Lock()
        async with self._lock:
            if self._conn is not None and self._conn.usable:
                return self._conn
            self._conn = await self._open()
            self._methods = IdempotentMethods(clock=self._clock)  # a new connection may be a new server
            self._listing = None
            return self._conn

    async def _open(self) -> _ClientConnection:
        loop = asyncio.get_running_loop()
        conn = _ClientConnection(self.limits, self._token, self._name)
        try:
            async with asyncio.timeout(self.connect_timeout):
                if self._connector is not None:
                    await self._connector(lambda: Link(conn.core, conn))
                else:
                    context = self.tls.context()
                    await loop.create_connection(
                        lambda: Link(conn.core, conn),
                        self.host,
                        self.port,
                        ssl=context,
                        server_hostname=(self._server_hostname or self.host) if context is not None else None,
                        ssl_handshake_timeout=self.connect_timeout if context is not None else None,
                        local_addr=(self.source_address, 0) if self.source_address else None,
                    )
                self.welcome = await conn.welcome
        except TimeoutError:
            if conn.link is not None:
                conn.link.abort()
            raise ConnectError(f"timed out connecting to {self.host}:{self.port}") from None
        except ssl.SSLError as exc:
            raise ConnectError(
                f"TLS handshake with {self.host}:{self.port} failed: {describe_tls_error(exc)}"
            ) from None
        except (ConnectionResetError, BrokenPipeError) as exc:
            hint = "; does the server speak TLS?" if not self.tls.insecure else ""
            raise ConnectError(
                f"connection to {self.host}:{self.port} closed during the handshake ({exc.strerror or exc}){hint}"
            ) from None
        except OSError as exc:
            raise ConnectError(f"cannot connect to {self.host}:{self.port}: {exc.strerror or exc}") from None
        except ConnectError as exc:
            hint = silent_close_hint(self.tls) if conn.closed_silently else ""
            raise ConnectError(f"{self.host}:{self.port}: {exc}{hint}") from None
        return conn

    async def close(self) -> None:
        conn, self._conn = self._conn, None
        if self._listing is not None:
            self._listing.cancel()
            self._listing = None
        if conn is not None and conn.link is not None and not conn.closed:
            for call_id, pending in list(conn.pending.items()):
                conn.cancel(call_id)
                pending.fail(ConnectionClosed("the client was closed"))  # wake whoever awaits it
            conn.link.close()

    # -- calls ----------------------------------------------------------------------

    async def call(self, method: str, /, **args: Any) -> Any:
        """Call ``method`` with named arguments; return its result.

        For a server-streaming method, the items are collected into a list.
        """
        return await self.invoke(method, args)

    async def invoke(
        self,
        method: str,
        args: Mapping[str, Any] | None = None,
        *,
        timeout: float | None = None,
        priority: int | None = None,
        metadata: dict[str, str] | None = None,
        items: AsyncIterable[Any] | Iterable[Any] | None = None,
        idempotent: bool | None = None,
    ) -> Any:
        """The full form of ``call``: per-call timeout, priority, metadata, input stream.

        ``idempotent``: True lets the client retry the call after a retryable
        failure; False never retries it; None (default) asks the server's
        method listing, once per connection, when it first matters. The
        timeout covers every attempt and the waits between them.
        """
        timeout = self.timeout if timeout is None else timeout
        checked = check_args(args)
        options = {"priority": priority, "metadata": metadata}
        retry, budget = self._retry, self.retry_budget
        if retry is None or budget is None or not is_replayable(items):
            return await self._attempt(method, checked, timeout, timeout, options, items)
        budget.on_request()
        deadline = None if timeout is None else retry.clock() + timeout
        left = timeout
        attempts = None
        while True:
            try:
                return await self._attempt(method, checked, left, timeout, options, items)
            except CallError as exc:
                if not retry.may_retry(exc):
                    raise
                if attempts is None:
                    attempts = retry.attempts(budget, deadline=deadline, idempotent=idempotent)
                if attempts.needs_idempotency(exc):
                    attempts.idempotent = await self._is_idempotent(method, attempts.remaining())
                delay = attempts.next_delay(exc)
                if delay is None:
                    raise
            if delay > 0:
                await asyncio.sleep(delay)
            left = attempts.remaining()

    async def _attempt(
        self,
        method: str,
        args: dict[str, Any],
        timeout: float | None,
        total: float | None,
        options: Mapping[str, Any],
        items: AsyncIterable[Any] | Iterable[Any] | None,
    ) -> Any:
        """One attempt at a call, with ``timeout`` seconds left of the call's ``total``."""
        conn = await self._connection()
        if conn.slots is not None:
            await conn.slots.acquire()
        try:
            call_id, pending = conn.start(method, args, timeout, items is not None, options)
            try:
                async with asyncio.timeout(timeout):
                    if items is not None:
                        sender = conn.start_sender(call_id, pending, items)
                        try:
                            return await self._collect(conn, call_id, pending)
                        finally:
                            sender.cancel()
                    return await self._collect(conn, call_id, pending)
            except DeadlineExceeded:
                raise  # the server's answer, as it sent it (it is also a TimeoutError)
            except TimeoutError:
                conn.cancel(call_id)
                raise DeadlineExceeded(f"{method}: no answer within {total}s") from None
            except asyncio.CancelledError:
                conn.cancel(call_id)
                raise
        finally:
            if conn.slots is not None:
                conn.slots.release()

    async def _is_idempotent(self, method: str, timeout: float | None) -> bool:
        """Whether the server declares ``method`` idempotent; False when that cannot be learnt.

        Concurrent failures share one fetch of the listing; each waits for it
        at most ``timeout`` (the rest of its own deadline).
        """
        methods = self._methods
        known = methods.lookup(method)
        if known is not None:
            return known
        if self._listing is None or self._listing.done():
            if not methods.should_fetch():
                return False
            self._listing = asyncio.ensure_future(self._fetch_listing(methods))
        await asyncio.wait((self._listing,), timeout=timeout)  # neither raises its error nor cancels it
        return bool(methods.lookup(method))

    async def _fetch_listing(self, methods: IdempotentMethods) -> None:
        try:
            listing = await self._attempt(LISTING_METHOD, {}, LISTING_TIMEOUT, LISTING_TIMEOUT, {}, None)
        except Exception as exc:  # whatever went wrong, the answer is "not idempotent" for now
            methods.failed(exc)
        else:
            methods.learn(listing)

    async def _collect(self, conn: _ClientConnection, call_id: int, pending: _Pending) -> Any:
        pending.collect = True  # items are granted back as they arrive
        raw = await pending.done
        if pending.items:
            return [decode_value(r) for r in pending.items]
        return decode_value(raw)

    async def stream(
        self, method: str, items: AsyncIterable[Any] | Iterable[Any] | None = None, /, **args: Any
    ) -> AsyncIterator[Any]:
        """Call a server-streaming method and yield its items as they arrive."""
        conn = await self._connection()
        call_id, pending = conn.start(method, check_args(args), self.timeout, items is not None, {})  # never retried
        sender = conn.start_sender(call_id, pending, items) if items is not None else None
        batch = max(1, self.limits.window // 2)
        consumed = 0
        try:
            async with asyncio.timeout(self.timeout):
                while True:
                    while not pending.items and not pending.done.done():
                        pending.waiter = conn.loop.create_future()
                        await pending.waiter
                    if pending.items:
                        raw = pending.items.popleft()
                        consumed += 1
                        if consumed >= batch:
                            conn.grant(call_id, consumed)
                            consumed = 0
                        yield decode_value(raw)
                        continue
                    pending.done.result()  # raises the call's error, if any
                    return
        except DeadlineExceeded:
            raise  # the server's answer, as it sent it (it is also a TimeoutError)
        except TimeoutError:
            conn.cancel(call_id)
            raise DeadlineExceeded(f"{method}: stream did not finish within {self.timeout}s") from None
        finally:
            if sender is not None:
                sender.cancel()
            if not pending.done.done():
                conn.cancel(call_id)

    async def upload(self, method: str, items: AsyncIterable[Any] | Iterable[Any], /, **args: Any) -> Any:
        """Call a client-streaming method, sending ``items``; return its result."""
        return await self.invoke(method, args, items=items)
