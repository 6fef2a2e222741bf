"""The blocking client: the async client's surface, over a plain socket.

It drives the same sans-IO core and shares its decisions (``_common``); only
the way bytes move differs. One call runs at a time per ``SyncClient`` (a
lock serialises threads); use several clients for parallel blocking calls.
``close`` from another thread fails the call in progress at once
(``ClientClosed``). A forked child opens its own connection on its first
call: the parent's socket and TLS state stay the parent's.
Retries follow the same ``RetryPolicy`` as the async client's (see
``bastion.client.aio``); the waits between attempts hold no lock, and ``close`` ends them.

Several servers (a list of addresses, see ``ClientBase``): the client keeps
one connection, to an endpoint the ``Balancer`` picks (one call at a time
leaves nothing to weigh but health); a connection that cannot be opened, is
lost, or is drained moves it to another endpoint, and calls are retried
there as the async client does. There is no background health check: a
half-open endpoint is tried with ``admin.ready`` before a call goes to it.
"""

from __future__ import annotations

import collections
import contextlib
import os
import socket
import threading
import time
import weakref
from collections.abc import Iterable, Iterator, Mapping
from typing import Any

from bastion.client._common import (
    COLLECTED_ITEM_COST,
    PingMeter,
    ServiceProxy,
    build_hello,
    check_args,
    collected_too_much,
    decode_value,
    error_from,
    goaway_error,
    silent_close_hint,
)
from bastion.client._connection import ClientClosed
from bastion.client._turn import Turn
from bastion.client.balancer import Balancer, Endpoint, ReconnectBackoff, expand_endpoints, trial_passed
from bastion.client.base import ClientBase
from bastion.client.policy import (
    LISTING_METHOD,
    LISTING_TIMEOUT,
    IdempotentMethods,
    is_replayable,
)
from bastion.exceptions import (
    CallError,
    ConnectError,
    ConnectionClosed,
    DeadlineExceeded,
    Unavailable,
    UsageError,
    error_for_status,
)
from bastion.protocol.connection import Connection
from bastion.protocol.messages import Credit, Error, GoAway, Item, Message, Result, Welcome
from bastion.protocol.state import ConnectionState, Role
from bastion.security.tls import ALPN_PROTOCOL
from bastion.transport.blocking import BlockingLink

__all__ = ["SyncClient"]

#: Every SyncClient not yet collected: a forked child must not use its parent's connections.
_LIVE: weakref.WeakSet[SyncClient] = weakref.WeakSet()


def _after_fork_in_child() -> None:
    for client in list(_LIVE):
        client._forget_after_fork()


os.register_at_fork(after_in_child=_after_fork_in_child)

#: How often ``close`` aborts the connection of a call running in another thread until that call lets go.
_CLOSE_POLL = 0.05


class SyncClient(ClientBase):
    """A blocking bastion client with the same surface as ``Client`` (TLS and retry settings included)."""

    def _init_state(self) -> None:
        self._link: BlockingLink | None = None
        #: A link still in its bastion handshake: not ``_link`` yet, but ``close`` must be able to abort it.
        self._handshaking: BlockingLink | None = None
        self._lock = Turn()
        self._balancer: Balancer | None = None
        self._endpoint: Endpoint | None = None  # the endpoint of ``_link``
        # What the socket brought for a call other than the one reading it: a call made while a
        # stream is being read (in the same thread: the turn is reentrant) reads the stream's
        # items too, and keeps them here until the stream reads on. Keyed by call id.
        self._backlog: dict[int, collections.deque[Message]] = {}
        #: Set while ``close`` waits for a call in another thread: ends that call's wait for a reconnect backoff.
        self._closing = threading.Event()
        #: Set by ``close`` (then replaced): ends the wait of a call between its attempts, which holds no lock.
        self._closed = threading.Event()
        _LIVE.add(self)

    def _forget_after_fork(self) -> None:
        """In a forked child: drop the parent's connection unused, and the lock a parent thread may hold.

        The socket, and its TLS state, are the parent's: a child that wrote to
        it would break the parent's connection (and read the parent's answers).
        Closing the child's copy of the descriptor leaves the parent's intact.
        """
        self._lock = Turn()
        self._closing = threading.Event()
        self._closed = threading.Event()
        self._backlog = {}
        link, self._link = self._link, None
        if link is not None:
            with contextlib.suppress(OSError):
                link.sock.close()
            link.closed = True

    def __del__(self) -> None:
        """A client nobody closed: its socket closed as it is collected, as the async client's are when their
        loop ends -- not left to the socket's own finalizer, which warns (ResourceWarning)."""
        for link in (getattr(self, "_link", None), getattr(self, "_handshaking", None)):
            if link is not None:
                link.close()

    def __enter__(self) -> SyncClient:
        self.connect()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def __getattr__(self, name: str) -> ServiceProxy[SyncClient]:
        if name.startswith("_"):
            raise AttributeError(name)
        return ServiceProxy(self, name)

    # -- connection -----------------------------------------------------------------

    def connect(self) -> None:
        with self._lock:
            self._connection()

    def _connection(self, tried: list[Endpoint] | None = None, deadline: float | None = None) -> BlockingLink:
        """The open link, connecting if need be -- giving up by ``deadline`` (a call's), if sooner than
        ``connect_timeout``."""
        link = self._link
        if link is not None and not self._backlog:  # idle: did it die, or drain, while nobody read it?
            link.poll_idle()
        if link is not None and not link.closed and link.core.state is ConnectionState.OPEN:
            return link
        if link is not None:
            if link.core.state is not ConnectionState.OPEN and self._endpoint is not None and not link.closed:
                self._endpoint.breaker.trip()  # drained (GoAway): elsewhere for a while
            if link.core.goaway is None and not link.aborted:  # lost, not drained nor closed by us
                (self._endpoint.backoff if self.balanced and self._endpoint is not None else self._backoff).on_lost()
            link.close()
            self._link = None
        if not self.balanced:
            return self._connect_after_backoff(self._backoff, self.host, self.port, self._server_hostname, deadline)
        balancer = self._endpoints()
        failed = list(tried or ())
        error: ConnectError | None = None
        for _ in range(len(balancer.endpoints)):
            backing_off = [e for e in balancer.endpoints if e.backoff.delay() > 0]
            endpoint = balancer.pick([*failed, *backing_off])  # one that may be tried now, if any
            if endpoint in failed or endpoint in backing_off:
                endpoint = balancer.pick(failed)
            if error is not None and endpoint in failed:
                break
            try:
                hostname = self._server_hostname or endpoint.server_hostname
                link = self._connect_after_backoff(endpoint.backoff, endpoint.host, endpoint.port, hostname, deadline)
                self._endpoint = endpoint
                if endpoint.breaker.begin_trial():
                    self._probe(endpoint)
                return link
            except ConnectError as exc:
                endpoint.breaker.on_failure()
                failed.append(endpoint)
                error = exc
        assert error is not None
        raise error

    def _connect_after_backoff(
        self, backoff: ReconnectBackoff, host: str, port: int, hostname: str | None, deadline: float | None
    ) -> BlockingLink:
        """``_connect_to``, once ``backoff`` allows another attempt; the backoff learns how it went.

        Waiting past ``deadline`` is not done: the call waits until then and
        fails with DeadlineExceeded. ``close`` from another thread ends the wait.
        """
        wait = backoff.delay()
        if wait > 0:
            late = deadline is not None and time.monotonic() + wait > deadline
            if deadline is not None and late:
                wait = max(0.0, deadline - time.monotonic())
            if self._closing.wait(wait):
                raise ClientClosed("the client was closed")
            if late:
                raise DeadlineExceeded(
                    f"waiting {backoff.delay():.2f}s more to reconnect to {host}:{port} "
                    f"after {backoff.failures} failures"
                )
        try:
            link = self._connect_to(host, port, hostname, deadline)
        except (ConnectError, CallError):  # refused, or the handshake failed or was refused
            backoff.on_failure()
            raise
        backoff.on_success()
        return link

    def _endpoints(self) -> Balancer:
        if self._balancer is None:

            def resolve(host: str, port: int) -> list[str]:
                try:
                    infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
                except OSError as exc:
                    raise ConnectError(f"cannot resolve {host}: {exc.strerror or exc}") from None
                return list(dict.fromkeys(str(info[4][0]) for info in infos))

            endpoints = expand_endpoints(self._addresses, resolve, self._make_breaker, self._make_backoff)
            random = self._retry.random if self._retry is not None else None
            self._balancer = Balancer(endpoints, random=random) if random is not None else Balancer(endpoints)
        return self._balancer

    @property
    def endpoints(self) -> list[Endpoint]:
        """The endpoints of a balanced client (empty before its first call)."""
        return list(self._balancer.endpoints) if self._balancer is not None else []

    def _probe(self, endpoint: Endpoint) -> None:
        """A half-open endpoint's trial, on the new link: ``admin.ready``; ConnectError if it fails."""
        try:
            ok = trial_passed(self._attempt("admin.ready", {}, 2.0, 2.0, None, None, None), None)
        except (CallError, ConnectionClosed, ConnectError) as exc:
            ok = trial_passed(None, exc)
        if ok:
            endpoint.breaker.on_success()
            return
        endpoint.breaker.trip()
        if self._link is not None:
            self._link.close()
            self._link = None
        raise ConnectError(f"{endpoint.address} is not ready")

    def _connect_to(
        self, host: str, port: int, server_hostname: str | None, deadline: float | None = None
    ) -> BlockingLink:
        core = Connection(Role.CLIENT, self.limits)
        wait = self.connect_timeout
        if deadline is not None:
            wait = max(0.001, min(wait, deadline - time.monotonic()))
        link = BlockingLink.connect(
            core,
            host,
            port,
            timeout=wait,
            ssl_context=self.tls.context(),
            server_hostname=server_hostname,
            alpn=ALPN_PROTOCOL,
            source_address=self.source_address,
        )
        link.on_pings = PingMeter(time.monotonic).received  # a flood is dropped, as by the async client
        deadline = time.monotonic() + wait
        self._handshaking = link
        try:
            core.send_hello(build_hello(self.limits, self._token, self._name))
            link.flush()
            while True:
                for event in link.receive(deadline):
                    if isinstance(event, Welcome):
                        self.welcome = event
                        self._link = link
                        self._backlog = {}  # call ids start again on this connection
                        self._methods = IdempotentMethods(clock=self._clock)  # maybe a new server
                        return link
                    if isinstance(event, GoAway):
                        link.close()
                        raise error_for_status(event.code, event.message or "handshake refused")
        except (DeadlineExceeded, ConnectionClosed) as exc:
            link.close()
            if link.aborted:
                raise ClientClosed("the client was closed") from None
            hint = silent_close_hint(self.tls) if isinstance(exc, ConnectionClosed) and not link.received_any else ""
            raise ConnectError(f"handshake with {host}:{port} failed: {exc}{hint}") from None
        finally:
            self._handshaking = None
            if self._link is not link:  # failed, however: closed now, not when the error is collected
                link.close()

    def close(self) -> None:
        """Close the connection. A call in progress in another thread fails at once with ``ClientClosed``.

        That call holds the lock, and may wait on the socket for as long as
        its timeout (none: for ever): its link is aborted until the lock is
        free, so ``close`` returns promptly whatever the server does.
        """
        closed, self._closed = self._closed, threading.Event()
        closed.set()  # a call waiting to retry gives up
        acquired = self._lock.acquire(blocking=False)
        while not acquired:
            self._closing.set()  # a call waiting out a reconnect backoff stops waiting
            link = self._link or self._handshaking
            if link is not None:
                link.abort()
            acquired = self._lock.acquire(timeout=_CLOSE_POLL)
        self._closing.clear()
        try:
            if self._link is not None:
                self._link.close()
                self._link = None
        finally:
            self._lock.release()

    # -- calls ------------------------------------------------------------------------

    def call(self, method: str, /, **args: Any) -> Any:
        """Call ``method``; server-stream items are collected into a list."""
        return self.invoke(method, args)

    def invoke(
        self,
        method: str,
        args: Mapping[str, Any] | None = None,
        *,
        timeout: float | None = None,
        priority: int | None = None,
        metadata: dict[str, str] | None = None,
        items: Iterable[Any] | None = None,
        idempotent: bool | None = None,
        idempotency_key: str | bool | None = None,
    ) -> Any:
        """The full form of ``call``; ``idempotent``, ``idempotency_key`` and retries as for ``Client.invoke``."""
        timeout = self.timeout if timeout is None else timeout
        checked = check_args(args)
        metadata = self._with_key(metadata, idempotency_key)
        if metadata is not None and "idempotency-key" in metadata:
            if items is not None:
                raise UsageError("idempotency keys apply to unary calls only, not streams")
            idempotent = True
        retry, budget = self._retry, self.retry_budget
        if retry is None or budget is None or not is_replayable(items):
            return self._attempt(method, checked, timeout, timeout, priority, metadata, items)
        budget.on_request()
        closed = self._closed
        deadline = None if timeout is None else retry.clock() + timeout
        left = timeout
        attempts = None
        while True:
            try:
                return self._attempt(method, checked, left, timeout, priority, metadata, items)
            except (CallError, ConnectionClosed) as exc:
                if isinstance(exc, ClientClosed):
                    raise
                reason: BaseException = exc
                if isinstance(exc, ConnectionClosed):
                    # It may have started: idempotent (or keyed) calls only, on a new connection -- to another
                    # endpoint, or through the one address (a load balancer) to whichever server it picks.
                    reason = Unavailable(f"connection lost: {exc}")
                if self.balanced:
                    self._leave(exc, retry.retryable)
                if not retry.may_retry(reason):
                    raise
                if attempts is None:
                    attempts = retry.attempts(budget, deadline=deadline, idempotent=idempotent)
                if attempts.needs_idempotency(reason):
                    attempts.idempotent = self._is_idempotent(method, attempts.remaining())
                delay = attempts.next_delay(reason)
                if delay is None:
                    raise
            if closed.wait(max(0.0, delay)):  # close() from another thread ends the wait
                raise ClientClosed("the client was closed")
            left = attempts.remaining()

    def _leave(self, exc: BaseException, retryable: frozenset[Any]) -> None:
        """After a failed attempt: drop the endpoint's connection if it was lost, drained or unavailable."""
        endpoint = self._endpoint
        if endpoint is None:
            return
        if isinstance(exc, ConnectionClosed):
            endpoint.breaker.on_failure()
            endpoint.backoff.on_lost()
        elif not isinstance(exc, Unavailable):  # a rate limit is no reason to move
            return
        with self._lock:
            if self._link is not None:
                self._link.close()
                self._link = None

    def _attempt(
        self,
        method: str,
        args: dict[str, Any],
        timeout: float | None,
        total: float | None,
        priority: int | None,
        metadata: dict[str, str] | None,
        items: Iterable[Any] | None,
    ) -> Any:
        collected: list[Any] = []
        result = None
        for kind, value in self._run(method, args, timeout, priority, metadata, items, total, collect=True):
            if kind == "item":
                collected.append(value)
            else:
                result = value
        return collected if collected else result

    def _is_idempotent(self, method: str, timeout: float | None) -> bool:
        """Whether the server declares ``method`` idempotent; False when that cannot be learnt."""
        with self._lock:
            methods = self._methods
            known = methods.lookup(method)
            if known is not None:
                return known
            if not methods.should_fetch():
                return False
            wait = LISTING_TIMEOUT if timeout is None else min(timeout, LISTING_TIMEOUT)
            try:
                methods.learn(self._attempt(LISTING_METHOD, {}, wait, wait, None, None, None))
            except Exception as exc:  # whatever went wrong, the answer is "not idempotent" for now
                methods.failed(exc)
            return bool(methods.lookup(method))

    def stream(self, method: str, items: Iterable[Any] | None = None, /, **args: Any) -> Iterator[Any]:
        """Call a server-streaming method; yield its items as they arrive."""
        for kind, value in self._run(method, args, None, None, None, items):
            if kind == "item":
                yield value

    def upload(self, method: str, items: Iterable[Any], /, **args: Any) -> Any:
        """Call a client-streaming method, sending ``items``; return its result."""
        return self.invoke(method, args, items=items)

    def _run(
        self,
        method: str,
        args: Mapping[str, Any] | None,
        timeout: float | None,
        priority: int | None,
        metadata: dict[str, str] | None,
        items: Iterable[Any] | None,
        total: float | None = None,
        *,
        collect: bool = False,
    ) -> Iterator[tuple[str, Any]]:
        """The call's items and its result, as they come; ``collect``: the caller keeps every item (a unary
        call), so the stream is cut off past ``max_collected_bytes``."""
        timeout = self.timeout if timeout is None else timeout
        total = timeout if total is None else total
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._turn(method, deadline, total):
            try:
                link = self._connection(deadline=deadline)
            except ConnectError as exc:
                if deadline is None or time.monotonic() < deadline:
                    raise
                raise DeadlineExceeded(f"{method}: no connection within {total}s ({exc})") from None
            except DeadlineExceeded as exc:  # waiting out a reconnect backoff
                raise DeadlineExceeded(f"{method}: no connection within {total}s ({exc})") from None
            core = link.core
            call_id = core.send_call(
                method,
                check_args(args),
                stream=items is not None,
                priority=priority,
                metadata=metadata,
                timeout_ms=None if deadline is None else max(1, int((deadline - time.monotonic()) * 1000)),
            )
            source = iter(items) if items is not None else None
            finished = False
            backlog = self._backlog
            mine: collections.deque[Message] = collections.deque()
            backlog[call_id] = mine
            collected = 0  # what the items count against max_collected_bytes, when collected
            try:
                while True:
                    if source is not None:
                        source = self._send_items(core, call_id, source)
                    link.flush()
                    if mine:
                        events = list(mine)
                        mine.clear()
                    else:
                        events = _sort_out(link.receive(deadline), call_id, backlog)
                    for event in events:
                        if isinstance(event, Item):
                            if collect:
                                collected += len(event.value) + COLLECTED_ITEM_COST
                                if collected > self.max_collected_bytes:
                                    raise collected_too_much(self.max_collected_bytes)  # cancelled below
                            core.grant(call_id, 1)
                            yield "item", decode_value(event.value, method)
                        elif isinstance(event, Result):
                            finished = True
                            yield "result", decode_value(event.value, method)
                            return
                        elif isinstance(event, Error):
                            finished = True
                            raise error_from(event)
                        elif isinstance(event, GoAway) and event.last_id < call_id:
                            finished = True
                            link.close()
                            raise goaway_error(event, call_id)
                        elif isinstance(event, Credit):
                            pass  # send credit is tracked by the core
            except DeadlineExceeded:
                if finished:
                    raise  # the server's answer, as it sent it
                raise DeadlineExceeded(f"{method}: no answer within {total}s") from None
            except ConnectionClosed:
                if link.aborted:
                    link.close()
                    raise ClientClosed("the client was closed") from None
                raise
            finally:
                if backlog.get(call_id) is mine:
                    del backlog[call_id]
                if not finished and not link.closed and core.send_cancel(call_id):
                    with contextlib.suppress(ConnectionClosed):
                        link.flush()

    @contextlib.contextmanager
    def _turn(self, method: str, deadline: float | None, total: float | None) -> Iterator[None]:
        """Hold the client (one call at a time) -- waiting for another thread's call at most until ``deadline``."""
        lock = self._lock  # the same lock released as taken (a forked child gets a new one)
        wait = -1.0 if deadline is None else max(0.0, deadline - time.monotonic())
        if not lock.acquire(timeout=wait):
            raise DeadlineExceeded(
                f"{method}: no turn within {total}s: another thread's call holds this client "
                "(a SyncClient makes one call at a time; use one per thread for parallel calls)"
            )
        try:
            yield
        finally:
            lock.release()

    @staticmethod
    def _send_items(core: Connection, call_id: int, source: Iterator[Any]) -> Iterator[Any] | None:
        """Send items while credit lasts; None once the stream is ended."""
        while core.send_credit(call_id) > 0:
            try:
                item = next(source)
            except StopIteration:
                core.send_end(call_id)
                return None
            if not core.send_item(call_id, item):
                return None
        return source


def _sort_out(events: list[Message], call_id: int, backlog: dict[int, collections.deque[Message]]) -> list[Message]:
    """The events for call ``call_id``; those for the client's other calls in progress go to their backlogs.

    A GoAway concerns every call; a backlog keeps one of a run of them (the
    lowest ``last_id``), or a server repeating GoAway would grow it without
    end. Events for no call in progress (the late answer of a cancelled
    call) are dropped.
    """
    mine: list[Message] = []
    for event in events:
        if isinstance(event, GoAway):
            for other, kept in backlog.items():
                if other == call_id:
                    continue
                last = kept[-1] if kept else None
                if isinstance(last, GoAway):
                    if event.last_id < last.last_id:
                        kept[-1] = event
                else:
                    kept.append(event)
            mine.append(event)
        elif getattr(event, "id", None) == call_id:
            mine.append(event)
        else:
            waiting = backlog.get(getattr(event, "id", -1))
            if waiting is not None:
                waiting.append(event)
    return mine
