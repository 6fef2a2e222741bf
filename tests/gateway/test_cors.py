"""CORS over a real gateway: ``cors_origins`` lists the origins whose pages may call the API, without cookies.

A preflight (OPTIONS with ``Access-Control-Request-Method``) from a listed
origin is answered with exactly that origin, the methods (GET, POST), the
request headers (Authorization, Content-Type, X-CSRF-Token) and no
``Access-Control-Allow-Credentials``: a page elsewhere uses a bearer token,
never the console's cookies. A preflight from any other origin, or asking for
another method or header, is refused with a coded error; the real request
from another origin is refused 403 by the gateway's own Origin check. Answers
to a listed origin carry ``Access-Control-Allow-Origin`` whatever their
status -- a 413 and a 429's ``Retry-After`` too, so the page can read why.
With ``cors_origins`` empty (the default) CORS is off: no answer carries an
``Access-Control-*`` header.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest

from bastion.gateway import GatewayConfig
from tests.gateway.conftest import LIMITED_BURST, SECURITY_HEADERS, World, bearer, http, start_world
from tests.gateway.test_gateway import RPC, rpc

APP = "https://app.example"
OTHER = "https://other.example"


@pytest.fixture(scope="module")
def cors(tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    config = GatewayConfig(http_port=0, cors_origins=[APP, "http://localhost:3000"], max_body=4096)
    w = start_world(tmp_path_factory.mktemp("cors"), config)
    yield w
    w.stop()


def _preflight(world: World, origin: str, method: str = "POST", headers: str | None = None, path: str = RPC) -> Any:
    request = {"Origin": origin, "Access-Control-Request-Method": method}
    if headers is not None:
        request["Access-Control-Request-Headers"] = headers
    return http(world, "OPTIONS", path, headers=request)


def _cors_headers(headers: dict[str, str]) -> dict[str, str]:
    return {k: v for k, v in headers.items() if k.startswith("access-control-")}


def _listed(value: str) -> set[str]:
    return {part.strip().lower() for part in value.split(",")}


def test_a_preflight_from_a_listed_origin(cors: World) -> None:
    for path in (RPC, "/v1/kv/get", "/v1/auth/whoami"):
        reply = _preflight(cors, APP, headers="authorization, content-type, x-csrf-token", path=path)
        assert reply.status == 200, reply
        assert reply.headers["access-control-allow-origin"] == APP  # that origin, never "*"
        assert _listed(reply.headers["access-control-allow-methods"]) == {"get", "post"}
        assert _listed(reply.headers["access-control-allow-headers"]) >= {
            "authorization",
            "content-type",
            "x-csrf-token",
        }
        assert reply.headers["access-control-max-age"] == "600"
        assert "access-control-allow-credentials" not in reply.headers  # no cookies cross-origin
        assert "origin" in _listed(reply.headers["vary"])
        for name in SECURITY_HEADERS:  # as every answer
            assert name in reply.headers, name
    other_port = _preflight(cors, "http://localhost:3000", method="GET", path="/openapi.json")
    assert other_port.headers["access-control-allow-origin"] == "http://localhost:3000"


def test_the_request_after_the_preflight(cors: World) -> None:
    headers = {**bearer(cors, "ada"), "Origin": APP}
    reply = http(cors, "POST", RPC, rpc("auth.whoami"), headers=headers)
    assert reply.status == 200 and reply.json()["result"]["name"] == "ada"
    assert reply.headers["access-control-allow-origin"] == APP
    assert "access-control-allow-credentials" not in reply.headers
    assert "origin" in _listed(reply.headers["vary"])
    v1 = http(cors, "POST", "/v1/demo/echo", {"value": 3}, headers=headers)
    assert (v1.status, v1.json(), v1.headers["access-control-allow-origin"]) == (200, 3, APP)
    # An error answer carries it too, so the page can read the error.
    denied = http(cors, "POST", "/v1/demo/ops_only", {"tag": "x"}, headers=headers)
    assert denied.status == 403 and denied.headers["access-control-allow-origin"] == APP


def test_a_listed_origin_can_read_a_413_and_a_retry_after(cors: World) -> None:
    headers = {**bearer(cors, "ada"), "Origin": APP}
    big = http(cors, "POST", "/v1/demo/echo", {"value": "x" * 5000}, headers=headers)
    assert big.status == 413 and big.json()["error"]["status"] == "RESOURCE_EXHAUSTED"
    assert big.headers.get("access-control-allow-origin") == APP
    limited = {**bearer(cors, "lim"), "Origin": APP}
    for _ in range(LIMITED_BURST + 5):
        reply = http(cors, "POST", "/v1/demo/echo", {"value": 1}, headers=limited)
        if reply.status == 429:
            break
    assert reply.status == 429 and "retry-after" in reply.headers
    assert reply.headers.get("access-control-allow-origin") == APP
    assert "retry-after" in _listed(reply.headers.get("access-control-expose-headers", ""))


@pytest.mark.parametrize(
    ("origin", "method", "headers", "refused"),
    [
        (OTHER, "POST", "content-type", "origin"),
        ("null", "POST", None, "origin"),
        ("https://app.example.evil.example", "POST", None, "origin"),
        ("http://app.example", "POST", None, "origin"),  # another scheme is another origin
        (APP, "PUT", None, "method"),
        (APP, "DELETE", None, "method"),
        (APP, "POST", "authorization, x-other", "headers"),
        (APP, "POST", "cookie", "headers"),
    ],
)
def test_a_preflight_outside_the_settings_is_refused(
    cors: World, origin: str, method: str, headers: str | None, refused: str
) -> None:
    reply = _preflight(cors, origin, method, headers)
    assert reply.status == 403, reply
    error = reply.json()["error"]
    assert error["status"] == "PERMISSION_DENIED" and refused in error["message"]
    # Not even for a listed origin asking for too much (Starlette had set it; docs/gateway.md says without).
    assert "access-control-allow-origin" not in reply.headers
    for name in SECURITY_HEADERS:
        assert name in reply.headers, name


def test_a_request_from_an_unlisted_origin_is_refused(cors: World) -> None:
    reply = http(cors, "POST", RPC, rpc("auth.whoami"), headers={**bearer(cors, "ada"), "Origin": OTHER})
    assert reply.status == 403 and reply.json()["error"]["data"]["status"] == "PERMISSION_DENIED"
    assert _cors_headers(reply.headers) == {}
    login = http(cors, "POST", "/v1/auth/login", {"username": "carol", "password": "x"}, headers={"Origin": OTHER})
    assert login.status == 403 and not login.cookies and _cors_headers(login.headers) == {}
    # A GET (no Origin check: nothing changes) is answered, but without CORS headers the page cannot read it.
    livez = http(cors, "GET", "/livez", headers={"Origin": OTHER})
    assert livez.status == 200 and _cors_headers(livez.headers) == {}


def test_the_same_origin_console_is_not_affected(cors: World) -> None:
    """The gateway's own origin is not in ``cors_origins`` and needs no CORS headers (same-origin)."""
    reply = http(cors, "POST", RPC, rpc("auth.whoami"), headers={**bearer(cors, "ada"), "Origin": cors.url})
    assert reply.status == 200 and _cors_headers(reply.headers) == {}


def test_cors_off_by_default(world: World) -> None:
    assert world.config.cors_origins == []
    preflight = _preflight(world, APP, headers="authorization")
    assert preflight.status == 405 and _cors_headers(preflight.headers) == {}
    reply = http(world, "POST", RPC, rpc("auth.whoami"), headers={**bearer(world, "ada"), "Origin": APP})
    assert reply.status == 403 and _cors_headers(reply.headers) == {}
    same = http(world, "GET", "/openapi.json", headers={"Origin": APP})
    assert same.status == 200 and _cors_headers(same.headers) == {}
