"""After a storm of connections, the server gives the heap it left behind back to the kernel.

Thousands of TLS handshakes stopped halfway (a ClientHello, then the
connection dropped) against a real ``bastion serve`` grow its resident size
by tens of MB that glibc keeps as holes in its heap: nothing leaks, and
without a trim it stays there. The server's ``HeapTrimmer``
(bastion/server/memtrim.py) sees the connections close and trims within a
check interval: the resident size comes back near where it was before the
storm, and ``admin.stats`` counts the trim and the bytes it released.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import sys
from collections.abc import Callable
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from bastion import Client
from bastion.exceptions import ConnectError
from bastion.server.memtrim import TRIM_AFTER_CLOSED, TRIM_CHECK, TRIM_INTERVAL
from tests.support.raw import client_hello
from tests.support.server import ServerProcess, read_rss_kib, wait_for

pytestmark = pytest.mark.skipif(
    not sys.platform.startswith("linux") or os.confstr("CS_GNU_LIBC_VERSION") is None, reason="glibc only"
)

STORM = 3_000  # connections in the CI storm (about 3 s on loopback, about 20 MB of heap)
SLOW_STORM = 20_000
#: The storm must have grown the server by this much (KiB) for the test to show anything.
MIN_GROWTH_KIB = 6 * 1024
WAVE = 200  # under limits.max_connections_per_source (256)
HTTP = ("--http-port", "0")  # the gateway, for /metrics
#: A wave's connections are all in their handshake at once: past the default max_handshakes_per_source (64).
ENV = {"BASTION_LIMITS__MAX_HANDSHAKES_PER_SOURCE": str(WAVE)}


def storm(server: ServerProcess, n: int) -> None:
    """``n`` connections in waves of ``WAVE`` open at once, each sending a ClientHello; then all
    dropped. Each wave comes from a loopback address of its own (127.0.1.x), as a storm comes from
    many clients: from one, most would be refused at accept by ``limits.max_connections_per_source``
    while the server is still closing the last wave's, allocating nothing."""
    hello = client_hello()
    for start in range(0, n, WAVE):
        source = (f"127.0.1.{start // WAVE % 250 + 1}", 0)
        with contextlib.ExitStack() as wave:
            for _ in range(min(WAVE, n - start)):
                try:
                    address = (server.host, server.port)
                    sock = wave.enter_context(socket.create_connection(address, timeout=5, source_address=source))
                    sock.sendall(hello)
                except OSError:  # refused or reset under load: the storm goes on
                    pass


def stats(server: ServerProcess) -> dict[str, Any]:
    async def ask() -> dict[str, Any]:
        async with Client(server.address, token=server.token, timeout=10) as client:
            answer: dict[str, Any] = await client.admin.stats()
            return answer

    return asyncio.run(ask())


def storm_and_recover(server: ServerProcess, n: int) -> None:
    assert n >= 10 * TRIM_AFTER_CLOSED
    assert stats(server).get("memory_trims_total", 0) == 0  # nothing to trim after start-up
    baseline = read_rss_kib(server.pid)
    storm(server, n)

    def settled() -> bool:
        try:
            return bool(stats(server)["connections_open"] <= 1)
        except ConnectError:  # refused while the storm's connections still hold the per-source limit
            return False

    wait_for(settled, 30, interval=0.2, what="the storm's connections to close")
    grown = read_rss_kib(server.pid)
    growth = grown - baseline
    assert growth >= MIN_GROWTH_KIB, f"the storm grew the server only {baseline} -> {grown} KiB"
    # Within a check interval, or the trim interval when a long storm was trimmed while it lasted.
    bound = baseline + growth // 3

    def back() -> bool:
        return read_rss_kib(server.pid) <= bound

    wait_for(
        back, TRIM_INTERVAL + TRIM_CHECK + 10, interval=0.2, what=f"RSS {baseline} -> {grown} KiB back under {bound}"
    )
    counted = stats(server)
    assert counted["memory_trims_total"] >= 1, counted
    assert counted["memory_trimmed_bytes_total"] >= (growth // 3) * 1024, counted
    assert counted["internal_errors_total"] == 0, counted
    scraped = {
        sample.name: sample.value
        for family in text_string_to_metric_families(server.scrape())
        for sample in family.samples
        if sample.name.startswith("bastion_memory_")
    }
    assert scraped["bastion_memory_trims_total"] == counted["memory_trims_total"], scraped
    assert scraped["bastion_memory_trimmed_bytes_total"] == counted["memory_trimmed_bytes_total"], scraped
    assert "Traceback" not in server.log(), server.log()[-3000:]


def test_a_storm_of_dropped_handshakes_leaves_no_resident_memory_behind(
    server_factory: Callable[..., ServerProcess],
) -> None:
    storm_and_recover(server_factory(ENV, args=HTTP), STORM)


@pytest.mark.slow
def test_a_storm_of_dropped_handshakes_full_size(server_factory: Callable[..., ServerProcess]) -> None:
    storm_and_recover(server_factory(ENV, args=HTTP), SLOW_STORM)
