"""Attacks on the TLS layer of a real ``bastion serve`` process.

Tampering in transit (a relay flips one bit of a TLS record), a TLS scan
(sslyze: versions, cipher suites, compression, renegotiation), connections
that do not negotiate ALPN ``bastion/1``, and slow handshakes, which must
all end inside one deadline counted from accept.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import ssl
import time
from collections.abc import Callable
from typing import Any

import pytest

from bastion import Client, ConnectionClosed, SyncClient, TransportError
from bastion.security.tls import client_context
from tests.support.relay import FlipRelay
from tests.support.server import ServerProcess

BLOB = {"blob": bytes(range(256)) * 64, "text": "payload"}


# -- tampering -------------------------------------------------------------------------------------


# Server -> client: the client's TLS layer rejects the record and says so.
# Client -> server: the server rejects it and closes (asyncio sends no alert), so the client sees a close.
@pytest.mark.parametrize(("direction", "reason"), [("server", "integrity check"), ("client", "closed")])
def test_a_flipped_bit_tears_the_connection_down_async(server: ServerProcess, direction: str, reason: str) -> None:
    async def main() -> None:
        with FlipRelay(server.host, server.port) as relay:
            async with Client(relay.address, token_file=str(server.token_file), timeout=5) as client:
                assert await client.demo.echo(value=BLOB) == BLOB
                relay.arm(direction)  # type: ignore[arg-type]
                with pytest.raises(ConnectionClosed, match=reason) as info:
                    result = await client.demo.echo(value=BLOB)
                    pytest.fail(f"a call returned through a tampered stream: {str(result)[:80]}")
                assert isinstance(info.value, TransportError)
                assert relay.flipped.is_set()

    asyncio.run(main())


def test_a_flipped_bit_tears_the_connection_down_sync(server: ServerProcess) -> None:
    with (
        FlipRelay(server.host, server.port) as relay,
        SyncClient(relay.address, token_file=str(server.token_file), timeout=5) as client,
    ):
        assert client.call("demo.echo", value=BLOB) == BLOB
        relay.arm("server")
        with pytest.raises(ConnectionClosed, match="integrity check"):
            client.call("demo.echo", value=BLOB)
    # The server is unharmed.
    with SyncClient(server.address, token_file=str(server.token_file), timeout=5) as fresh:
        assert fresh.call("demo.echo", value=BLOB) == BLOB
        assert fresh.call("admin.stats")["internal_errors_total"] == 0


# -- TLS scan ----------------------------------------------------------------------------------------


def _scan(port: int) -> Any:
    sslyze = pytest.importorskip("sslyze", reason="sslyze (pip install sslyze) is needed for the TLS scan")
    commands = {
        sslyze.ScanCommand.SSL_2_0_CIPHER_SUITES,
        sslyze.ScanCommand.SSL_3_0_CIPHER_SUITES,
        sslyze.ScanCommand.TLS_1_0_CIPHER_SUITES,
        sslyze.ScanCommand.TLS_1_1_CIPHER_SUITES,
        sslyze.ScanCommand.TLS_1_2_CIPHER_SUITES,
        sslyze.ScanCommand.TLS_1_3_CIPHER_SUITES,
        sslyze.ScanCommand.TLS_COMPRESSION,
        sslyze.ScanCommand.SESSION_RENEGOTIATION,
        sslyze.ScanCommand.HEARTBLEED,
        sslyze.ScanCommand.OPENSSL_CCS_INJECTION,
    }
    request = sslyze.ServerScanRequest(
        server_location=sslyze.ServerNetworkLocation("127.0.0.1", port), scan_commands=commands
    )
    scanner = sslyze.Scanner()
    scanner.queue_scans([request])
    (result,) = list(scanner.get_results())
    assert result.scan_status == sslyze.ServerScanStatusEnum.COMPLETED, result.connectivity_error_trace
    scan = result.scan_result
    for name in ("ssl_2_0", "ssl_3_0", "tls_1_0", "tls_1_1", "tls_1_2", "tls_1_3"):
        attempt = getattr(scan, f"{name}_cipher_suites")
        assert attempt.status == sslyze.ScanCommandAttemptStatusEnum.COMPLETED, (name, attempt.error_trace)
    return scan


def _accepted(scan: Any, version: str) -> list[str]:
    return [s.cipher_suite.name for s in getattr(scan, f"{version}_cipher_suites").result.accepted_cipher_suites]


def _assert_common(scan: Any) -> None:
    for old in ("ssl_2_0", "ssl_3_0", "tls_1_0", "tls_1_1"):
        assert _accepted(scan, old) == [], old
    assert _accepted(scan, "tls_1_3")  # the default and preferred version works
    assert scan.tls_compression.result.supports_compression is False
    renegotiation = scan.session_renegotiation.result
    assert renegotiation.is_vulnerable_to_client_renegotiation_dos is False
    assert renegotiation.client_renegotiations_success_count == 0
    assert scan.heartbleed.result.is_vulnerable_to_heartbleed is False
    assert scan.openssl_ccs_injection.result.is_vulnerable_to_ccs_injection is False


def test_tls_scan_of_the_default_server_finds_only_tls13(server: ServerProcess) -> None:
    scan = _scan(server.port)
    _assert_common(scan)
    assert _accepted(scan, "tls_1_2") == []


def test_tls_scan_with_tls12_allowed_finds_only_ecdhe_aead(server_factory: Callable[..., ServerProcess]) -> None:
    relaxed = server_factory(args=("--tls-min-version", "1.2"))
    scan = _scan(relaxed.port)
    _assert_common(scan)
    suites = _accepted(scan, "tls_1_2")
    assert suites
    for suite in suites:
        assert suite.startswith("TLS_ECDHE_"), suite
        assert "_GCM_" in suite or "CHACHA20_POLY1305" in suite, suite
    with SyncClient(relaxed.address, timeout=5) as client:  # and bastion clients still connect
        assert client.call("admin.health")["status"] == "ok"


# -- ALPN ----------------------------------------------------------------------------------------------


def _tls_socket(server: ServerProcess, alpn: list[str] | None) -> ssl.SSLSocket:
    context = client_context(server.ca_file)
    if alpn is not None:
        context.set_alpn_protocols(alpn)
    else:
        context = ssl.create_default_context(cafile=str(server.ca_file))  # no ALPN offered at all
    sock = socket.create_connection((server.host, server.port), timeout=5)
    return context.wrap_socket(sock, server_hostname=server.host)


def _closed_within(sock: ssl.SSLSocket, seconds: float) -> bool:
    sock.settimeout(seconds)
    try:
        return sock.recv(1) == b""
    except (ssl.SSLError, ConnectionResetError):
        return True
    except TimeoutError:
        return False


@pytest.mark.parametrize("alpn", [None, ["h2"]], ids=["no-alpn", "h2"])
def test_a_tls_connection_without_alpn_bastion_is_closed(server: ServerProcess, alpn: list[str] | None) -> None:
    with _tls_socket(server, alpn) as sock:
        assert sock.selected_alpn_protocol() is None
        hello = bytes.fromhex("00000019") + bytes(25)  # whatever it sends is never parsed
        with contextlib.suppress(ssl.SSLError, BrokenPipeError, ConnectionResetError):
            sock.sendall(hello)
        assert _closed_within(sock, 2), "the server kept a connection without ALPN bastion/1"
    with SyncClient(server.address, token_file=str(server.token_file), timeout=5) as good:
        assert good.call("admin.stats")["calls_total"] == 1
    assert "ALPN None is not bastion/1" in server.log()  # the audit line


# -- one handshake deadline from accept --------------------------------------------------------------


@pytest.fixture
def impatient_server(server_factory: Callable[..., ServerProcess]) -> ServerProcess:
    return server_factory(env={"BASTION_LIMITS__HANDSHAKE_TIMEOUT": "1"})


def test_silent_tcp_connection_is_closed_at_the_deadline(impatient_server: ServerProcess) -> None:
    server = impatient_server
    start = time.monotonic()
    with socket.create_connection((server.host, server.port), timeout=5) as sock:
        assert sock.recv(1) == b""  # no ClientHello: closed by the TLS part of the deadline
    assert 0.8 <= time.monotonic() - start < 2


def test_time_spent_before_tls_counts_against_the_bastion_handshake(impatient_server: ServerProcess) -> None:
    server = impatient_server
    context = client_context(server.ca_file)
    start = time.monotonic()
    raw = socket.create_connection((server.host, server.port), timeout=5)
    time.sleep(0.6)  # dawdle before the ClientHello
    with context.wrap_socket(raw, server_hostname=server.host) as sock:
        assert sock.selected_alpn_protocol() == "bastion/1"
        assert _closed_within(sock, 3), "the server never closed a connection that sent no Hello"
    elapsed = time.monotonic() - start
    # One deadline from accept (1 s), not 0.6 s of TLS + a fresh second for the Hello.
    assert 0.8 <= elapsed < 1.45, elapsed
    with SyncClient(server.address, timeout=5) as client:
        assert client.call("admin.health")["status"] == "ok"


def test_plaintext_garbage_on_the_tls_port_is_dropped(server: ServerProcess) -> None:
    start = time.monotonic()
    with socket.create_connection((server.host, server.port), timeout=5) as sock:
        sock.sendall(bytes.fromhex("0000000a") + b"not tls!!!")
        sock.settimeout(3)
        with contextlib.suppress(ConnectionResetError):
            assert sock.recv(64) == b""
    assert time.monotonic() - start < 1
    with SyncClient(server.address, timeout=5) as client:
        assert client.call("admin.health")["status"] == "ok"
