"""A balanced client's background health checks (``admin.ready``), against real TCP servers."""

from __future__ import annotations

import asyncio
import time

from bastion import Client
from tests.adversity.test_hostile_peers import poll
from tests.support.hostile_server import RESULT, HostileServer, Peer


def test_health_checks_of_clients_started_together_are_spread_out() -> None:
    """Every balanced client checked its endpoints exactly ``health_interval`` after its first call: a
    fleet started together (a deploy) probed every server in lockstep, forever. The waits are jittered."""
    first_check: dict[int, float] = {}  # id(peer) -> when its first admin.ready came

    async def ready(peer: Peer) -> None:
        await peer.handshake()
        while True:
            call = await peer.read_call()
            if call[2] == "admin.ready":
                first_check.setdefault(id(peer), time.monotonic())
            peer.send(RESULT, call[1], {"ready": True})

    async def main(*servers: HostileServer) -> None:
        clients = [
            Client([s.address for s in servers], insecure=True, timeout=5, health_interval=0.5) for _ in range(8)
        ]
        await asyncio.gather(*(client.call("x.y") for client in clients))
        await poll(lambda: len(first_check) == 16, "every client's first health checks", timeout=10)
        for client in clients:
            await client.close()

    with HostileServer(ready) as one, HostileServer(ready) as other:
        asyncio.run(main(one, other))
    times = sorted(first_check.values())
    assert times[-1] - times[0] > 0.15, times  # in lockstep they all came within a few milliseconds
