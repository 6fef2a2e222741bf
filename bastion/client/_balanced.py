"""A balanced async client's endpoints: picking one per call, connecting it, and health checks.

``BalancedEndpoints`` is the part of ``Client`` (bastion/client/aio.py) that
only a client given several addresses uses: the ``Balancer`` made on its
first call (host names resolved then), one ``_Slot`` per endpoint holding
its connection, the checkout that picks a connected endpoint for a call
(avoiding those the call already failed on), the half-open breaker's trial
call and the periodic ``admin.ready`` health checks.
"""

from __future__ import annotations

import asyncio
import random
import socket
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

from bastion.client._connection import NO_OPTIONS, ClientClosed, ClientConnection, wait_to_reconnect
from bastion.client.balancer import (
    Balancer,
    BreakerState,
    CircuitBreaker,
    Endpoint,
    ReconnectBackoff,
    expand_endpoints,
    trial_passed,
)
from bastion.exceptions import CallError, ConnectError, ConnectionClosed

if TYPE_CHECKING:
    from bastion.client._path import CallPath
    from bastion.client.policy import RetryPolicy

__all__ = ["BalancedEndpoints"]


#: How long a checkout waits for one endpoint's connection before it starts connecting to the next as
#: well (whichever is ready first takes the call): gRPC's "connection attempt delay" (gRFC A61), after
#: Happy Eyeballs (RFC 8305). An endpoint that accepts TCP but never answers the handshake then costs a
#: call this much, not its deadline.
CONNECT_ATTEMPT_DELAY = 0.25


class _Slot:
    """One endpoint of a balanced client, its connection, and the attempt at opening one, while it runs."""

    __slots__ = ("conn", "connecting", "endpoint")

    def __init__(self, endpoint: Endpoint) -> None:
        self.endpoint = endpoint
        self.conn: ClientConnection | None = None
        #: Shared by every call (and health check) that needs the connection meanwhile.
        self.connecting: asyncio.Future[ClientConnection] | None = None


def _retrieved(attempt: asyncio.Future[ClientConnection]) -> None:
    """An attempt's error is its waiters' to raise; none may be left to look."""
    if not attempt.cancelled():
        attempt.exception()


class BalancedEndpoints:
    """``Client``'s endpoints when it is balanced (see the module docstring)."""

    if TYPE_CHECKING:  # what it uses of Client (and ClientBase)
        _addresses: list[tuple[str, int]]
        _make_breaker: Callable[[], CircuitBreaker]
        _make_backoff: Callable[[], ReconnectBackoff]
        health_interval: float | None
        _path: CallPath
        _balancer: Balancer | None
        _slots: dict[int, _Slot]
        _health: asyncio.Task[None] | None

        @property
        def _retry(self) -> RetryPolicy | None: ...

        async def _open(
            self, host: str | None = None, port: int | None = None, hostname: str | None = None
        ) -> ClientConnection: ...

    async def _endpoints(self) -> Balancer:
        """The balancer, made on first use (host names resolved then)."""
        if self._balancer is None:
            loop = asyncio.get_running_loop()
            resolved: dict[tuple[str, int], list[str]] = {}
            for host, port in self._addresses:
                try:
                    infos = await loop.getaddrinfo(host, port, type=socket.SOCK_STREAM)
                except OSError as exc:
                    raise ConnectError(f"cannot resolve {host}: {exc.strerror or exc}") from None
                resolved[host, port] = list(dict.fromkeys(str(info[4][0]) for info in infos))
            if self._balancer is None:
                endpoints = expand_endpoints(
                    self._addresses, lambda h, p: resolved[h, p], self._make_breaker, self._make_backoff
                )
                self._balancer = Balancer(endpoints, random=self._random)
                self._slots = {id(e): _Slot(e) for e in endpoints}
                if self.health_interval is not None:
                    self._health = asyncio.ensure_future(self._health_loop(self.health_interval))
        return self._balancer

    @property
    def endpoints(self) -> list[Endpoint]:
        """The endpoints of a balanced client (empty before its first call)."""
        return list(self._balancer.endpoints) if self._balancer is not None else []

    async def _checkout(self, tried: Sequence[Endpoint]) -> tuple[_Slot, ClientConnection]:
        """A connected endpoint for the next call: picked, avoiding ``tried``; others tried if it cannot connect.

        ``tried`` is a preference: when every other endpoint cannot be
        reached, the call goes back to one it already failed on (that one
        answered, if retryably), rather than failing with a connect error.
        An endpoint still connecting after ``CONNECT_ATTEMPT_DELAY`` is not
        given up: the next one is tried alongside it, and the first
        connected takes the call. Each endpoint's attempt is shared by
        every call waiting for it, and counts once with its breaker.
        """
        balancer = await self._endpoints()
        failed: list[Endpoint] = []  # could not connect, in this checkout
        waiting: dict[asyncio.Future[ClientConnection], _Slot] = {}  # attempts under way, for this call
        error: BaseException | None = None
        while True:
            endpoint = None
            hurry = False  # the attempt just started waits out a backoff: try the next endpoint alongside at once
            if len(failed) + len(waiting) < len(balancer.endpoints):
                skip = [*failed, *(slot.endpoint for slot in waiting.values())]
                avoid = [*skip, *tried]
                # Endpoints still connecting only if none is connected (gRPC picks READY subchannels only).
                busy = [e for e in balancer.endpoints if e not in avoid and self._slots[id(e)].connecting is not None]
                endpoint = balancer.pick([*avoid, *busy])
                if endpoint in avoid or endpoint in busy:
                    endpoint = balancer.pick(avoid)
                if endpoint in skip:
                    endpoint = balancer.pick(skip)  # only endpoints this call already tried are left
                    if endpoint in skip:
                        endpoint = None
            if endpoint is not None:
                slot = self._slots[id(endpoint)]
                conn = slot.conn
                if conn is not None and conn.usable:
                    attempt: asyncio.Future[ClientConnection] = asyncio.get_running_loop().create_future()
                    attempt.set_result(conn)
                else:
                    try:
                        attempt = self._slot_attempt(slot)
                    except ConnectError as exc:  # draining
                        failed.append(endpoint)
                        error = exc
                        continue
                    hurry = endpoint.backoff.delay() > 0
                waiting[attempt] = slot
            elif not waiting:
                assert error is not None
                raise error
            more = len(failed) + len(waiting) < len(balancer.endpoints)
            done, _ = await asyncio.wait(
                waiting,
                timeout=(0 if hurry else CONNECT_ATTEMPT_DELAY) if more else None,
                return_when=asyncio.FIRST_COMPLETED,
            )
            for attempt in done:
                slot = waiting.pop(attempt)
                endpoint = slot.endpoint
                try:
                    conn = attempt.result()
                    if endpoint.breaker.state is not BreakerState.CLOSED and not await self._probe(slot, conn):
                        raise ConnectError(f"{endpoint.address} is not ready")
                except asyncio.CancelledError:
                    if not attempt.cancelled():
                        raise  # this call was cancelled (in the probe), not the attempt
                    raise ClientClosed("the client was closed") from None  # close() ended the attempt
                except ConnectError as exc:
                    failed.append(endpoint)
                    error = exc
                    continue
                return slot, conn

    def _slot_attempt(self, slot: _Slot) -> asyncio.Future[ClientConnection]:
        """The attempt at connecting ``slot``'s endpoint: the one under way, or a new one.

        ConnectError at once if the endpoint is draining (its breaker trips:
        elsewhere for a while). A failed attempt counts once with the breaker,
        however many calls waited for it.
        """
        conn = slot.conn
        if conn is not None and conn.went_away:
            slot.endpoint.breaker.trip()
            slot.conn = None
            raise ConnectError(f"{slot.endpoint.address} is draining")
        if slot.connecting is not None and slot.connecting.get_loop().is_closed():
            slot.connecting = None  # begun on an event loop since closed: it will never finish
        if slot.connecting is None:
            slot.connecting = asyncio.ensure_future(self._connect_slot(slot))
            slot.connecting.add_done_callback(_retrieved)
        return slot.connecting

    async def _connect_slot(self, slot: _Slot) -> ClientConnection:
        """Connect ``slot``'s endpoint, after its reconnect backoff if the last attempt failed or was lost."""
        endpoint = slot.endpoint
        backoff = endpoint.backoff
        try:
            lost, slot.conn = slot.conn, None  # not usable, or we would not be here
            await wait_to_reconnect(backoff, lost)
            conn = slot.conn = await self._open(endpoint.host, endpoint.port, endpoint.server_hostname)
            backoff.on_success()
            health = self._health
            if self.health_interval is not None and health is not None and health.get_loop() is not conn.loop:
                # the health checks ran on an event loop since closed (``asyncio.run`` ended): run them on this one
                self._health = asyncio.ensure_future(self._health_loop(self.health_interval))
            return conn
        except ConnectError:
            backoff.on_failure()
            endpoint.breaker.on_failure()
            raise
        except CallError:  # the handshake refused (too many connections, say)
            backoff.on_failure()
            raise
        finally:
            slot.connecting = None

    async def _slot_connection(self, slot: _Slot) -> ClientConnection:
        conn = slot.conn
        if conn is not None and conn.usable:
            return conn
        return await asyncio.shield(self._slot_attempt(slot))

    async def _probe(self, slot: _Slot, conn: ClientConnection) -> bool:
        """A half-open endpoint's trial: ``admin.ready``; the breaker learns the answer."""
        breaker = slot.endpoint.breaker
        if not breaker.begin_trial():
            return breaker.state is BreakerState.CLOSED
        try:
            ok = trial_passed(await self._path.call_on(conn, "admin.ready", {}, 2.0, 2.0, NO_OPTIONS, None), None)
        except (CallError, ConnectionClosed, ConnectError) as exc:
            ok = trial_passed(None, exc)
        if ok:
            breaker.on_success()
        else:
            breaker.trip()
        return ok

    async def _health_loop(self, interval: float) -> None:
        """Every ``interval`` seconds, give or take half: ``admin.ready`` on every endpoint whose breaker is not open.

        Each wait is drawn uniformly from ``[interval / 2, 3 * interval / 2]``
        (the client's retry randomness): clients started together -- a fleet
        deployed at once -- would otherwise probe every server in lockstep.
        """
        random = self._random
        while True:
            await asyncio.sleep(interval * (0.5 + random()))
            await asyncio.gather(*(self._check(slot, interval) for slot in list(self._slots.values())))

    async def _check(self, slot: _Slot, interval: float) -> None:
        breaker = slot.endpoint.breaker
        if breaker.state is BreakerState.OPEN:
            return
        conn = slot.conn
        if (conn is None or not conn.usable) and slot.endpoint.backoff.delay() > 0:
            return  # reconnecting after a backoff: a check would only wait for it (calls reconnect it)
        try:
            conn = await self._slot_connection(slot)
        except ConnectError:
            return  # counted with the breaker by the attempt (or draining: tripped)
        if breaker.state is BreakerState.HALF_OPEN:
            await self._probe(slot, conn)
            return
        try:
            answer = await self._path.call_on(
                conn, "admin.ready", {}, min(2.0, interval), min(2.0, interval), NO_OPTIONS, None
            )
        except (ConnectionClosed, ConnectError):
            breaker.on_failure()
            return
        except CallError:
            return  # e.g. no admin service: health checks say nothing here
        if isinstance(answer, dict) and answer.get("ready") is False:
            breaker.trip()

    @property
    def _random(self) -> Callable[[], float]:
        return self._retry.random if self._retry is not None else random.random
