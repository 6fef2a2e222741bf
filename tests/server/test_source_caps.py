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

from bastion import Server
from bastion.config import ServerLimits
from bastion.gateway._gate import ConnectionGate


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
