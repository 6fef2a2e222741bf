"""The gateway's connection caps on a real ``bastion serve``: per client address and in total, WebSockets included.

Idle WebSockets that answer pings stay open for ever, so without a cap one
client could hold the gateway's (and the native port's) file descriptors.
Past ``max_connections_per_source`` a connection is answered 429, past
``max_connections`` 503 (plaintext; over TLS it is closed), the refusal is
counted, everyone under the caps is served, and a WebSocket that closes
gives its slot back.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import ssl
import time
import urllib.error
import urllib.request
from pathlib import Path

from prometheus_client.parser import text_string_to_metric_families

from tests.gateway.test_metrics import scrape, value
from tests.gateway.test_ws_abuse import _address, open_ws
from tests.support.server import ServerProcess, start_server, wait_for


def _get(server: ServerProcess, path: str, context: ssl.SSLContext | None = None) -> tuple[int, dict[str, str], bytes]:
    assert server.gateway_url is not None
    try:
        with urllib.request.urlopen(server.gateway_url + path, timeout=10, context=context) as response:
            return response.status, dict(response.headers), response.read()
    except urllib.error.HTTPError as exc:
        return exc.code, dict(exc.headers), exc.read()


def _refused_upgrade(server: ServerProcess) -> bytes:
    host, port = _address(server)
    with socket.create_connection((host, port), timeout=10) as sock:
        sock.sendall(
            (
                f"GET /ws HTTP/1.1\r\nHost: {host}:{port}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
            ).encode()
        )
        answer = b""
        while chunk := sock.recv(4096):
            answer += chunk
    return answer


def test_idle_websockets_past_the_per_address_cap_are_refused_429(tmp_path: Path) -> None:
    env = {"BASTION_GATEWAY__MAX_CONNECTIONS_PER_SOURCE": "4"}
    server = start_server(tmp_path / "per-source", env=env, insecure=True, http=True)
    sockets = []
    try:
        sockets = [open_ws(server) for _ in range(4)]
        status, headers, body = _get(server, "/livez")
        assert status == 429, body
        error = json.loads(body)["error"]
        assert error["status"] == "RESOURCE_EXHAUSTED" and "max_connections_per_source" in error["message"]
        assert headers["retry-after"] == "1" and headers["x-content-type-options"] == "nosniff"
        assert _refused_upgrade(server).startswith(b"HTTP/1.1 429")
        sockets.pop().close()  # a WebSocket closing gives its slot back
        wait_for(lambda: _get(server, "/livez")[0] == 200, 10, what="the freed slot")
        samples = scrape_plain(server)
        assert value(samples, "bastion_rejections_total", reason="gateway_source_connection_limit") >= 2
    finally:
        for sock in sockets:
            sock.close()
        assert server.stop() == 0, server.log()


def scrape_plain(server: ServerProcess) -> dict[str, dict[tuple[tuple[str, str], ...], float]]:
    samples: dict[str, dict[tuple[tuple[str, str], ...], float]] = {}
    for family in text_string_to_metric_families(server.scrape()):
        for sample in family.samples:
            samples.setdefault(sample.name, {})[tuple(sorted(sample.labels.items()))] = sample.value
    return samples


def test_connections_past_the_total_cap_are_refused_503(tmp_path: Path) -> None:
    env = {"BASTION_GATEWAY__MAX_CONNECTIONS": "3", "BASTION_GATEWAY__MAX_CONNECTIONS_PER_SOURCE": "0"}
    server = start_server(tmp_path / "total", env=env, insecure=True, http=True)
    sockets = []
    try:
        sockets = [open_ws(server) for _ in range(3)]
        status, _, body = _get(server, "/livez")
        assert status == 503 and json.loads(body)["error"]["status"] == "UNAVAILABLE"
        sockets.pop().close()
        wait_for(lambda: _get(server, "/livez")[0] == 200, 10, what="the freed slot")
    finally:
        for sock in sockets:
            sock.close()
        assert server.stop() == 0, server.log()


def test_over_tls_a_connection_past_the_cap_is_closed_and_counted(tmp_path: Path) -> None:
    env = {"BASTION_GATEWAY__MAX_CONNECTIONS_PER_SOURCE": "2"}
    server = start_server(tmp_path / "tls", env=env, http=True)
    assert server.ca_file is not None
    context = ssl.create_default_context(cafile=str(server.ca_file))
    held: list[ssl.SSLSocket] = []
    try:
        for _ in range(2):
            held.append(
                context.wrap_socket(socket.create_connection(_address(server), timeout=10), server_hostname="localhost")
            )
        raw = socket.create_connection(_address(server), timeout=10)
        try:
            try:
                context.wrap_socket(raw, server_hostname="localhost")
                refused = False
            except (ssl.SSLError, OSError):
                refused = True
            assert refused, "a third TLS connection from the same address got through"
        finally:
            raw.close()
        held.pop().close()
        samples = wait_for(lambda: _try_scrape(server), 10, what="a scrape once a slot is free")
        assert value(samples, "bastion_rejections_total", reason="gateway_source_connection_limit") >= 1
    finally:
        for sock in held:
            sock.close()
        assert server.stop() == 0, server.log()


def _try_scrape(server: ServerProcess) -> dict[str, dict[tuple[tuple[str, str], ...], float]] | None:
    try:
        return scrape(server)
    except OSError:
        return None


def test_a_silent_connection_past_the_cap_is_not_held_for_the_header_timeout(tmp_path: Path) -> None:
    """A refused connection that sends nothing must not keep its descriptor for ``header_timeout`` (20 s):
    past the cap, connections are what an attacker has most of. It gets the 429 and is closed at once."""
    env = {"BASTION_GATEWAY__MAX_CONNECTIONS_PER_SOURCE": "1", "BASTION_GATEWAY__HEADER_TIMEOUT": "30"}
    server = start_server(tmp_path / "silent", env=env, insecure=True, http=True)
    try:
        with open_ws(server), socket.create_connection(_address(server), timeout=10) as silent:
            started = time.monotonic()
            answer = b""
            while chunk := silent.recv(4096):
                answer += chunk
            assert time.monotonic() - started < 5
            assert answer.startswith(b"HTTP/1.1 429"), answer[:100]
    finally:
        assert server.stop() == 0, server.log()


def test_a_flood_of_refused_connections_holds_a_bounded_number_of_descriptors(tmp_path: Path) -> None:
    """Each refused connection was held open for a moment (REFUSED_GRACE) so that its answer could arrive,
    outside every cap: a flood at the accept rate held that many descriptors. Past REFUSED_LINGERING at
    once, the rest are closed at once, unanswered, as over TLS."""
    from bastion.gateway._protocol import REFUSED_GRACE, REFUSED_LINGERING

    env = {"BASTION_GATEWAY__MAX_CONNECTIONS_PER_SOURCE": "1"}
    server = start_server(tmp_path / "flood", env=env, insecure=True, http=True)
    fds = f"/proc/{server.process.pid}/fd"
    flood: list[socket.socket] = []
    try:
        with open_ws(server):
            before = len(os.listdir(fds))
            for _ in range(4 * REFUSED_LINGERING):  # silent: each would wait out the grace
                flood.append(socket.create_connection(_address(server), timeout=10))
            peak, until = 0, time.monotonic() + REFUSED_GRACE / 2  # measured while the grace runs
            while time.monotonic() < until:
                peak = max(peak, len(os.listdir(fds)) - before)
            answered = 0
            for sock in flood:
                answer = b""
                with contextlib.suppress(ConnectionResetError):
                    while chunk := sock.recv(4096):
                        answer += chunk
                answered += answer.startswith(b"HTTP/1.1 429")
            assert peak <= REFUSED_LINGERING + 8, peak
            assert REFUSED_LINGERING <= answered < 4 * REFUSED_LINGERING  # the first were answered, the rest not
    finally:
        for sock in flood:
            sock.close()
        assert server.stop() == 0, server.log()
