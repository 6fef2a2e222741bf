"""A bug in the gateway is answered 500 with the security headers every answer carries (app.py, _protocol.py).

An exception escaping a route reaches Starlette's ServerErrorMiddleware,
and one escaping the plain-ASGI front or a WebSocket route reaches uvicorn
itself; each wrote its own bare ``500 Internal Server Error``. A real ``bastion serve``
hosts a service module that breaks the gateway on purpose (its import
replaces ``Gateway.openapi``, ``Front._serve`` and the /ws route with
functions that raise), and the answers are read over real TCP.
"""

from __future__ import annotations

import http.client
import json
from pathlib import Path
from urllib.parse import urlsplit

from tests.gateway.conftest import SECURITY_HEADERS
from tests.support.server import ServerProcess, start_server

FAULTY = '''
"""Breaks the gateway on import: for tests/gateway/test_errors.py only."""
from typing import Any

from bastion import Service
from bastion.gateway.app import Gateway, _Routes
from bastion.gateway.front import Front


def _openapi(self: Any, *args: Any) -> bytes:
    raise RuntimeError("a bug in a route")


async def _serve(self: Any, *args: Any) -> None:
    raise RuntimeError("a bug in the front")


async def _websocket(self: Any, ws: Any) -> None:
    raise RuntimeError("a bug in the WebSocket route")


Gateway.openapi = _openapi
Front._serve = _serve
_Routes.websocket = _websocket
service = Service("faulty")
'''


def _request(server: ServerProcess, method: str, path: str, headers: dict[str, str]) -> http.client.HTTPResponse:
    assert server.gateway_url is not None
    url = urlsplit(server.gateway_url)
    assert url.hostname is not None and url.port is not None
    conn = http.client.HTTPConnection(url.hostname, url.port, timeout=10)
    body = json.dumps({"jsonrpc": "2.0", "method": "admin.health", "id": 1}) if method == "POST" else None
    conn.request(method, path, body=body, headers=headers)
    response = conn.getresponse()
    response.read()
    conn.close()
    return response


def test_an_exception_escaping_the_gateway_is_answered_500_with_the_security_headers(tmp_path: Path) -> None:
    workdir = tmp_path / "s"
    workdir.mkdir()
    (workdir / "faulty_service.py").write_text(FAULTY)
    server = start_server(workdir, insecure=True, args=("--http-port", "0", "--service", "faulty_service:service"))
    try:
        bearer = {"Authorization": f"Bearer {server.token}", "Content-Type": "application/json"}
        for method, path, headers in (("GET", "/openapi.json", {}), ("POST", "/rpc", bearer)):
            answer = _request(server, method, path, headers)
            assert answer.status == 500, (path, answer.status)
            for name in SECURITY_HEADERS:
                assert answer.getheader(name), (path, name, answer.getheaders())
            assert answer.getheader("cache-control") == "no-store", path
        upgrade = _request(
            server,
            "GET",
            "/ws",
            {
                "Upgrade": "websocket",
                "Connection": "Upgrade",
                "Sec-WebSocket-Key": "dGhlIHNhbXBsZSBub25jZQ==",
                "Sec-WebSocket-Version": "13",
            },
        )
        assert upgrade.status == 500
        for name in SECURITY_HEADERS:
            assert upgrade.getheader(name), ("/ws", name, upgrade.getheaders())
        assert _request(server, "GET", "/livez", {}).status == 200  # still serving
        assert "a bug in the front" in server.log() and "a bug in a route" in server.log()  # logged, not hidden
        assert server.stop() == 0
    finally:
        server.stop()
