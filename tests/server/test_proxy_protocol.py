"""PROXY protocol v2 on a real ``bastion serve`` (TLS), from trusted and untrusted addresses.

The server trusts 127.0.0.2 only (``BASTION_TRUSTED_PROXIES``). A small
relay in the test plays the load balancer: it accepts the client, connects
to the server from a chosen loopback address, writes a PROXY v2 header
naming whatever client address the test wants, then copies bytes both ways
(the TLS handshake passes through it untouched, as through HAProxy in TCP
mode). Raw sockets send broken headers.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
import struct
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest

import bastion
from bastion import Client
from bastion.protocol.proxy import SIGNATURE, Command, Family, ProxyHeader, build
from tests.support.server import ServerProcess, wait_for

PROXY_ADDRESS = "127.0.0.2"  # the one address the servers here trust
UNTRUSTED_ADDRESS = "127.0.0.3"


def start(server_factory: Callable[..., ServerProcess], **env: str) -> ServerProcess:
    return server_factory(env={"BASTION_TRUSTED_PROXIES": f"{PROXY_ADDRESS},10.9.0.0/16", **env})


def audit_peers(server: ServerProcess, event: str) -> list[str]:
    path = server.data_dir / "audit.log"
    if not path.exists():
        return []
    records = [json.loads(line) for line in path.read_text().splitlines()]
    return [record["peer"] for record in records if record["event"] == event]


@contextlib.asynccontextmanager
async def relay(server: ServerProcess, header: Callable[[], bytes], source: str = PROXY_ADDRESS) -> AsyncIterator[str]:
    """A TCP relay to ``server`` that opens every upstream connection from ``source`` with ``header()``."""
    tasks: set[asyncio.Task[None]] = set()

    async def pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(OSError):
            while data := await reader.read(65536):
                writer.write(data)
                await writer.drain()
        writer.close()

    async def handle(client_reader: asyncio.StreamReader, client_writer: asyncio.StreamWriter) -> None:
        try:
            up_reader, up_writer = await asyncio.open_connection(server.host, server.port, local_addr=(source, 0))
        except OSError:
            client_writer.close()
            return
        up_writer.write(header())
        for task in (pipe(client_reader, up_writer), pipe(up_reader, client_writer)):
            tasks.add(t := asyncio.get_running_loop().create_task(task))
            t.add_done_callback(tasks.discard)

    listener = await asyncio.start_server(handle, "127.0.0.1", 0)
    port = listener.sockets[0].getsockname()[1]
    try:
        yield f"127.0.0.1:{port}"
    finally:
        listener.close()
        for task in list(tasks):
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


def proxy_header(host: str, port: int) -> Callable[[], bytes]:
    return lambda: build(ProxyHeader(Command.PROXY, Family.TCP4, (host, port), ("127.0.0.1", 9)))


async def stats(server: ServerProcess) -> dict[str, Any]:
    async with Client(server.address, token=server.token, timeout=10) as admin:
        return dict(await admin.admin.stats())


async def failed_login(address: str) -> None:
    async with Client(address, timeout=10, retry=None) as client:
        with pytest.raises(bastion.Unauthenticated):
            await client.auth.login(username="nobody", password="not-the-password")


def test_the_server_sees_the_address_the_header_carries(server_factory: Any) -> None:
    server = start(server_factory)

    async def main() -> None:
        async with relay(server, proxy_header("203.0.113.7", 4321)) as address:
            await failed_login(address)
            async with Client(address, token=server.token, timeout=10) as client:  # TLS passes through the relay
                assert (await client.demo.echo(value="through the relay")) == "through the relay"
        # The login throttle and the audit log saw the client the header named, not the relay.
        assert audit_peers(server, "auth.login_failure") == ["203.0.113.7:4321"]
        # IPv6 clients, from a proxy inside a trusted CIDR? Only the loopback exists here; a TCP6 header will do.
        v6 = lambda: build(ProxyHeader(Command.PROXY, Family.TCP6, ("2001:db8::5", 7), ("::1", 9)))  # noqa: E731
        async with relay(server, v6) as address:
            await failed_login(address)
        assert audit_peers(server, "auth.login_failure")[-1] == "2001:db8::5:7"
        numbers = await stats(server)
        assert numbers["proxied_connections_total"] == 3
        assert numbers["rejected_proxy_header_total"] == 0

    asyncio.run(main())


def test_a_local_header_keeps_the_proxys_own_address(server_factory: Any) -> None:
    server = start(server_factory)

    async def main() -> None:
        async with relay(server, lambda: build(ProxyHeader(Command.LOCAL))) as address:
            await failed_login(address)
        (peer,) = audit_peers(server, "auth.login_failure")
        assert peer.startswith(f"{PROXY_ADDRESS}:")

    asyncio.run(main())


def test_the_per_source_limit_counts_the_carried_address(server_factory: Any) -> None:
    server = start(server_factory, BASTION_LIMITS__MAX_CONNECTIONS_PER_SOURCE="2")

    async def main() -> None:
        async with (
            relay(server, proxy_header("198.51.100.1", 1000)) as same,
            relay(server, proxy_header("198.51.100.2", 1000)) as other,
            Client(same, timeout=10) as first,
            Client(same, timeout=10) as second,
        ):
            await first.connect()
            await second.connect()
            with pytest.raises(bastion.ConnectError):
                async with Client(same, timeout=5, connect_timeout=5, retry=None) as third:
                    await third.connect()
            # The relay's own address (2 connections already) is not what is limited: another client is fine.
            async with Client(other, token=server.token, timeout=10) as fourth:
                assert (await fourth.demo.echo(value=4)) == 4
        numbers = await stats(server)
        assert numbers["rejected_connections_per_source"] == 1
        assert numbers["proxied_connections_total"] == 3

    asyncio.run(main())


def test_a_header_from_an_untrusted_address_is_not_honoured(server_factory: Any) -> None:
    server = start(server_factory)

    async def main() -> None:
        async with relay(server, proxy_header("203.0.113.9", 1), source=UNTRUSTED_ADDRESS) as address:
            with pytest.raises(bastion.ConnectError):
                async with Client(address, timeout=5, connect_timeout=5, retry=None) as client:
                    await client.connect()
        await failed_login(server.address)  # a direct client from 127.0.0.1 is itself
        (peer,) = audit_peers(server, "auth.login_failure")
        assert peer.startswith("127.0.0.1:")
        numbers = await stats(server)
        assert numbers["proxied_connections_total"] == 0
        assert numbers["rejected_proxy_header_total"] == 0

    asyncio.run(main())


def closed_by_server(sock: socket.socket, timeout: float) -> float:
    """Wait for the server to close ``sock``; how long it took."""
    sock.settimeout(timeout)
    started = time.monotonic()
    with contextlib.suppress(ConnectionResetError):
        while sock.recv(4096):
            pass
    return time.monotonic() - started


def test_a_trusted_connection_without_a_valid_header_is_closed_and_counted(server_factory: Any) -> None:
    server = start(server_factory, BASTION_LIMITS__HANDSHAKE_TIMEOUT="1")
    broken = [
        b"\x16\x03\x01\x00\xa5\x01\x00\x00\xa1\x03\x03" + bytes(32),  # a TLS ClientHello, no header
        b"PROXY TCP4 203.0.113.1 127.0.0.1 5 6\r\n",  # v1 text
        SIGNATURE + bytes([0x21, 0x11]) + struct.pack("!H", 5000),  # too long
        SIGNATURE + bytes([0x21, 0x11, 0, 10]) + bytes(10),  # too short for TCP4
    ]
    for data in broken:
        with socket.create_connection((server.host, server.port), source_address=(PROXY_ADDRESS, 0)) as sock:
            sock.sendall(data)
            assert closed_by_server(sock, 5) < 1.0  # at once, not at the handshake deadline
    # Half a header, then silence: closed at the handshake deadline (1 s).
    with socket.create_connection((server.host, server.port), source_address=(PROXY_ADDRESS, 0)) as sock:
        sock.sendall(SIGNATURE[:8])
        assert 0.5 < closed_by_server(sock, 5) < 4
    counted = asyncio.run(stats(server))
    assert counted["rejected_proxy_header_total"] == len(broken) + 1
    assert counted["proxied_connections_total"] == 0
    assert counted["connections_open"] == 1  # only the stats call itself: every slot was given back
    wait_for(lambda: "closing connection from trusted proxy" in server.log(), 5, what="the warning in the log")
