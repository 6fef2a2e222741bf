"""A plaintext gateway behind a TLS-terminating proxy: ``public_origins`` names the origin the browser sees.

The gateway judges an ``Origin`` against its own origin, ``scheme://<Host>``
as *it* receives the request: behind a proxy that is ``http://`` and the
proxy's Host, never the ``https://console.example`` the browser sent in its
Origin, so every POST and WebSocket upgrade the console makes is refused 403.
``gateway.public_origins`` lists the origins the gateway is served under;
they count as its own (POSTs and /ws), with no CORS headers, and their host
names as allowed Hosts. X-Forwarded-* headers are not trusted for any of it.
The proxy is played by the test: it sends what nginx would (``Host`` kept or
rewritten, the browser's ``Origin`` passed through).
"""

from __future__ import annotations

import socket
from collections.abc import Iterator
from urllib.parse import urlsplit

import msgspec
import pytest
from websockets.exceptions import InvalidStatus
from websockets.sync.client import connect as ws_connect

from bastion.exceptions import UsageError
from bastion.gateway import GatewayConfig
from bastion.gateway._http import origin_host
from tests.gateway.conftest import PASSWORD, World, bearer, http, start_world
from tests.gateway.test_gateway import RPC, rpc, ws_url

PUBLIC = "https://console.example"


@pytest.fixture(scope="module")
def proxied(tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    w = start_world(tmp_path_factory.mktemp("proxied"), GatewayConfig(http_port=0, public_origins=[PUBLIC]))
    yield w
    w.stop()


def _local_host(world: World) -> str:
    return urlsplit(world.url).netloc


def _hosts(world: World) -> list[str]:
    """The Host a proxy sends: the public name kept, or rewritten to the gateway's address."""
    return ["console.example", _local_host(world)]


def test_the_console_behind_a_proxy_logs_in_and_calls(proxied: World) -> None:
    for host in _hosts(proxied):
        browser = {"Origin": PUBLIC, "Host": host}
        login = http(proxied, "POST", "/v1/auth/login", {"username": "carol", "password": PASSWORD}, headers=browser)
        assert login.status == 200, (host, login)
        cookies = {c.split(";", 1)[0].split("=", 1)[0]: c.split(";", 1)[0].split("=", 1)[1] for c in login.cookies}
        csrf = cookies["__Host-bastion_csrf"]  # cookie_secure (the default): __Host- names, as over HTTPS
        jar = {**browser, "Cookie": "; ".join(f"{k}={v}" for k, v in cookies.items()), "X-CSRF-Token": csrf}
        assert http(proxied, "POST", "/v1/auth/whoami", {}, headers=jar).json()["name"] == "carol"
        bearer_call = http(proxied, "POST", RPC, rpc("auth.whoami"), headers={**bearer(proxied, "ada"), **browser})
        assert bearer_call.status == 200 and bearer_call.json()["result"]["name"] == "ada"  # the front's way too
        assert not any(k.startswith("access-control-") for k in bearer_call.headers)  # same origin: no CORS
        assert http(proxied, "POST", "/logout", headers=jar).json() == {"logged_out": True}


def test_the_websocket_behind_a_proxy(proxied: World) -> None:
    assert proxied.gateway is not None
    for host in _hosts(proxied):
        # The URL names the Host the proxy sends (one: an extra "Host" header would make two); the socket goes to
        # the gateway.
        sock = socket.create_connection((proxied.gateway.host, proxied.gateway.port), timeout=10)
        with ws_connect(f"ws://{host}/ws", sock=sock, origin=PUBLIC) as ws:  # type: ignore[arg-type]
            ws.send(msgspec.json.encode(rpc("auth.whoami")).decode())
            assert msgspec.json.decode(ws.recv(timeout=10))["result"]["name"] == "anonymous"


def test_other_origins_are_still_refused(proxied: World) -> None:
    for origin in ("https://evil.example", "http://console.example", "https://console.example:8443"):
        reply = http(proxied, "POST", RPC, rpc("auth.whoami"), headers={**bearer(proxied, "ada"), "Origin": origin})
        assert reply.status == 403, origin
        with pytest.raises(InvalidStatus) as info:
            ws_connect(ws_url(proxied), origin=origin)  # type: ignore[arg-type]
        assert info.value.response.status_code == 403
    # Forwarded headers do not make an origin the gateway's own.
    forged = {
        **bearer(proxied, "ada"),
        "Origin": "https://evil.example",
        "Host": "evil.example",
        "X-Forwarded-Host": "evil.example",
        "X-Forwarded-Proto": "https",
    }
    assert http(proxied, "POST", RPC, rpc("auth.whoami"), headers=forged).status == 400  # not an allowed Host


def test_without_the_setting_a_proxied_console_is_refused(world: World) -> None:
    """What ``public_origins`` is for: the gateway cannot know the public origin (nor trusts X-Forwarded-*)."""
    forwarded = {"Origin": PUBLIC, "Host": _local_host(world), "X-Forwarded-Proto": "https"}
    login = http(world, "POST", "/v1/auth/login", {"username": "carol", "password": PASSWORD}, headers=forwarded)
    assert login.status == 403 and login.json()["error"]["status"] == "PERMISSION_DENIED"


@pytest.mark.parametrize("bad", ["console.example", "https://console.example/", "*", "null", "HTTPS://X.EXAMPLE"])
def test_public_origins_must_be_origins(bad: str) -> None:
    with pytest.raises(UsageError, match=r"gateway\.public_origins"):
        GatewayConfig(public_origins=[bad])


@pytest.mark.parametrize(
    ("origin", "host"),
    [
        ("https://console.example", "console.example"),
        ("https://console.example:8443", "console.example"),
        ("http://10.0.0.7:7401", "10.0.0.7"),
        ("https://[2001:db8::1]:8443", "2001:db8::1"),
        ("https://[::1]", "::1"),
    ],
)
def test_origin_host(origin: str, host: str) -> None:
    assert origin_host(origin) == host
