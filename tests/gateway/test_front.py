"""The gateway's front (bastion/gateway/front.py): the hot routes in plain ASGI answer as Starlette's do.

A bearer-token POST to /rpc or /v1 is answered by the front; the same call
with the session cookie (and its CSRF header) goes to the Starlette routes.
The same user through both doors must get the same status, body and headers.
"""

from __future__ import annotations

from typing import Any

import pytest

from tests.gateway.conftest import PASSWORD, Reply, World, bearer, http
from tests.gateway.test_gateway import _raw_exchange, rpc

#: Headers every API answer carries, whichever door took the request.
SAME_HEADERS = (
    "content-type",
    "content-security-policy",
    "x-content-type-options",
    "x-frame-options",
    "referrer-policy",
    "cache-control",
    "retry-after",
)

CASES: list[tuple[str, Any]] = [
    ("/v1/demo/echo", {"value": {"nested": [1, 2.5, "three", None]}}),
    ("/v1/demo/echo_int", {"value": "not a number"}),
    ("/v1/demo/ops_only", {"tag": "x"}),
    ("/v1/demo/nope", {}),
    ("/v1/demo/count", {"n": 2}),
    ("/v1/demo/echo", [1, 2]),
    ("/rpc", rpc("demo.echo", {"value": "hi"})),
    ("/rpc", [rpc("demo.echo", {"value": i}, ident=i) for i in range(3)] + [{"jsonrpc": "1.0", "id": 9}]),
    ("/rpc", rpc("demo.ops_only", {"tag": "x"})),
    ("/rpc", {"jsonrpc": "2.0", "method": "demo.echo", "params": {"value": 1}}),  # a notification: 204
]


@pytest.fixture(scope="module")
def cookie_jar(world: World) -> dict[str, str]:
    login = http(world, "POST", "/v1/auth/login", {"username": "carol", "password": PASSWORD})
    assert login.status == 200
    cookies = {c.split(";", 1)[0].split("=", 1)[0]: c.split(";", 1)[0].split("=", 1)[1] for c in login.cookies}
    return {
        "Cookie": "; ".join(f"{name}={value}" for name, value in cookies.items()),
        "X-CSRF-Token": cookies["__Host-bastion_csrf"],
    }


def _same(front: Reply, starlette: Reply) -> None:
    assert front.status == starlette.status, (front, starlette)
    assert (front.json() if front.body else None) == (starlette.json() if starlette.body else None)
    for name in SAME_HEADERS:
        assert front.headers.get(name) == starlette.headers.get(name), name


@pytest.mark.parametrize(("path", "body"), CASES)
def test_both_doors_answer_alike(world: World, cookie_jar: dict[str, str], path: str, body: Any) -> None:
    front = http(world, "POST", path, body, headers=bearer(world, "carol"))
    starlette = http(world, "POST", path, body, headers=cookie_jar)
    _same(front, starlette)


def test_the_front_answers_with_the_security_headers(world: World) -> None:
    reply = http(world, "POST", "/v1/demo/echo", {"value": 1}, headers=bearer(world, "ada"))
    assert reply.status == 200 and reply.json() == 1
    assert reply.headers["content-type"] == "application/json"
    assert reply.headers["x-frame-options"] == "DENY" and reply.headers["cache-control"] == "no-store"
    assert "frame-ancestors 'none'" in reply.headers["content-security-policy"]


def test_the_fronts_refusals(world: World) -> None:
    basic = {"Authorization": "Basic YWRhOng="}
    v1 = http(world, "POST", "/v1/demo/echo", {"value": 1}, headers=basic)
    assert v1.status == 401 and v1.json()["error"]["status"] == "UNAUTHENTICATED"
    answer = http(world, "POST", "/rpc", rpc("demo.echo", {"value": 1}), headers=basic)
    assert answer.status == 401 and answer.json()["id"] is None and answer.json()["error"]["code"] == -32016
    forged = http(
        world,
        "POST",
        "/rpc",
        rpc("demo.echo", {"value": 1}),
        headers={**bearer(world, "ada"), "Origin": "https://evil.example"},
    )
    assert forged.status == 403 and forged.json()["error"]["data"]["status"] == "PERMISSION_DENIED"
    own = http(world, "POST", "/v1/demo/echo", {"value": 2}, headers={**bearer(world, "ada"), "Origin": world.url})
    assert own.status == 200 and own.json() == 2
    wrong = http(world, "POST", "/v1/demo/echo", {"value": 1}, headers={"Authorization": "Bearer bst_not-a-token"})
    assert wrong.status == 401


def test_the_front_bounds_bodies(world: World) -> None:
    token = world.tokens["ada"].encode()
    auth = b"Authorization: Bearer " + token + b"\r\n"
    declared = b"POST /v1/demo/echo HTTP/1.1\r\nHost: 127.0.0.1\r\n" + auth + b"Content-Length: 10485760\r\n\r\n"
    assert _raw_exchange(world, declared).startswith(b"HTTP/1.1 413")
    chunk = b"[" + b" " * (world.config.max_body + 10) + b"]"
    chunked = b"POST /rpc HTTP/1.1\r\nHost: 127.0.0.1\r\n" + auth + b"Transfer-Encoding: chunked\r\n\r\n"
    body = f"{len(chunk):x}\r\n".encode() + chunk + b"\r\n0\r\n\r\n"
    assert _raw_exchange(world, chunked, body).startswith(b"HTTP/1.1 413")


def test_what_the_front_passes_on(world: World) -> None:
    auth = bearer(world, "ada")
    assert http(world, "POST", "/v1/demo/echo/extra", {"value": 1}, headers=auth).status == 404
    assert http(world, "GET", "/rpc", headers=auth).status == 405
    login = http(world, "POST", "/v1/auth/login", {"username": "carol", "password": PASSWORD}, headers=auth)
    assert login.status == 200 and login.cookies  # Starlette's login route, bearer header or not
