"""``bastion serve`` starts the HTTP gateway: ``--http-port``, ``--no-http``, TLS, drain order."""

from __future__ import annotations

import json
import socket
import ssl
import threading
import urllib.error
import urllib.request
from pathlib import Path

from bastion import SyncClient
from tests.support.server import ServerProcess, bastion_cli, seed_tls, start_server, wait_for

GRACE = {"BASTION_LIMITS__GRACE_PERIOD": "10"}


def _status(server: ServerProcess, path: str) -> int:
    assert server.gateway_url is not None and server.ca_file is not None
    context = ssl.create_default_context(cafile=str(server.ca_file))
    try:
        with urllib.request.urlopen(server.gateway_url + path, context=context, timeout=5) as response:
            return int(response.status)
    except urllib.error.HTTPError as exc:
        return exc.code


def test_serve_starts_the_gateway_over_tls_and_drains_before_closing_it(tmp_path: Path) -> None:
    server = start_server(tmp_path / "s", env=GRACE, args=("--http-port", "0"))
    try:
        assert server.gateway_url is not None and server.gateway_url.startswith("https://127.0.0.1:")
        assert int(server.gateway_url.rsplit(":", 1)[1]) not in (0, server.port)
        assert _status(server, "/livez") == 200
        assert _status(server, "/readyz") == 200
        assert _status(server, "/openapi.json") == 200
        # Plain HTTP on the TLS port gets nowhere: the gateway speaks only TLS.
        plain = server.gateway_url.replace("https://", "http://")
        try:
            urllib.request.urlopen(plain + "/livez", timeout=5)
            raise AssertionError("plaintext HTTP was answered")
        except (urllib.error.URLError, ConnectionError, OSError):
            pass

        # A call in flight holds the drain open: meanwhile /readyz says 503, /livez still 200.
        client = SyncClient(server.address, token=server.token, timeout=20, retry=None)
        client.connect()
        answer: list[object] = []
        slow = threading.Thread(target=lambda: answer.append(client.call("demo.slow", seconds=2.0)))
        slow.start()
        wait_for(lambda: _in_flight(server), 5, what="the slow call to be in flight")
        server.signal()
        wait_for(lambda: _status(server, "/readyz") == 503, 5, what="/readyz to answer 503 while draining")
        assert _status(server, "/livez") == 200
        assert _in_flight(server)  # /metrics, as the admin, is still served while draining
        slow.join(10)
        client.close()
        assert answer == [2.0]
        assert server.stop() == 0, server.log()
    finally:
        server.stop()


def _in_flight(server: ServerProcess) -> bool:
    assert server.gateway_url is not None and server.ca_file is not None
    text = server.scrape(timeout=5)
    return any(line.startswith("bastion_calls_in_flight ") and float(line.split()[1]) > 0 for line in text.splitlines())


def test_no_http_serves_no_gateway(tmp_path: Path) -> None:
    server = start_server(tmp_path / "s", env=GRACE, args=("--no-http",))
    try:
        assert server.gateway_url is None
        line = server.reader.next_line(5)
        assert line is not None and line.startswith("admin token"), line
        assert not any(line.startswith("gateway listening") for line in server.stdout_lines())
    finally:
        assert server.stop() == 0


def test_insecure_server_serves_plain_http(tmp_path: Path) -> None:
    server = start_server(tmp_path / "s", env=GRACE, args=("--http-port", "0"), insecure=True)
    try:
        assert server.gateway_url is not None and server.gateway_url.startswith("http://127.0.0.1:")
        with urllib.request.urlopen(server.gateway_url + "/readyz", timeout=5) as response:
            assert json.loads(response.read()) == {"status": "ready"}
    finally:
        assert server.stop() == 0


def test_gateway_port_in_use_is_a_clear_error(tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        data = tmp_path / "data"
        seed_tls(data)
        result = bastion_cli(
            "serve", "--host", "127.0.0.1", "--port", "0", "--data-dir", str(data), "--http-port", str(port),
            cwd=tmp_path, timeout=30,
        )  # fmt: skip
    assert result.returncode != 0
    assert f"gateway: cannot listen on 127.0.0.1:{port}" in result.stderr, result.stderr
    assert "listening on" not in result.stdout
