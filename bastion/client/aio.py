"""The async client: one multiplexed connection, many calls in flight.

Theory of operation. ``Client`` opens one connection lazily and reuses it for
every call; if the server sends GoAway, calls already accepted finish on the
old connection and the next call opens a new one. Each call is kept by the
connection (bastion/client/_connection.py) under its call id: a unary call as
a bare future its answer resolves; a call with a stream as a ``Pending``,
whose items wait in a small queue, returning credit to the server as they
are consumed. The client sends the call's remaining time as ``timeout_ms``
and also enforces it locally (the connection's ``Deadlines``), cancelling
the call on the server when it runs out.

The usual call -- ``call`` on a single-server client whose connection is
open -- is one coroutine (``CallPath.call``, which such a client's ``call``
is) doing no more than it must: it takes a free slot, sends the call and
awaits its answer with no ``Pending``, no timer of its own, no coroutine per
attempt and one flush per loop turn shared with the turn's other calls; the
retry loop (``_retrying``) starts only if that attempt fails.

Retries (``bastion.client.policy``). ``invoke`` tries a call again only when
it fails retryably and is known idempotent -- ``idempotent=True``, or the
server's ``admin.methods`` listing, fetched once per connection on the first
such failure -- within the call's one deadline and the client's retry
budget; a call the server's GoAway proves never started is replayed once on
a new connection. A lost connection counts as a retryable failure too
(the call may have run: idempotent or keyed calls only); the retry opens a
new connection, which through a load balancer's one address may reach
another server. Streams (``stream``) and one-shot input iterators are
never retried.

Several servers (``Client(["a:7400", "b:7400"])``, bastion/client/balancer.py).
Each endpoint keeps its own connection; each call goes to the endpoint
``Balancer.pick`` chooses, skipping those whose circuit breaker is open. A
connection that cannot be opened opens the next endpoint's at once (the call
never started); one still opening after 0.25 s has the next endpoint's tried
alongside it (bastion/client/_balanced.py, ``CONNECT_ATTEMPT_DELAY``). A call
whose connection is lost after it was sent is retried on another endpoint
only if it is idempotent -- declared so, or carrying an
idempotency key (``invoke(..., idempotency_key=...)``: the server remembers
its first answer) -- under the same retry budget. A background task checks
every endpoint's ``admin.ready`` each ``health_interval`` seconds.
"""

from __future__ import annotations

import asyncio
import ssl
import weakref
from collections.abc import (
    AsyncIterable,
    AsyncIterator,
    Awaitable,
    Callable,
    Coroutine,
    Iterable,
    Mapping,
)
from typing import Any

from bastion.client._balanced import BalancedEndpoints, _retrieved, _Slot
from bastion.client._common import (
    DECODER,
    ServiceProxy,
    check_args,
    decode_value,
    silent_close_hint,
)
from bastion.client._connection import (
    NO_OPTIONS,
    ONE_LOOP,
    WRITE_HIGH_WATER,
    CallOptions,
    ClientClosed,
    ClientConnection,
    wait_to_reconnect,
)
from bastion.client._connection import cancel_unless_closed as _cancel
from bastion.client._connection import cancelling as _cancelling
from bastion.client._path import CallPath, Retry, RetryWaits
from bastion.client.balancer import Balancer, Endpoint
from bastion.client.base import ClientBase
from bastion.client.policy import (
    LISTING_METHOD,
    LISTING_TIMEOUT,
    IdempotentMethods,
    RetryBudget,
    RetryPolicy,
)
from bastion.exceptions import (
    CallError,
    ConnectError,
    ConnectionClosed,
    DeadlineExceeded,
    Unavailable,
    UsageError,
)
from bastion.protocol.state import ConnectionState
from bastion.transport.aio import Link
from bastion.transport.tls_errors import describe_tls_error

__all__ = ["Client"]

_OPEN = ConnectionState.OPEN
_decode = DECODER.decode


class Client(BalancedEndpoints, ClientBase):
    """An async bastion client.

    ``Client("host:port", token=..., timeout=...)``; use as ``async with`` or
    call ``close()``. Calls: ``await client.call("svc.method", a=1)`` or
    ``await client.svc.method(a=1)``; server streams: ``async for x in
    client.stream("svc.method", ...)``; client streams: ``await
    client.upload("svc.method", items, ...)``. Settings: see ``ClientBase``.
    """

    #: Whether ``_attempt`` is this class's own. The usual call's first attempt
    #: then skips it (one call fewer); a subclass that overrides it (to count
    #: attempts, say) sees every attempt, that one too.
    _own_attempt = True

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        cls._own_attempt = cls._attempt is Client._attempt

    def _init_state(self) -> None:
        self._path = CallPath(self)  # first: the settings ClientBase sets next live in it
        if type(self).call is _CLIENT_CALL and self._own_attempt and not self.balanced:
            # ``client.call`` is then ``CallPath.call`` itself, found in the instance's dict: the
            # usual call is one coroutine, makes no bound method and never looks up ``_path`` (see
            # ``CallPath``). A subclass that overrides ``call`` or ``_attempt`` keeps ``Client.call``,
            # and so do clients made while ``Client.call`` is replaced (a test's mock, say).
            self.call = self._path.call  # type: ignore[method-assign]
        #: A single-server client's attempt at connecting, while one runs: its callers share it.
        self._connecting: asyncio.Future[ClientConnection] | None = None
        self._retry_waits = RetryWaits()  # close ends them
        # Seam for bastion.testing: given the protocol factory, connect it to
        # something other than a TCP socket (an in-memory server, say).
        self._connector: Callable[[Callable[[], Link]], Awaitable[object]] | None = None
        self._listing: asyncio.Future[None] | None = None
        self._balancer: Balancer | None = None
        self._slots: dict[int, _Slot] = {}  # id(endpoint) -> slot
        self._health: asyncio.Task[None] | None = None
        #: Every connection this client opened and may still hold open -- one the server is draining
        #: too, which the client no longer calls on but whose calls still run: ``close`` ends them all.
        self._opened: weakref.WeakSet[ClientConnection] = weakref.WeakSet()

    async def __aenter__(self) -> Client:
        await self.connect()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    def __getattr__(self, name: str) -> ServiceProxy[Client]:
        if name.startswith("_"):
            raise AttributeError(name)
        return ServiceProxy(self, name)

    # -- what the usual call reads: kept in ``_path`` (see ``CallPath``) ---------------

    @property
    def timeout(self) -> float | None:
        """Seconds a call may take, every attempt included (None: no limit); ``invoke`` may set its own."""
        return self._path.timeout

    @timeout.setter
    def timeout(self, timeout: float | None) -> None:
        self._path.timeout = timeout

    @property
    def _retry(self) -> RetryPolicy | None:
        return self._path.retry

    @_retry.setter
    def _retry(self, policy: RetryPolicy | None) -> None:
        self._path.retry = policy

    @property
    def retry_budget(self) -> RetryBudget | None:
        """The retry budget this client's calls draw on (set with ``retry``)."""
        return self._path.budget

    @retry_budget.setter
    def retry_budget(self, budget: RetryBudget | None) -> None:
        self._path.budget = budget

    @property
    def _conn(self) -> ClientConnection | None:
        """A single-server client's connection (None before the first call, and after ``close``)."""
        return self._path.conn

    @_conn.setter
    def _conn(self, conn: ClientConnection | None) -> None:
        self._path.conn = conn

    # -- connection ---------------------------------------------------------------

    async def connect(self) -> None:
        """Open the connection now (calls otherwise open it on first use)."""
        await self._connection()

    async def _connection(self, timeout: float | None = None, method: str = "") -> ClientConnection:
        """The open connection, opening it if need be; a caller waits for it at most ``timeout`` seconds.

        A single-server client's callers share one attempt (``_connecting``):
        calls made while it runs wait for it -- each for no longer than its
        own deadline, then DeadlineExceeded -- rather than each making an
        attempt of its own after the one before failed. A caller that gives
        up (or is cancelled) leaves the attempt running for the others; it
        ends within ``connect_timeout`` either way.
        """
        if self.balanced:  # (a call's attempt bounds its own checkout: ``_attempt_on_endpoint``)
            return (await self._checkout(()))[1]
        conn = self._conn
        if conn is not None and conn.usable and conn.check_loop():
            return conn
        attempt = self._connecting
        if attempt is not None and attempt.get_loop() is not asyncio.get_running_loop():
            if not attempt.get_loop().is_closed():
                raise UsageError(f"this Client is connecting on another event loop, still running: {ONE_LOOP}")
            attempt = self._connecting = None  # a closed loop's, never to finish
        if attempt is None:
            attempt = self._connecting = asyncio.ensure_future(self._reconnect())
            attempt.add_done_callback(_retrieved)
        try:
            if timeout is None:
                return await asyncio.shield(attempt)
            async with asyncio.timeout(timeout):
                return await asyncio.shield(attempt)
        except asyncio.CancelledError:
            if attempt.cancelled() and not _cancelling():  # close() ended the attempt, not this caller's
                raise ClientClosed("the client was closed") from None
            raise
        except TimeoutError:
            backoff = self._backoff
            if backoff.delay() > 0:
                doing = f"waiting {backoff.delay():.2f}s more to reconnect after {backoff.failures} failures"
            else:
                doing = "still connecting"
            raise DeadlineExceeded(
                f"{method}: no connection within {timeout}s ({doing} to {self.host}:{self.port})"
            ) from None

    async def _reconnect(self) -> ClientConnection:
        """One attempt at opening a single-server client's connection (``_connecting``, shared).

        It waits first for the reconnect backoff (``ReconnectBackoff``) if the
        attempt before failed or the connection was lost, so a server that is
        down is not hammered; callers wait for it within their own deadlines.
        """
        backoff = self._backoff
        try:
            lost, self._conn = self._conn, None  # not usable, or we would not be here
            await wait_to_reconnect(backoff, lost)
            try:
                conn = self._conn = await self._open()
            except (ConnectError, CallError):  # refused, or the handshake failed or was refused
                backoff.on_failure()
                raise
            backoff.on_success()
            self._methods = IdempotentMethods(clock=self._clock)  # a new connection may be a new server
            self._listing = None
            return conn
        finally:
            self._connecting = None

    # -- connections ---------------------------------------------------------------

    async def _open(
        self, host: str | None = None, port: int | None = None, hostname: str | None = None
    ) -> ClientConnection:
        host = self.host if host is None else host
        port = self.port if port is None else port
        loop = asyncio.get_running_loop()
        conn = ClientConnection(self.limits, self._token, self._name, self.max_collected_bytes)
        self._opened.add(conn)
        try:
            async with asyncio.timeout(self.connect_timeout):
                if self._connector is not None:
                    await self._connector(lambda: Link(conn.core, conn, write_high_water=WRITE_HIGH_WATER))
                else:
                    context = self.tls.context()
                    await loop.create_connection(
                        lambda: Link(conn.core, conn, write_high_water=WRITE_HIGH_WATER),
                        host,
                        port,
                        ssl=context,
                        server_hostname=(self._server_hostname or hostname or host) if context is not None else None,
                        ssl_handshake_timeout=self.connect_timeout if context is not None else None,
                        local_addr=(self.source_address, 0) if self.source_address else None,
                    )
                self.welcome = await conn.welcome
        except TimeoutError:
            if conn.link is not None:
                conn.link.abort()
            raise ConnectError(f"timed out connecting to {host}:{port}") from None
        except asyncio.CancelledError:  # the client was closed, or a balanced call gave up: leave nothing open
            if conn.link is not None:
                conn.link.abort()
            raise
        except ssl.SSLError as exc:
            raise ConnectError(f"TLS handshake with {host}:{port} failed: {describe_tls_error(exc)}") from None
        except (ConnectionResetError, BrokenPipeError) as exc:
            hint = "; does the server speak TLS?" if not self.tls.insecure else ""
            raise ConnectError(
                f"connection to {host}:{port} closed during the handshake ({exc.strerror or exc}){hint}"
            ) from None
        except OSError as exc:
            raise ConnectError(f"cannot connect to {host}:{port}: {exc.strerror or exc}") from None
        except ConnectError as exc:
            hint = silent_close_hint(self.tls) if conn.closed_silently else ""
            raise ConnectError(f"{host}:{port}: {exc}{hint}") from None
        return conn

    async def close(self) -> None:
        """Close every connection and stop every background task (those of an event loop since closed are
        only forgotten: nothing can run on it)."""
        self._retry_waits.interrupt()
        _cancel(self._connecting)
        self._connecting = None
        _cancel(self._health)
        self._health = None
        for slot in self._slots.values():
            _cancel(slot.connecting)
            slot.connecting = None
            self._close_conn(slot.conn)
            slot.conn = None
        conn, self._conn = self._conn, None
        _cancel(self._listing)
        self._listing = None
        self._close_conn(conn)
        for conn in list(self._opened):  # those replaced while the server drained them
            self._close_conn(conn)

    @staticmethod
    def _close_conn(conn: ClientConnection | None) -> None:
        if conn is not None and conn.link is not None and not conn.closed:
            if conn.loop.is_closed():
                conn.left_behind()
                return
            conn.abandon(ClientClosed("the client was closed"))
            conn.link.close()

    # -- calls ----------------------------------------------------------------------

    def call(self, method: str, /, **args: Any) -> Coroutine[Any, Any, Any]:
        """Call ``method`` with named arguments; await it for the result.

        For a server-streaming method, the items are collected into a list.
        (A single-server client's ``call`` is ``CallPath.call``, bound in
        ``_init_state``: this one serves balanced clients and subclasses
        that override ``call`` or ``_attempt``. A plain function returning
        the call's coroutine, so such a call runs one coroutine fewer;
        ``await client.call(...)`` reads the same. So replacing ``Client.call``
        on the class -- a test's mock -- reaches the clients made after it, not
        those that exist: patch the instance for those.) A client belongs to the
        event loop it connected on: once that loop has closed (one ``asyncio.run``
        to the next) it reconnects on the running one; while that loop still runs
        (another thread's), ``connect`` and ``stream`` raise UsageError -- calls
        are not checked (no per-call cost), so do not share a client across threads.
        """
        # Keyword arguments are a fresh dict with str keys: nothing for check_args to do.
        path = self._path  # the one lookup on the client itself (see CallPath)
        return path.invoke(method, args, path.timeout, NO_OPTIONS, None, None)

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
        idempotency_key: str | bool | None = None,
    ) -> Any:
        """The full form of ``call``: per-call timeout, priority, metadata, input stream.

        ``idempotent``: True lets the client retry the call after a retryable
        failure; False never retries it; None (default) asks the server's
        method listing, once per connection, when it first matters. The
        timeout covers every attempt and the waits between them.
        ``idempotency_key``: a key (True: a new random one) the server
        remembers the call's first answer under, so the call may be retried
        -- even after a lost connection, on another server -- and still take
        effect once (unary calls only; sent as metadata ``idempotency-key``).
        """
        timeout = self.timeout if timeout is None else timeout
        checked = check_args(args)
        metadata = self._with_key(metadata, idempotency_key)
        if metadata is not None and "idempotency-key" in metadata:
            if items is not None:
                raise UsageError("idempotency keys apply to unary calls only, not streams")
            idempotent = True  # the server answers a repeat with the first result
        return await self._path.invoke(method, checked, timeout, (priority, metadata), items, idempotent)

    async def _retrying(
        self,
        method: str,
        checked: dict[str, Any],
        timeout: float | None,
        options: CallOptions,
        items: AsyncIterable[Any] | Iterable[Any] | None,
        plan: Retry,
        failure: CallError | ConnectionClosed | None,
    ) -> Any:
        """The attempts at a call, each after the one before failed retryably, within its deadline and budget.

        ``failure``: the first attempt's error, when that attempt was made already.
        """
        retry, budget = self._retry, self.retry_budget
        assert retry is not None and budget is not None
        waits = self._retry_waits
        closes = waits.interrupts
        left = timeout
        attempts = None
        tried: list[Endpoint] = []  # endpoints this call failed on: the next attempt goes elsewhere
        while True:
            if failure is None:
                try:
                    return await self._attempt(method, checked, left, timeout, options, items, tried)
                except (CallError, ConnectionClosed) as exc:
                    failure = exc
            reason: BaseException = failure
            if isinstance(failure, ClientClosed):
                raise failure
            if isinstance(failure, ConnectionClosed):
                # It may have started: idempotent (or keyed) calls only, on a new connection -- to another
                # endpoint, or through the one address (a load balancer) to whichever server it picks.
                reason = Unavailable(f"connection lost: {failure}")
            if not retry.may_retry(reason):
                raise failure
            if attempts is None:
                attempts = retry.attempts(budget, deadline=plan.deadline, idempotent=plan.idempotent)
            if attempts.needs_idempotency(reason):
                attempts.idempotent = await self._is_idempotent(method, attempts.remaining())
            delay = attempts.next_delay(reason)
            if delay is None:
                raise failure
            failure = None
            if delay > 0:
                await waits.sleep(delay)
            if waits.interrupts != closes:  # close() came since: during the wait, or with none (delay 0)
                raise ClientClosed("the client was closed")
            left = attempts.remaining()

    def _attempt(
        self,
        method: str,
        args: dict[str, Any],
        timeout: float | None,
        total: float | None,
        options: CallOptions,
        items: AsyncIterable[Any] | Iterable[Any] | None,
        tried: list[Endpoint],
        retry: Retry | None = None,
    ) -> Coroutine[Any, Any, Any]:
        """One attempt at a call (``_attempt_on_endpoint``), with ``timeout`` seconds left of the call's ``total``.

        On a single-server client's open connection, the call itself: one
        coroutine fewer for the usual call. ``retry``: the call's first
        attempt, on such a connection, which goes on to the retry loop if it
        fails (see ``CallPath.invoke``).
        """
        path = self._path
        conn = path.conn
        if conn is not None and conn.core.state is _OPEN and not conn.closed:  # conn.usable, without the call
            return path.call_on(conn, method, args, timeout, total, options, items, retry)
        if retry is not None:  # closed since invoke looked (a subclass awaited something first): connect again
            return self._retrying(method, args, total, options, items, retry, None)
        return self._attempt_on_endpoint(method, args, timeout, total, options, items, tried)

    async def _attempt_on_endpoint(
        self,
        method: str,
        args: dict[str, Any],
        timeout: float | None,
        total: float | None,
        options: CallOptions,
        items: AsyncIterable[Any] | Iterable[Any] | None,
        tried: list[Endpoint],
    ) -> Any:
        """``_attempt``, connecting first if need be.

        Balanced: on an endpoint not in ``tried``, if one is left; adds the
        endpoint to ``tried`` if the attempt fails there.
        """
        if timeout is not None:  # the wait for a connection counts against the call's deadline
            loop = asyncio.get_running_loop()
            start = loop.time()
            if not self.balanced:
                conn = await self._connection(timeout, method)
            else:
                try:
                    async with asyncio.timeout(timeout):
                        slot, conn = await self._checkout(tried)
                except TimeoutError:
                    raise DeadlineExceeded(f"{method}: no connection within {total}s") from None
            timeout = max(0.001, timeout - (loop.time() - start))
        elif not self.balanced:
            conn = await self._connection()
        else:
            slot, conn = await self._checkout(tried)
        if not self.balanced:
            return await self._path.call_on(conn, method, args, timeout, total, options, items)
        endpoint = slot.endpoint
        endpoint.outstanding += 1
        try:
            result = await self._path.call_on(conn, method, args, timeout, total, options, items)
        except ConnectionClosed:
            endpoint.breaker.on_failure()
            tried.append(endpoint)
            raise
        except CallError as exc:
            if exc.status in self._retry_statuses:
                tried.append(endpoint)
                if conn.went_away:
                    endpoint.breaker.trip()
            raise
        finally:
            endpoint.outstanding -= 1
        endpoint.breaker.on_success()
        return result

    @property
    def _retry_statuses(self) -> frozenset[Any]:
        return self._retry.retryable if self._retry is not None else frozenset()

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
            listing = await self._attempt(LISTING_METHOD, {}, LISTING_TIMEOUT, LISTING_TIMEOUT, NO_OPTIONS, None, [])
        except Exception as exc:  # whatever went wrong, the answer is "not idempotent" for now
            methods.failed(exc)
        else:
            methods.learn(listing)

    async def stream(
        self, method: str, items: AsyncIterable[Any] | Iterable[Any] | None = None, /, **args: Any
    ) -> AsyncIterator[Any]:
        """Call a server-streaming method and yield its items as they arrive."""
        conn = await self._connection(self.timeout, method)
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
                        yield decode_value(raw, method)
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


#: ``Client.call`` as defined (see ``Client._init_state``).
_CLIENT_CALL = Client.call
