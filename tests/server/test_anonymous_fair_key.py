"""An anonymous caller's scheduler queue is keyed by its source as the rate limits count it.

The fair key is the source's ``/rate_limits.ipv6_prefix`` network (the server's
``ipv6_prefix``), not always its /64: with ``ipv6_prefix = 48`` one /48 is one
source to the rate limits, and must be one fair queue too, not 65,536 of them.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable

import pytest

from bastion import Client, Server
from bastion.exceptions import UsageError
from bastion.server.session import ServerSession
from bastion.services import admin
from bastion.transport.aio import Link


async def _anonymous_keys(server: Server, peers: list[str]) -> list[str]:
    clients = []
    for peer in peers:
        client = Client("memory")

        async def connect(protocol: Callable[[], Link], peer: str = peer) -> None:
            server.connect_memory(protocol(), peer=peer)

        client._connector = connect
        await client.connect()
        clients.append(client)
    try:
        sessions = sorted(server.sessions, key=lambda s: s.peer_host or "")
        assert all(isinstance(s, ServerSession) for s in sessions)
        return [s.anonymous_key for s in sessions]
    finally:
        for client in clients:
            await client.close()
        await server.shutdown(grace=0)


def test_the_anonymous_fair_key_uses_the_configured_ipv6_prefix() -> None:
    peers = ["[2001:db8:1:2::5]:4000", "[2001:db8:1:3::5]:4001", "192.0.2.7:4002"]
    keys = asyncio.run(asyncio.wait_for(_anonymous_keys(Server([admin.service], ipv6_prefix=48), peers), 10))
    assert sorted(keys) == ["anonymous@192.0.2.7", "anonymous@2001:db8:1::/48", "anonymous@2001:db8:1::/48"]


def test_the_default_prefix_is_a_64() -> None:
    peers = ["[2001:db8:1:2::5]:4000", "[2001:db8:1:2::6]:4001"]
    keys = asyncio.run(asyncio.wait_for(_anonymous_keys(Server([admin.service]), peers), 10))
    assert keys == ["anonymous@2001:db8:1:2::/64"] * 2


@pytest.mark.parametrize("prefix", [0, 129])
def test_an_ipv6_prefix_out_of_range_is_refused(prefix: int) -> None:
    with pytest.raises(UsageError, match="ipv6_prefix"):
        Server([], ipv6_prefix=prefix)
