"""The gateway's Host allow-list: DNS rebinding cannot read a plaintext gateway (bastion/gateway/front.py).

A DNS-rebinding page (``http://evil.example:PORT``, its name re-pointed at
the gateway's address) makes same-origin GETs that carry no ``Origin``
header, so the Origin check cannot stop it reading /metrics, /openapi.json
or the console. Over plaintext a request whose Host is not an IP address,
``localhost``, the configured host or one of ``gateway.allowed_hosts`` is
answered 400 (with the security headers). Over TLS the browser has checked
the certificate for the name, so the Host is not checked. Real ``bastion
serve`` processes over real TCP (and TLS).
"""

from __future__ import annotations

import http.client
import json
import socket
import ssl
from collections.abc import Callable
from urllib.parse import urlsplit

import pytest

from bastion.config import GatewayConfig
from bastion.exceptions import UsageError
from tests.gateway.conftest import SECURITY_HEADERS, World
from tests.gateway.conftest import http as request
from tests.support.server import ServerProcess


def _get(server: ServerProcess, method: str, path: str, host: str, **extra: str) -> http.client.HTTPResponse:
    assert server.gateway_url is not None
    url = urlsplit(server.gateway_url)
    assert url.hostname is not None and url.port is not None
    if url.scheme == "https":
        assert server.ca_file is not None
        context = ssl.create_default_context(cafile=str(server.ca_file))
        conn: http.client.HTTPConnection = http.client.HTTPSConnection(
            url.hostname, url.port, timeout=10, context=context
        )
    else:
        conn = http.client.HTTPConnection(url.hostname, url.port, timeout=10)
    body = json.dumps({"jsonrpc": "2.0", "method": "admin.health", "id": 1}).encode() if method == "POST" else None
    conn.putrequest(method, path, skip_host=True, skip_accept_encoding=True)
    conn.putheader("Host", host.replace("PORT", str(url.port)))
    for name, value in extra.items():
        conn.putheader(name.replace("_", "-"), value)
    if body is not None:
        conn.putheader("Content-Type", "application/json")
        conn.putheader("Content-Length", str(len(body)))
    conn.endheaders(body)
    response = conn.getresponse()
    response.read()
    conn.close()
    return response


def _upgrade(server: ServerProcess, host: str) -> bytes:
    """A raw WebSocket upgrade to /ws with this Host and no Origin: the answer's status line."""
    assert server.gateway_url is not None
    url = urlsplit(server.gateway_url)
    assert url.hostname is not None and url.port is not None
    lines = [
        "GET /ws HTTP/1.1",
        f"Host: {host.replace('PORT', str(url.port))}",
        "Upgrade: websocket",
        "Connection: Upgrade",
        "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==",
        "Sec-WebSocket-Version: 13",
    ]
    with socket.create_connection((url.hostname, url.port), timeout=10) as sock:
        sock.sendall(("\r\n".join(lines) + "\r\n\r\n").encode())
        data = b""
        while b"\r\n" not in data:
            chunk = sock.recv(65536)
            assert chunk, data
            data += chunk
    return data.split(b"\r\n", 1)[0]


PAGES = [("GET", "/metrics"), ("GET", "/openapi.json"), ("GET", "/"), ("GET", "/static/app.js"), ("POST", "/rpc")]


def test_a_plaintext_gateway_answers_only_the_hosts_it_serves(server_factory: Callable[..., ServerProcess]) -> None:
    server = server_factory(
        insecure=True,
        args=("--http-port", "0"),
        env={"BASTION_GATEWAY__ALLOWED_HOSTS": "bastion.lan", "BASTION_GATEWAY__COOKIE_SECURE": "false"},
    )
    for method, path in PAGES:
        for host in ("evil.example:PORT", "evil.example", "bastion.lan.evil.example:PORT", "127.0.0.1.nip.io:PORT"):
            refused = _get(server, method, path, host, Authorization=f"Bearer {server.token}")
            assert refused.status == 400, (method, path, host)
            for name in SECURITY_HEADERS:
                assert refused.getheader(name), (path, name)
            assert refused.getheader("cache-control") == "no-store"
        for host in ("127.0.0.1:PORT", "localhost:PORT", "LocalHost", "[::1]:PORT", "192.0.2.7", "bastion.lan:PORT"):
            served = _get(server, method, path, host, Authorization=f"Bearer {server.token}")
            assert served.status == 200, (method, path, host)
    assert _upgrade(server, "evil.example:PORT").startswith(b"HTTP/1.1 400 ")
    assert _upgrade(server, "127.0.0.1:PORT").startswith(b"HTTP/1.1 101 ")
    assert server.stop() == 0


def test_over_tls_the_certificate_binds_the_name_and_any_host_is_served(
    server_factory: Callable[..., ServerProcess],
) -> None:
    server = server_factory(args=("--http-port", "0"))
    assert _get(server, "GET", "/metrics", "evil.example:PORT", Authorization=f"Bearer {server.token}").status == 200
    assert server.stop() == 0


@pytest.mark.parametrize("name", ["", "http://bastion.lan", "bastion.lan:7401", "bastion lan", "a/b"])
def test_allowed_hosts_must_be_bare_names(name: str) -> None:
    with pytest.raises(UsageError, match=r"gateway\.allowed_hosts"):
        GatewayConfig(allowed_hosts=[name])


@pytest.mark.parametrize("upgrade", [False, True], ids=["request", "websocket"])
def test_a_request_with_two_host_headers_is_answered_400(world: World, upgrade: bool) -> None:
    """RFC 9112 3.2: a request with more than one Host field line MUST be answered 400. The Host check read the
    first only, so ``Host: 127.0.0.1`` then ``Host: evil.example`` passed it -- while a proxy in front may route
    (and a cache key) by the other."""
    assert world.gateway is not None
    port = world.gateway.port
    extra = (
        "Upgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
        "Sec-WebSocket-Version: 13\r\n"
        if upgrade
        else "Connection: close\r\n"
    )
    for first, second in ((f"127.0.0.1:{port}", "evil.example"), (f"127.0.0.1:{port}", f"127.0.0.1:{port}")):
        with socket.create_connection((world.gateway.host, port), timeout=10) as sock:
            path = "/ws" if upgrade else "/livez"
            sock.sendall(f"GET {path} HTTP/1.1\r\nHost: {first}\r\nHost: {second}\r\n{extra}\r\n".encode())
            answer = b""
            while b"\r\n\r\n" not in answer and (chunk := sock.recv(65536)):
                answer += chunk
        assert answer.startswith(b"HTTP/1.1 400 "), (first, second, answer[:200])
        assert b"x-content-type-options: nosniff" in answer.lower()
    assert request(world, "GET", "/livez").status == 200


@pytest.mark.parametrize("upgrade", [False, True], ids=["request", "websocket"])
def test_an_absolute_form_target_must_name_the_host_header(world: World, upgrade: bool) -> None:
    """RFC 9112 3.2.2: a request whose target is absolute-form (``GET http://name/path``) is for the target's
    authority, whatever its Host says (3.2: a client sends a Host identical to it). The gateway read the path and
    checked the Host, so ``GET http://evil.example/livez`` with ``Host: 127.0.0.1`` was served; it is answered 400
    (and a target with userinfo too). One naming the Host's own authority is served as before."""
    assert world.gateway is not None
    port = world.gateway.port
    path = "/ws" if upgrade else "/livez"
    extra = (
        "Upgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
        "Sec-WebSocket-Version: 13\r\n"
        if upgrade
        else "Connection: close\r\n"
    )
    own = f"127.0.0.1:{port}"
    # (uvicorn's WebSocket layer routes an upgrade by its whole target, so an absolute-form one finds no route: 403)
    served = b"403" if upgrade else b"200"
    cases = [
        (f"http://evil.example{path}", f"Host: {own}\r\n", b"400"),
        (f"http://evil.example:{port}{path}?a=1", f"Host: {own}\r\n", b"400"),
        (f"http://127.0.0.1:{port + 1}{path}", f"Host: {own}\r\n", b"400"),
        (f"http://user@{own}{path}", f"Host: {own}\r\n", b"400"),
        (f"http://evil.example{path}", "", b"400"),  # no Host at all
        (f"http://{own}{path}", f"Host: {own}\r\n", served),
        (f"HTTP://LOCALHOST:{port}{path}", f"Host: localhost:{port}\r\n", served),
    ]
    for target, host, status in cases:
        with socket.create_connection((world.gateway.host, port), timeout=10) as sock:
            sock.sendall(f"GET {target} HTTP/1.1\r\n{host}{extra}\r\n".encode())
            answer = b""
            while b"\r\n\r\n" not in answer and (chunk := sock.recv(65536)):
                answer += chunk
        assert answer.startswith(b"HTTP/1.1 " + status + b" "), (target, host, answer[:200])
        if status == b"400":
            assert b"x-content-type-options: nosniff" in answer.lower()
    assert request(world, "GET", "/livez").status == 200
