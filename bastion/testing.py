"""Test helpers: a real server and a real client, connected in memory.

Service tests need no sockets, ports or processes::

    import asyncio
    import bastion.testing
    from myapp import service

    def test_hello() -> None:
        async def main() -> None:
            async with bastion.testing.connect([service]) as client:
                assert await client.greeter.hello(name="Ada") == "Hello, Ada!"
        asyncio.run(main())

``connect`` builds a real ``Server`` (method table, dispatch, argument
validation, authorization, deadlines, flow control -- everything but the
listener) and a real async ``Client``, and joins them with the in-memory
transport of ``bastion.transport.memory``. Every byte still goes through the
protocol codec, so what passes here passes over TCP.

Identity. The in-memory server has no user store: each client is given the
``Principal`` it acts as, so tests can call as anyone. The default is
``TESTER``, an authenticated principal named ``tester`` with the ``admin``
role (which passes every role check); pass ``principal=ANONYMOUS`` to call as
an unauthenticated connection, or any ``Principal`` with the roles under test.

For several identities against one server, use ``MemoryServer``::

    async with bastion.testing.MemoryServer([service]) as memory:
        alice = memory.client(principal=Principal("alice", frozenset({"ops"})))
        guest = memory.client(principal=ANONYMOUS)
        ...

Clients made by a ``MemoryServer`` are closed when it closes.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Callable, Iterable
from typing import Final

from bastion.client.aio import Client
from bastion.config import ServerLimits
from bastion.exceptions import Unauthenticated
from bastion.security.authn import PeerInfo, new_token
from bastion.security.principal import ADMIN_ROLE, ANONYMOUS, Principal
from bastion.security.ratelimit import Limiter
from bastion.server.server import Server
from bastion.service import Service
from bastion.transport.aio import Link

__all__ = ["ANONYMOUS", "TESTER", "MemoryServer", "connect"]

#: The principal test clients act as unless told otherwise.
TESTER: Final = Principal("tester", frozenset({ADMIN_ROLE}), mechanism="testing")


class _Identities:
    """An ``Authenticator`` for in-memory clients: each one's token names its principal.

    The tokens are made here and never leave the process; an unknown token
    is refused as the real authenticators refuse one.
    """

    def __init__(self) -> None:
        self._by_token: dict[str, Principal] = {}

    def token_for(self, principal: Principal) -> str:
        token = new_token()
        self._by_token[token] = principal
        return token

    async def authenticate(self, token: str | None, peer: PeerInfo) -> Principal:
        if token is None:
            return ANONYMOUS
        principal = self._by_token.get(token)
        if principal is None:
            raise Unauthenticated("invalid token")
        return principal

    async def revalidate(self, principal: Principal) -> Principal | None:
        return principal


class MemoryServer:
    """A real ``Server`` without a listener; its clients connect in memory.

    ``services`` is a ``Service`` or an iterable of them (add
    ``bastion.services.admin.service`` to test against the admin service
    too). ``limits`` are the server's, as for ``Server``; ``limiter`` its
    call rate limiter (none by default: a ``RateLimiter`` to test rate
    limit rules). The underlying server is ``.server`` (for its
    ``stats()``, say).
    """

    def __init__(
        self,
        services: Service | Iterable[Service],
        *,
        limits: ServerLimits | None = None,
        limiter: Limiter | None = None,
    ) -> None:
        self._identities = _Identities()
        if isinstance(services, Service):
            services = [services]
        self.server = Server(services, limits=limits, authenticator=self._identities, limiter=limiter)
        self._clients: list[Client] = []
        # Seconds closing waits for calls still running before cancelling them.
        self.grace = 1.0

    async def __aenter__(self) -> MemoryServer:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()

    def client(self, *, principal: Principal | None = None, timeout: float | None = None) -> Client:
        """A new, not yet connected ``Client`` acting as ``principal`` (default ``TESTER``).

        It connects on first use (or ``await client.connect()``) and again
        after the server sends GoAway, each time over a new in-memory pair.
        """
        token = self._identities.token_for(principal if principal is not None else TESTER)
        client = Client("memory", token=token, timeout=timeout)
        client._connector = self._connect
        self._clients.append(client)
        return client

    async def _connect(self, client_protocol: Callable[[], Link]) -> None:
        self.server.connect_memory(client_protocol())

    async def aclose(self) -> None:
        """Close every client, then shut the server down."""
        for client in self._clients:
            await client.close()
        await self.server.shutdown(grace=self.grace)


@contextlib.asynccontextmanager
async def connect(
    services: Service | Iterable[Service],
    *,
    principal: Principal | None = None,
    limits: ServerLimits | None = None,
    timeout: float | None = None,
) -> AsyncIterator[Client]:
    """A connected ``Client`` to an in-memory server hosting ``services``.

    principal: who the client acts as (default ``TESTER``; ``ANONYMOUS`` for
    an unauthenticated connection). limits: the server's ``ServerLimits``.
    timeout: the client's default per-call timeout in seconds.
    """
    async with MemoryServer(services, limits=limits) as memory:
        client = memory.client(principal=principal, timeout=timeout)
        await client.connect()
        yield client
