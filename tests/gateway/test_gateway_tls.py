"""TLS handshakes on the gateway's HTTPS port, on a real ``bastion serve``: failures counted by reason.

asyncio (and uvloop) drop a server-side TLS handshake that fails without a
word, so the gateway does its own handshakes (bastion/gateway/_tls.py) and
``/metrics`` shows ``bastion_gateway_tls_handshake_failures_total{reason}``.
"""

from __future__ import annotations

import json
import socket
import ssl
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from websockets.exceptions import InvalidStatus
from websockets.sync.client import connect

from tests.gateway.test_metrics import _context, _get, scrape
from tests.gateway.test_ws_abuse import _address
from tests.support.server import ServerProcess, start_server, wait_for

HEADER_TIMEOUT = 1.0
FAMILY = "bastion_gateway_tls_handshake_failures_total"


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    env = {"BASTION_GATEWAY__HEADER_TIMEOUT": str(HEADER_TIMEOUT)}
    server = start_server(tmp_path_factory.mktemp("gateway-tls"), env=env, http=True)
    try:
        yield server
    finally:
        assert server.stop() == 0, server.log()


def _failures(server: ServerProcess) -> dict[str, float]:
    samples = scrape(server)
    return {dict(labels)["reason"]: n for labels, n in samples.get(FAMILY, {}).items()}


def _wait_delta(server: ServerProcess, before: dict[str, float], reason: str, expected: float) -> None:
    def reached() -> bool:
        return _failures(server).get(reason, 0) - before.get(reason, 0) >= expected

    wait_for(reached, 10, what=f"{expected:g} more {reason} in {FAMILY}")
    assert _failures(server).get(reason, 0) - before.get(reason, 0) == expected


def test_every_reason_is_exported_from_the_start(served: ServerProcess) -> None:
    reasons = {"timeout", "closed", "plaintext_http", "certificate_rejected", "protocol", "other"}
    assert set(_failures(served)) == reasons


def test_plaintext_http_to_the_https_port_is_counted(served: ServerProcess) -> None:
    before = _failures(served)
    with socket.create_connection(_address(served), timeout=10) as plain:
        plain.sendall(b"GET /metrics HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
        plain.recv(100)  # an alert, or the close
    _wait_delta(served, before, "plaintext_http", 1)


def test_a_client_that_distrusts_the_certificate_is_counted(served: ServerProcess) -> None:
    before = _failures(served)
    distrusting = ssl.create_default_context()  # the system's roots: not the test CA that signed the gateway's
    with socket.create_connection(_address(served), timeout=10) as raw, pytest.raises(ssl.SSLError):
        distrusting.wrap_socket(raw, server_hostname="localhost")
    _wait_delta(served, before, "certificate_rejected", 1)


def test_garbage_instead_of_a_hello_is_counted_as_protocol(served: ServerProcess) -> None:
    before = _failures(served)
    with socket.create_connection(_address(served), timeout=10) as raw:
        raw.sendall(b"\x16\x03\x01\x00\x05\xff\xff\xff\xff\xff")  # a handshake record holding nonsense
        raw.recv(100)
    _wait_delta(served, before, "protocol", 1)


def test_a_silent_connection_times_out_and_a_half_hello_closed_is_counted(served: ServerProcess) -> None:
    before = _failures(served)
    silent = socket.create_connection(_address(served), timeout=10)
    try:
        started = time.monotonic()
        assert silent.recv(100) == b""  # closed by the gateway after header_timeout
        assert time.monotonic() - started < HEADER_TIMEOUT + 5
    except ConnectionResetError:
        pass  # aborted: as good as closed
    finally:
        silent.close()
    _wait_delta(served, before, "timeout", 1)
    with socket.create_connection(_address(served), timeout=10) as raw:
        raw.sendall(b"\x16\x03\x01\x02\x00\x01")  # the start of a ClientHello, then gone
    _wait_delta(served, before, "closed", 1)


def test_the_gateway_still_serves_https_meanwhile(served: ServerProcess) -> None:
    status, _, text = _get(served, "/metrics")
    assert status == 200 and FAMILY in text
    # A request sent in the same flight as the end of the handshake is not lost (TLS 1.3: right behind it).
    host, port = _address(served)
    with (
        socket.create_connection((host, port), timeout=10) as raw,
        _context(served).wrap_socket(raw, server_hostname="localhost") as tls,
    ):
        tls.sendall(b"GET /livez HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n")
        answer = b""
        while chunk := tls.recv(4096):
            answer += chunk
    assert answer.startswith(b"HTTP/1.1 200"), answer[:200]
    assert b'"ok"' in answer


def test_the_gateway_speaks_only_the_tls_versions_the_server_does(served: ServerProcess) -> None:
    """``tls.min_version`` is 1.3 by default, and the gateway's port must hold to it as the native one does
    (it accepted TLS 1.2 with uvicorn's default cipher list); its ALPN is http/1.1, never bastion/1."""
    assert served.ca_file is not None
    old = ssl.create_default_context(cafile=str(served.ca_file))
    old.maximum_version = ssl.TLSVersion.TLSv1_2
    for port in (_address(served)[1], served.port):
        with socket.create_connection(("127.0.0.1", port), timeout=10) as raw, pytest.raises(ssl.SSLError):
            old.wrap_socket(raw, server_hostname="localhost")
    modern = _context(served)
    modern.set_alpn_protocols(["h2", "http/1.1"])
    with (
        socket.create_connection(_address(served), timeout=10) as raw,
        modern.wrap_socket(raw, server_hostname="localhost") as tls,
    ):
        assert tls.version() == "TLSv1.3"
        assert tls.selected_alpn_protocol() == "http/1.1"


def test_with_min_version_1_2_only_forward_secret_aead_suites(tmp_path: Path) -> None:
    server = start_server(tmp_path / "tls12", env={"BASTION_TLS__MIN_VERSION": "1.2"}, http=True)
    try:
        assert server.ca_file is not None
        weak = ssl.create_default_context(cafile=str(server.ca_file))
        weak.maximum_version = ssl.TLSVersion.TLSv1_2
        weak.set_ciphers("ECDHE-ECDSA-AES128-SHA:ECDHE-ECDSA-AES256-SHA:AES128-SHA")  # CBC, or no forward secrecy
        with socket.create_connection(_address(server), timeout=10) as raw, pytest.raises(ssl.SSLError):
            weak.wrap_socket(raw, server_hostname="localhost")
        good = ssl.create_default_context(cafile=str(server.ca_file))
        good.maximum_version = ssl.TLSVersion.TLSv1_2
        with (
            socket.create_connection(_address(server), timeout=10) as raw,
            good.wrap_socket(raw, server_hostname="localhost") as tls,
        ):
            assert tls.version() == "TLSv1.2"
            cipher = tls.cipher()
            assert cipher is not None
            assert "GCM" in cipher[0] or "CHACHA" in cipher[0], cipher
    finally:
        assert server.stop() == 0, server.log()


def test_wss_through_the_gateways_tls_layer(served: ServerProcess) -> None:
    """WebSockets over the gateway's own TLS layer (_tls.py, under uvloop): calls, a server stream, the
    own-origin rule seeing ``wss``/``https``, and a foreign origin refused."""
    port = _address(served)[1]
    url = f"wss://localhost:{port}/ws"
    headers = {"Authorization": f"Bearer {served.token}"}
    with connect(url, ssl=_context(served), additional_headers=headers, origin=f"https://localhost:{port}") as ws:
        ws.send(json.dumps({"jsonrpc": "2.0", "method": "demo.echo", "params": {"value": "over wss"}, "id": 1}))
        assert json.loads(ws.recv(10)) == {"jsonrpc": "2.0", "result": "over wss", "id": 1}
        ws.send(json.dumps({"jsonrpc": "2.0", "method": "demo.count", "params": {"n": 3}, "id": "s"}))
        items = [json.loads(ws.recv(10)) for _ in range(4)]
        assert [m["params"]["item"] for m in items[:3]] == [0, 1, 2]
        assert items[3] == {"jsonrpc": "2.0", "result": {"items": 3}, "id": "s"}
        for _ in range(200):  # pings answered through the TLS layer
            ws.ping().wait(10)
    with pytest.raises(InvalidStatus) as refused:
        connect(url, ssl=_context(served), origin="https://evil.example").close()
    assert refused.value.response.status_code == 403


def test_an_answer_sent_before_the_body_is_read_reaches_the_client_over_tls(served: ServerProcess) -> None:
    """A body over max_body is answered 413 before it is read, and the connection closed. Over TLS the close
    must not reset the connection while the client is still sending (asyncio's TLS layer treated the body's
    records after its close_notify as an error and aborted): the client must get to read the 413."""
    host, port = _address(served)
    body = b"x" * (2 << 20)
    head = (
        f"POST /rpc HTTP/1.1\r\nHost: {host}:{port}\r\nAuthorization: Bearer {served.token}\r\n"
        f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n"
    ).encode()
    with (
        socket.create_connection((host, port), timeout=20) as raw,
        _context(served).wrap_socket(raw, server_hostname="localhost") as tls,
    ):
        tls.sendall(head + body)
        answer = b""
        while chunk := tls.recv(65536):
            answer += chunk
    assert answer.startswith(b"HTTP/1.1 413"), answer[:200]
    assert b"RESOURCE_EXHAUSTED" in answer
