"""Soak: a server given round after round of mixed load and churn comes back to where it started.

Each round, over TLS: clients connect and leave; make unary calls; put the
same kv keys again and read them; open a kv watch and a topic subscription
and leave them mid-stream; abandon a server stream after one item; let calls
run past their deadlines and fail; and a hostile peer sends garbage, stops
TLS handshakes halfway, and drops connections without a word. Every answer
is checked. After each round, once its clients have gone, the server must
hold no more connections and file descriptors than before the first; and
past the warm-up rounds the Python objects it holds (``demo.live_blocks``)
and its resident memory must stay flat, so anything kept per connection or
per call shows as growth over the rounds.

CI runs ``ROUNDS`` rounds (about half a minute); the full size (``-m slow``)
runs ``SLOW_ROUNDS``.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from bastion import Client
from bastion.exceptions import DeadlineExceeded
from tests.support.raw import client_hello
from tests.support.server import ServerProcess, read_rss_kib, wait_for

ROUNDS = 8
SLOW_ROUNDS = 80
WARMUP_ROUNDS = 3  # caches, the SQLite page cache and the allocator's arenas settle in these
CLIENTS = 12  # connections per round
CALLS = 25  # unary calls per connection
#: Python memory blocks live in the server (after a collection) may grow this much from the end of
#: the warm-up to the last round: bounded caches still fill a little (about 25 blocks a round once
#: warm), where keeping anything per connection grows it by the connection (a principal kept by the
#: rate limiter for every closed connection grew it 900 blocks a round).
BLOCKS_SLACK = 1_500
SLOW_BLOCKS_SLACK = 6_000
#: Resident memory may grow this much (KiB) over the same rounds: a coarse check for memory the
#: interpreter does not count (C libraries), as the C allocator keeps freed memory for reuse.
RSS_SLACK_KIB = 16 * 1024
#: Every client is the admin: its rate limit (1,000 calls/s by default) is raised, not switched off.
SOAK_CONFIG = "[rate_limits]\nper_principal = { rate = 50000, burst = 50000 }\n"


async def a_client(address: str, token: str, n: int) -> None:
    async with Client(address, token=token, timeout=10) as client:
        for i in range(CALLS):
            assert await client.demo.echo(value=[n, i]) == [n, i]
        key = f"soak/{n}"
        version = await client.kv.put(key=key, value=b"v" * 200)
        got = await client.kv.get(key=key)
        assert (got["value"], got["version"]) == (b"v" * 200, version)

        watch = client.stream("kv.watch", prefix=key)
        assert (await anext(watch))["type"] == "start"
        await watch.aclose()  # type: ignore[attr-defined]

        subscription = client.stream("messages.subscribe", pattern=f"soak.{n}.>")
        subscribed = asyncio.ensure_future(anext(subscription))
        await asyncio.sleep(0)
        subscribed.cancel()  # left before any message: the subscription is cancelled
        with contextlib.suppress(asyncio.CancelledError):
            await subscribed
        await subscription.aclose()  # type: ignore[attr-defined]

        counted = client.stream("demo.count", n=100_000)
        assert await anext(counted) == 0
        await counted.aclose()  # type: ignore[attr-defined]  # abandoned after one item

        with pytest.raises(DeadlineExceeded):
            await client.invoke("demo.slow", {"seconds": 5}, timeout=0.05)
        assert await client.demo.echo(value="after") == "after"  # the connection still serves


def hostile(host: str, port: int) -> None:
    """Garbage where a TLS handshake belongs; a handshake stopped halfway; a connection dropped at once."""
    with socket.create_connection((host, port), timeout=5) as sock, contextlib.suppress(OSError):
        sock.sendall(b"\x00" * 64 + b"GET / HTTP/1.1\r\n\r\n")
        sock.recv(1024)
    with socket.create_connection((host, port), timeout=5) as sock:
        sock.sendall(client_hello())  # and then nothing
    with socket.create_connection((host, port), timeout=5):
        pass


async def one_round(server: ServerProcess) -> None:
    token = server.token
    await asyncio.gather(*(a_client(server.address, token, n) for n in range(CLIENTS)))
    await asyncio.to_thread(hostile, server.host, server.port)


def open_fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def soak(server: ServerProcess, rounds: int, blocks_slack: int) -> None:
    async def stats() -> dict[str, Any]:
        async with Client(server.address, token=server.token, timeout=10) as client:
            answer: dict[str, Any] = await client.admin.stats()
            return answer

    def settled(baseline_fds: int) -> Callable[[], bool]:
        def check() -> bool:
            return open_fds(server.pid) <= baseline_fds and asyncio.run(stats())["connections"] == 1

        return check

    asyncio.run(stats())  # the first connection's lazily made state is the baseline's
    baseline_fds = open_fds(server.pid)
    rss: list[int] = []
    blocks: list[int] = []

    async def live_blocks() -> int:
        async with Client(server.address, token=server.token, timeout=10) as client:
            return int(await client.demo.live_blocks())

    for n in range(rounds):
        asyncio.run(one_round(server))
        wait_for(settled(baseline_fds), 15, what=f"round {n}: connections and descriptors back to the baseline")
        rss.append(read_rss_kib(server.pid))
        blocks.append(asyncio.run(live_blocks()))
    counters = asyncio.run(stats())
    assert counters["internal_errors_total"] == 0, counters
    assert counters["calls_in_flight"] <= 1, counters  # the stats call itself
    warm = WARMUP_ROUNDS - 1
    assert blocks[-1] - blocks[warm] <= blocks_slack, f"live blocks grew after the warm-up (per round: {blocks})"
    assert rss[-1] - rss[warm] <= RSS_SLACK_KIB, f"RSS grew after the warm-up (KiB per round: {rss})"
    assert "Traceback" not in server.log(), server.log()[-3000:]


def soak_server(server_factory: Callable[..., ServerProcess], tmp_path: Path) -> ServerProcess:
    config = tmp_path / "soak.toml"
    config.write_text(SOAK_CONFIG)
    return server_factory({"BASTION_CONFIG": str(config)})


def test_rounds_of_load_and_churn_leave_no_connections_descriptors_or_memory_behind(
    server_factory: Callable[..., ServerProcess], tmp_path: Path
) -> None:
    soak(soak_server(server_factory, tmp_path), ROUNDS, BLOCKS_SLACK)


@pytest.mark.slow
def test_rounds_of_load_and_churn_full_size(server_factory: Callable[..., ServerProcess], tmp_path: Path) -> None:
    soak(soak_server(server_factory, tmp_path), SLOW_ROUNDS, SLOW_BLOCKS_SLACK)
