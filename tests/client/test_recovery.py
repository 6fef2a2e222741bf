"""Balanced clients come back to a recovered server that has no admin service (no ``admin.ready`` to probe).

Two real ``bastion.Server``s on free loopback ports, each on its own event
loop in a thread, serving one public method and nothing else. Server A goes
down until the client's breaker for it opens, comes back on the same port,
and its breaker half-opens (the breakers' clock is the test's); then B goes
down. A is up and answering: the calls must go there. (The calls are
declared idempotent: one sent on a connection the server is just closing
may be retried.)
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable, Coroutine, Iterator
from typing import Any

import pytest

from bastion import Server, Service, SyncClient
from bastion.client.aio import Client
from bastion.client.balancer import BreakerState, CircuitBreaker, Endpoint

service = Service("demo")


@service.method(public=True)
async def echo(value: int) -> int:
    return value


class Replicas:
    """Servers on one event loop in a thread; each can be stopped and started again on its port."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.servers: dict[int, Server] = {}

    def run(self, coro: Coroutine[Any, Any, Any]) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(10)

    def start(self, port: int = 0) -> int:
        async def start() -> Server:
            server = Server([service])
            await server.start("127.0.0.1", port)
            return server

        server = self.run(start())
        self.servers[server.port] = server
        return int(server.port)

    def stop(self, port: int) -> None:
        self.run(self.servers.pop(port).shutdown(grace=0))

    def close(self) -> None:
        for port in list(self.servers):
            self.stop(port)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5)
        self.loop.close()


@pytest.fixture
def replicas() -> Iterator[Replicas]:
    replicas = Replicas()
    yield replicas
    replicas.close()


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def breakers(clock: Clock) -> Callable[[], CircuitBreaker]:
    return lambda: CircuitBreaker(failure_threshold=1, reset_timeout=5.0, max_reset_timeout=5.0, clock=clock)


def by_port(endpoints: list[Endpoint]) -> dict[int, Endpoint]:
    return {e.port: e for e in endpoints}


def test_the_sync_client_returns_to_a_recovered_server_without_admin(replicas: Replicas) -> None:
    a, b = replicas.start(), replicas.start()
    clock = Clock()
    with SyncClient([f"127.0.0.1:{a}", f"127.0.0.1:{b}"], insecure=True, timeout=5, breaker=breakers(clock)) as client:
        assert client.call("demo.echo", value=1) == 1
        replicas.stop(a)
        for value in range(100):  # each call picks afresh, until one has picked A and found it down
            client.close()
            assert client.invoke("demo.echo", {"value": value}, idempotent=True) == value
            if by_port(client.endpoints)[a].breaker.state is BreakerState.OPEN:
                break
        assert by_port(client.endpoints)[a].breaker.state is BreakerState.OPEN
        replicas.start(a)
        clock.now += 10  # past the reset timeout: A's next connection is its trial
        assert by_port(client.endpoints)[a].breaker.state is BreakerState.HALF_OPEN
        replicas.stop(b)
        client.close()
        for value in range(5):
            assert client.invoke("demo.echo", {"value": value}, idempotent=True) == value
        assert by_port(client.endpoints)[a].breaker.state is BreakerState.CLOSED


def test_the_async_client_returns_to_a_recovered_server_without_admin(replicas: Replicas) -> None:
    a, b = replicas.start(), replicas.start()
    clock = Clock()

    async def main() -> None:
        addresses = [f"127.0.0.1:{a}", f"127.0.0.1:{b}"]
        async with Client(addresses, insecure=True, timeout=5, breaker=breakers(clock), health_interval=None) as client:
            assert await client.call("demo.echo", value=1) == 1
            await asyncio.to_thread(replicas.stop, a)
            for value in range(100):  # until a call has picked A and found it down
                assert await client.invoke("demo.echo", {"value": value}, idempotent=True) == value
                if by_port(client.endpoints)[a].breaker.state is BreakerState.OPEN:
                    break
            assert by_port(client.endpoints)[a].breaker.state is BreakerState.OPEN
            await asyncio.to_thread(replicas.start, a)
            clock.now += 10
            assert by_port(client.endpoints)[a].breaker.state is BreakerState.HALF_OPEN
            await asyncio.to_thread(replicas.stop, b)
            for value in range(5):
                assert await client.invoke("demo.echo", {"value": value}, idempotent=True) == value
            assert by_port(client.endpoints)[a].breaker.state is BreakerState.CLOSED

    asyncio.run(main())
