"""Reconnecting backs off: exponential, full jitter, capped, reset by a connection that stays up.

Without it a client whose server is down -- or refuses it, or accepts and
drops every connection -- made a new attempt for every call, at once: a
restarting server was hammered by every client's retries. The servers here
are real TCP peers (tests/support/hostile_server.py) that count the
connections they get.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

import pytest

from bastion import Client, SyncClient
from bastion.client.balancer import ReconnectBackoff
from bastion.exceptions import ConnectError, ConnectionClosed, DeadlineExceeded, UsageError
from bastion.status import Status
from tests.support.hostile_server import RESULT, HostileServer, Peer

#: What a client that retried at once would pile up in ``TRYING`` seconds: hundreds of connections.
TRYING = 1.5
#: What the default backoff allows in that time (its waits grow 0.1, 0.2, 0.4, 0.8 s...), with room.
BOUNDED = 15


def run(coro: Any) -> Any:
    async def guarded() -> Any:
        async with asyncio.timeout(30):
            return await coro

    return asyncio.run(guarded())


async def slam_the_door(peer: Peer) -> None:
    """Accept the connection and close it at once: a server that is broken (or not yet ready)."""


async def welcome_then_drop(peer: Peer) -> None:
    """Complete the handshake, then drop the connection at the first call: a server crash-looping."""
    await peer.handshake()
    await peer.read_call()


async def echo(peer: Peer) -> None:
    await peer.handshake()
    while True:
        call = await peer.read_call()
        peer.send(RESULT, call[1], call[1])


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_the_backoff_is_exponential_with_full_jitter_capped_and_reset_on_success() -> None:
    clock = Clock()
    draws = iter([0.5, 0.999, 0.999, 0.999, 0.999, 0.25])
    backoff = ReconnectBackoff(base_delay=0.1, max_delay=0.5, clock=clock, random=lambda: next(draws))
    assert backoff.delay() == 0  # the first attempt goes at once
    waits = []
    for _ in range(5):
        backoff.on_failure()
        waits.append(round(backoff.delay(), 4))
    assert waits == [0.05, 0.1998, 0.3996, 0.4995, 0.4995]  # uniform in [0, min(0.5, 0.1 * 2**(n-1))]
    clock.now += 0.3
    assert backoff.delay() == pytest.approx(0.1995)  # time passing counts
    backoff.on_success()
    assert (backoff.failures, backoff.delay()) == (0, 0)
    clock.now += 10  # the connection lived: its loss starts again from the first step
    backoff.on_lost()
    assert (backoff.failures, backoff.delay()) == (1, pytest.approx(0.025))
    with pytest.raises(UsageError):
        ReconnectBackoff(base_delay=0)


def test_a_connection_lost_soon_after_opening_does_not_reset_the_backoff() -> None:
    clock = Clock()
    backoff = ReconnectBackoff(base_delay=0.1, max_delay=5.0, clock=clock, random=lambda: 0.5)
    for _ in range(4):
        backoff.on_failure()
    backoff.on_success()
    clock.now += 0.5
    backoff.on_lost()  # up for half a second: a server that accepts and drops
    assert backoff.failures == 5
    assert backoff.delay() == pytest.approx(0.5 * 1.6)


@pytest.mark.parametrize("script", [slam_the_door, welcome_then_drop], ids=["refused", "dropped"])
def test_a_single_address_client_backs_off_from_a_server_that_fails_it(script: Any) -> None:
    async def main(server: HostileServer) -> None:
        client = Client(server.address, insecure=True, timeout=0.5, retry=None)
        stop = time.monotonic() + TRYING
        while time.monotonic() < stop:
            with pytest.raises((ConnectError, ConnectionClosed, DeadlineExceeded)):
                await client.call("x.y")
        await client.close()

    with HostileServer(script) as server:
        run(main(server))
        assert 2 <= len(server.peers) <= BOUNDED, len(server.peers)


def test_the_sync_client_backs_off_from_a_server_that_fails_it() -> None:
    with HostileServer(slam_the_door) as server:
        client = SyncClient(server.address, insecure=True, timeout=0.5, retry=None)
        stop = time.monotonic() + TRYING
        while time.monotonic() < stop:
            with pytest.raises((ConnectError, DeadlineExceeded)):
                client.call("x.y")
        client.close()
        assert 2 <= len(server.peers) <= BOUNDED, len(server.peers)


def test_a_balanced_client_backs_off_from_every_endpoint() -> None:
    async def main(*servers: HostileServer) -> None:
        client = Client([s.address for s in servers], insecure=True, timeout=0.5, retry=None, health_interval=None)
        stop = time.monotonic() + TRYING
        while time.monotonic() < stop:
            with pytest.raises((ConnectError, DeadlineExceeded)):
                await client.call("x.y")
        await client.close()

    with HostileServer(slam_the_door) as one, HostileServer(slam_the_door) as other:
        run(main(one, other))
        for server in (one, other):
            assert 1 <= len(server.peers) <= BOUNDED, len(server.peers)


def long_backoff() -> ReconnectBackoff:
    return ReconnectBackoff(base_delay=5.0, max_delay=5.0, random=lambda: 0.99)


def test_a_call_waiting_out_a_backoff_fails_at_its_own_deadline() -> None:
    """The backoff is no excuse to overrun a deadline: the call fails DEADLINE_EXCEEDED when it passes,
    saying it was waiting to reconnect, and the server sees no second attempt meanwhile."""

    async def main(server: HostileServer) -> None:
        client = Client(server.address, insecure=True, timeout=0.3, retry=None, reconnect=long_backoff)
        with pytest.raises(ConnectError):
            await client.call("x.y")  # the first attempt: at once
        start = time.monotonic()
        with pytest.raises(DeadlineExceeded, match=r"no connection within 0\.3s .*to reconnect") as caught:
            await client.call("x.y")
        assert 0.25 < time.monotonic() - start < 1.5
        assert caught.value.status is Status.DEADLINE_EXCEEDED
        assert len(server.peers) == 1
        await client.close()

    with HostileServer(slam_the_door) as server:
        run(main(server))


def test_a_sync_call_waiting_out_a_backoff_fails_at_its_own_deadline() -> None:
    with HostileServer(slam_the_door) as server:
        client = SyncClient(server.address, insecure=True, timeout=0.3, retry=None, reconnect=long_backoff)
        with pytest.raises(ConnectError):
            client.call("x.y")
        start = time.monotonic()
        with pytest.raises(DeadlineExceeded, match=r"no connection within 0\.3s .*to reconnect"):
            client.call("x.y")
        assert 0.25 < time.monotonic() - start < 1.5
        assert len(server.peers) == 1
        client.close()


def test_a_connection_that_opens_resets_the_backoff() -> None:
    backoff = ReconnectBackoff(base_delay=0.01, max_delay=0.05)
    failing = [True]

    async def flaky(peer: Peer) -> None:
        if not failing[0]:
            await echo(peer)

    async def main(server: HostileServer) -> None:
        client = Client(server.address, insecure=True, timeout=2, retry=None, reconnect=lambda: backoff)
        for _ in range(3):
            with pytest.raises(ConnectError):
                await client.call("x.y")
        assert backoff.failures == 3
        failing[0] = False
        assert await client.call("x.y") == 1
        assert backoff.failures == 0
        await client.close()

    with HostileServer(flaky) as server:
        run(main(server))
