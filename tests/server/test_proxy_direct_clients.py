"""A client that connects straight from a ``trusted_proxies`` address learns why it is refused.

The server trusts 127.0.0.1 (``BASTION_TRUSTED_PROXIES``), so a client
connecting over loopback as usual skips the balancer: its first bytes are a
TLS ClientHello (or, plaintext, a bastion Hello), not a PROXY v2 header. The
server answers once with a fixed refusal -- a TLS access_denied alert, or a
FAILED_PRECONDITION GoAway -- and closes; the client's error says what to do.
The admin connection comes from 127.0.0.2, which is not trusted.
"""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Callable
from typing import Any

import pytest

import bastion
from bastion import Client, SyncClient
from bastion.client._common import build_hello
from bastion.protocol.connection import Connection
from bastion.protocol.limits import ProtocolLimits
from bastion.protocol.messages import Welcome
from bastion.protocol.proxy import Command, ProxyHeader, build
from bastion.protocol.state import Role
from tests.support.server import ServerProcess, wait_for

TRUSTED = "127.0.0.1"
ADMIN_ADDRESS = "127.0.0.2"
HINT = "connect through the load balancer, or remove the address from trusted_proxies"


def start(server_factory: Callable[..., ServerProcess], *, insecure: bool = False) -> ServerProcess:
    return server_factory(env={"BASTION_TRUSTED_PROXIES": TRUSTED}, insecure=insecure)


def stats(server: ServerProcess) -> dict[str, Any]:
    with SyncClient(server.address, token=server.token, timeout=10, source_address=ADMIN_ADDRESS, **tls(server)) as c:
        return dict(c.admin.stats())


def tls(server: ServerProcess) -> dict[str, Any]:
    return {"insecure": True} if server.insecure else {}


def direct_async(server: ServerProcess) -> BaseException:
    async def main() -> BaseException:
        client = Client(server.address, timeout=5, connect_timeout=5, retry=None, **tls(server))
        try:
            with pytest.raises(bastion.BastionError) as caught:
                await client.demo.echo(value=1)
        finally:
            await client.close()
        return caught.value

    return asyncio.run(main())


def direct_sync(server: ServerProcess) -> BaseException:
    with (
        pytest.raises(bastion.BastionError) as caught,
        SyncClient(server.address, timeout=5, connect_timeout=5, retry=None, **tls(server)) as client,
    ):
        client.demo.echo(value=1)
    return caught.value


@pytest.mark.parametrize("connect", [direct_async, direct_sync], ids=["async", "sync"])
def test_a_tls_client_connecting_directly_is_told_to_use_the_balancer(server_factory: Any, connect: Any) -> None:
    server = start(server_factory)
    error = connect(server)
    assert isinstance(error, bastion.ConnectError), repr(error)
    message = str(error)
    assert f"TLS handshake with {server.host}:{server.port} failed" in message
    assert "access_denied" in message
    assert "expects a PROXY protocol header from this address" in message
    assert HINT in message
    counted = stats(server)
    assert counted["rejected_proxy_header_total"] == 1
    assert counted["proxied_connections_total"] == 0
    wait_for(lambda: "answered with a TLS access_denied alert" in server.log(), 5, what="the warning in the log")


@pytest.mark.parametrize("connect", [direct_async, direct_sync], ids=["async", "sync"])
def test_a_plaintext_client_connecting_directly_gets_a_coded_refusal(server_factory: Any, connect: Any) -> None:
    server = start(server_factory, insecure=True)
    error = connect(server)
    assert isinstance(error, bastion.FailedPrecondition), repr(error)
    assert error.status is bastion.Status.FAILED_PRECONDITION
    assert "expects a PROXY protocol header from this address" in error.message
    assert HINT in error.message
    counted = stats(server)
    assert counted["rejected_proxy_header_total"] == 1
    wait_for(lambda: "answered with a FAILED_PRECONDITION GoAway" in server.log(), 5, what="the warning in the log")


def test_the_answer_is_fixed_small_and_once_and_other_bytes_get_none(server_factory: Any) -> None:
    server = start(server_factory)
    client_hello = b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03" + bytes(32)

    def answer(data: bytes) -> bytes:
        with socket.create_connection((server.host, server.port), source_address=(TRUSTED, 0)) as sock:
            sock.sendall(data)
            sock.settimeout(5)
            received = b""
            try:
                while chunk := sock.recv(4096):
                    received += chunk
                    sock.sendall(data)  # more of the same is never answered again
            except (ConnectionResetError, BrokenPipeError):
                pass
            return received

    assert answer(client_hello * 4) == bytes([0x15, 0x03, 0x03, 0x00, 0x02, 0x02, 49])  # fatal access_denied
    assert answer(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n") == b""  # neither TLS nor bastion: closed without a word
    assert answer(b"PROXY TCP4 203.0.113.1 127.0.0.1 5 6\r\n") == b""
    # Anything on a trusted address can cause these at will: every one is counted, a few are logged.
    for _ in range(12):
        assert len(answer(client_hello)) == 7
    assert stats(server)["rejected_proxy_header_total"] == 15
    warned = "closing connection from trusted proxy"
    wait_for(lambda: server.log().count(warned) >= 10, 5, what="the warnings in the log")
    assert server.log().count(warned) == 10  # LOG_BURST per 10 s, server-wide


def test_a_real_proxy_header_from_the_trusted_address_still_works(server_factory: Any) -> None:
    server = start(server_factory, insecure=True)
    with socket.create_connection((server.host, server.port), source_address=(TRUSTED, 0)) as sock:
        sock.sendall(build(ProxyHeader(Command.LOCAL)))
        # A bastion Hello after the header goes through to the session: answered with a Welcome (not refused).
        core = Connection(Role.CLIENT, ProtocolLimits())
        core.send_hello(build_hello(ProtocolLimits(), server.token, "direct-test"))
        sock.sendall(core.data_to_send())
        sock.settimeout(5)
        events: list[Any] = []
        while not events:
            data = sock.recv(65536)
            assert data, "the server closed the connection"
            events = core.receive_data(data)
        assert isinstance(events[0], Welcome)
    assert stats(server)["rejected_proxy_header_total"] == 0
