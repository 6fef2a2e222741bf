"""The gateway's own origin, and DNS rebinding.

A page on another site may not call the gateway from a browser unless its
origin is listed (``cors_origins``, ``ws_origins``). The gateway's own origin
is ``scheme://<Host header>`` -- but a DNS-rebinding page
(``http://evil.example:PORT``, the name re-pointed at the gateway's address)
sends ``Host: evil.example:PORT`` and would match. Over plaintext the Host
counts only when it is an IP address, ``localhost`` or the configured host;
over TLS always (the browser checked the certificate for that name). Real
server over real TCP (plaintext), plus the rule itself.
"""

from __future__ import annotations

import socket

import pytest

from bastion.gateway._http import origin_allowed
from tests.gateway.conftest import PASSWORD, World, bearer, http

NAMES = frozenset({"bastion.lan"})


@pytest.mark.parametrize(
    ("origin", "scheme", "host", "allowed"),
    [
        (None, "http", "evil.example:7401", True),  # no Origin: not a browser's cross-origin request
        ("http://evil.example:7401", "http", "evil.example:7401", False),  # DNS rebinding
        ("http://evil.example", "http", "evil.example", False),
        ("http://evil.example:7401", "ws", "evil.example:7401", False),
        ("http://127.0.0.1:7401", "http", "127.0.0.1:7401", True),
        ("http://[::1]:7401", "ws", "[::1]:7401", True),
        ("http://192.0.2.7", "http", "192.0.2.7", True),
        ("http://localhost:7401", "http", "localhost:7401", True),
        ("http://bastion.lan:7401", "http", "bastion.lan:7401", True),  # the configured host
        ("http://bastion.lan.evil.example:7401", "http", "bastion.lan.evil.example:7401", False),
        ("https://bastion.example.com:7401", "https", "bastion.example.com:7401", True),  # TLS: the certificate
        ("https://evil.example:7401", "wss", "evil.example:7401", True),
        ("http://127.0.0.1:7401", "http", "127.0.0.1:7402", False),  # not the same origin at all
        ("https://127.0.0.1:7401", "http", "127.0.0.1:7401", False),
        ("http://127.0.0.1:7401", "http", None, False),
        ("http://app.example", "http", "evil.example:7401", True),  # listed
    ],
)
def test_the_own_origin_rule(origin: str | None, scheme: str, host: str | None, allowed: bool) -> None:
    assert origin_allowed(origin, scheme, host, ["http://app.example"], NAMES) is allowed


def _as(world: World, name: str) -> dict[str, str]:
    """The Host and Origin headers of a page at ``http://name:PORT`` (the gateway's port)."""
    assert world.gateway is not None
    where = f"{name}:{world.gateway.port}"
    return {"Host": where, "Origin": f"http://{where}"}


def _upgrade(world: World, headers: dict[str, str]) -> bytes:
    """A raw WebSocket upgrade request to /ws with these headers: the answer's status line."""
    assert world.gateway is not None
    lines = [
        "GET /ws HTTP/1.1",
        *(f"{name}: {value}" for name, value in headers.items()),
        "Upgrade: websocket",
        "Connection: Upgrade",
        "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==",
        "Sec-WebSocket-Version: 13",
    ]
    with socket.create_connection((world.gateway.host, world.gateway.port), timeout=10) as sock:
        sock.sendall(("\r\n".join(lines) + "\r\n\r\n").encode())
        data = b""
        while b"\r\n" not in data:
            chunk = sock.recv(65536)
            assert chunk, data
            data += chunk
    return data.split(b"\r\n", 1)[0]


def test_a_dns_rebinding_page_is_refused(world: World) -> None:
    """``http://evil.example:PORT`` re-pointed at the gateway: its calls, its login and its WebSocket are
    refused at every door (the plain-ASGI front, Starlette, /ws) -- by the Host check (400) before the
    Origin check (403) is reached: see test_hosts.py."""
    page = _as(world, "evil.example")
    called = http(world, "POST", "/v1/demo/echo", {"value": 1}, headers={**bearer(world, "ada"), **page})
    assert called.status == 400 and called.json()["error"]["status"] == "INVALID_ARGUMENT"
    rpc = {"jsonrpc": "2.0", "method": "auth.whoami", "id": 1}
    assert http(world, "POST", "/rpc", rpc, headers=page).status == 400
    login = http(world, "POST", "/v1/auth/login", {"username": "carol", "password": PASSWORD}, headers=page)
    assert login.status == 400 and not login.cookies
    assert _upgrade(world, page).startswith(b"HTTP/1.1 400 ")


@pytest.mark.parametrize("name", ["127.0.0.1", "localhost"])
def test_a_page_on_the_gateways_own_origin_is_served(world: World, name: str) -> None:
    page = _as(world, name)
    called = http(world, "POST", "/v1/demo/echo", {"value": 1}, headers={**bearer(world, "ada"), **page})
    assert called.status == 200 and called.json() == 1
    login = http(world, "POST", "/v1/auth/login", {"username": "carol", "password": PASSWORD}, headers=page)
    assert login.status == 200 and login.cookies
    assert _upgrade(world, page).startswith(b"HTTP/1.1 101 ")
