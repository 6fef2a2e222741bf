"""The per-address connection caps count an IPv6 client by its /64, and an IPv4-mapped address as IPv4.

One host usually owns a whole IPv6 /64: keyed by the exact address, the cap
(``limits.max_connections_per_source``, ``gateway.max_connections_per_source``)
let such a host open as many connections as it has addresses -- 2**64. The
rate limits already grouped sources this way (``source_key``).
"""

from __future__ import annotations

import asyncio
import socket
from collections import Counter
from collections.abc import Callable
from typing import Any

import pytest

import bastion
from bastion import Client, Server
from bastion.config import ServerLimits
from bastion.gateway._gate import ConnectionGate
from bastion.protocol.proxy import Command, Family, ProxyHeader, build
from tests.server.test_proxy_protocol import relay, start, stats


def test_the_native_cap_counts_an_ipv6_64_as_one_source() -> None:
    async def main() -> Counter[str]:
        server = Server([], limits=ServerLimits(max_connections_per_source=2))
        pairs = [socket.socketpair() for _ in range(4)]
        try:
            # Real accepted sockets, as the accept loop hands them over, from four addresses of one /64.
            for i, (near, _) in enumerate(pairs[:3]):
                server._admit(near, (f"2001:db8:1:2::{i + 1}", 40000 + i, 0, 0))
            server._admit(pairs[3][0], ("2001:db8:1:3::1", 40003, 0, 0))  # another /64
            await asyncio.sleep(0)
            return Counter(server.counters)
        finally:
            await server.shutdown(grace=0)
            for near, far in pairs:
                near.close()
                far.close()

    counters = asyncio.run(main())
    assert counters["rejected_connections_per_source"] == 1


def test_the_gateway_cap_counts_an_ipv6_64_and_a_mapped_ipv4_address_as_one_source() -> None:
    gate = ConnectionGate(total=100, per_source=1, counters=Counter())
    assert gate.admit("2001:db8:1:2::1") is None
    assert gate.admit("2001:db8:1:2::ffff") is not None  # the same /64
    assert gate.admit("2001:db8:1:3::1") is None
    assert gate.admit("192.0.2.7") is None
    assert gate.admit("::ffff:192.0.2.7") is not None  # the same IPv4 client, as a dual-stack socket sees it
    gate.release("2001:db8:1:2::1")
    assert gate.admit("2001:db8:1:2::2") is None  # the slot given back is usable from the /64 again


def test_the_gateway_cap_counts_an_ipv6_client_by_the_configured_prefix() -> None:
    """With ``rate_limits.ipv6_prefix = 48`` (handed to the gate as the server's ``ipv6_prefix``), two /64s
    of one /48 are one source, as the rate limits count them; it used to be a fixed /64."""
    gate = ConnectionGate(total=100, per_source=1, counters=Counter(), ipv6_prefix=48)
    assert gate.admit("2001:db8:1:2::1") is None
    assert gate.admit("2001:db8:1:3::1") is not None  # another /64, the same /48
    assert gate.admit("2001:db8:2::1") is None  # another /48
    gate.release("2001:db8:1:2::1")
    assert gate.admit("2001:db8:1:ffff::9") is None


def test_the_native_cap_counts_an_ipv6_client_by_the_configured_prefix(server_factory: Any) -> None:
    """A real ``bastion serve`` with ``rate_limits.ipv6_prefix = 48`` behind a trusted proxy: clients from two
    /64s of one /48 (named by PROXY v2 headers) share the /48's ``max_connections_per_source``."""
    server = start(
        server_factory, BASTION_RATE_LIMITS__IPV6_PREFIX="48", BASTION_LIMITS__MAX_CONNECTIONS_PER_SOURCE="2"
    )

    def v6(host: str) -> Callable[[], bytes]:
        return lambda: build(ProxyHeader(Command.PROXY, Family.TCP6, (host, 7), ("::1", 9)))

    async def main() -> None:
        async with (
            relay(server, v6("2001:db8:1:1::1")) as first_64,
            relay(server, v6("2001:db8:1:2::1")) as second_64,
            relay(server, v6("2001:db8:2::1")) as other_48,
            Client(first_64, timeout=10) as first,
            Client(first_64, timeout=10) as second,
        ):
            await first.connect()
            await second.connect()
            with pytest.raises(bastion.ConnectError):
                async with Client(second_64, timeout=5, connect_timeout=5, retry=None) as third:
                    await third.connect()
            async with Client(other_48, token=server.token, timeout=10) as fourth:
                assert (await fourth.demo.echo(value=4)) == 4
        numbers = await stats(server)
        assert numbers["rejected_connections_per_source"] == 1

    asyncio.run(main())
