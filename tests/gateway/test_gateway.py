"""The HTTP gateway against a real server over real TCP: JSON-RPC, /v1, /ws, cookies, limits."""

from __future__ import annotations

import base64
import logging
import socket
import subprocess
from pathlib import Path
from typing import Any

import msgspec
import pytest
from websockets.exceptions import InvalidStatus
from websockets.sync.client import ClientConnection
from websockets.sync.client import connect as ws_connect

import bastion
from bastion.client.aio import Client
from bastion.gateway.jsonrpc import json_depth
from tests.gateway.conftest import (
    LIMITED_BURST,
    PASSWORD,
    World,
    assert_security_headers,
    bearer,
    http,
    start_world,
    wait_for,
)

RPC = "/rpc"


def rpc(method: str, params: Any = None, ident: Any = 1) -> dict[str, Any]:
    call: dict[str, Any] = {"jsonrpc": "2.0", "method": method, "id": ident}
    if params is not None:
        call["params"] = params
    return call


def ws_url(world: World) -> str:
    return world.url.replace("http://", "ws://") + "/ws"


def ws_recv(ws: ClientConnection) -> Any:
    return msgspec.json.decode(ws.recv(timeout=10))


# -- JSON-RPC over HTTP ---------------------------------------------------------------


def test_a_batch_of_100_calls_gets_100_correct_responses(world: World) -> None:
    batch = [rpc("demo.echo", {"value": i}, ident=i) for i in range(100)]
    reply = http(world, "POST", RPC, batch, headers=bearer(world, "ada"))
    assert reply.status == 200
    answers = reply.json()
    assert len(answers) == 100
    assert sorted((a["id"], a["result"]) for a in answers) == [(i, i) for i in range(100)]


def test_each_call_in_a_batch_is_rate_limited_individually(world: World) -> None:
    batch = [rpc("demo.echo", {"value": i}, ident=i) for i in range(LIMITED_BURST + 7)]
    answers = http(world, "POST", RPC, batch, headers=bearer(world, "lim")).json()
    assert len(answers) == LIMITED_BURST + 7
    ok = [a for a in answers if "result" in a]
    refused = [a for a in answers if "error" in a]
    assert len(ok) == LIMITED_BURST and len(refused) == 7
    for answer in refused:
        assert answer["error"]["code"] == -32008
        assert answer["error"]["data"]["status"] == "RESOURCE_EXHAUSTED"
        assert answer["error"]["data"]["retry_after"] > 0
    # /v1 answers the same refusal as 429 with Retry-After.
    reply = http(world, "POST", "/v1/demo/echo", {"value": 1}, headers=bearer(world, "lim"))
    assert reply.status == 429 and int(reply.headers["retry-after"]) >= 1
    assert reply.json()["error"]["status"] == "RESOURCE_EXHAUSTED"


def test_the_spec_error_codes(world: World) -> None:
    auth = bearer(world, "ada")
    parse = http(world, "POST", RPC, raw=b'{"jsonrpc": "2.0", "method": ', headers=auth).json()
    assert parse["error"]["code"] == -32700 and parse["id"] is None
    version = http(world, "POST", RPC, {"jsonrpc": "1.0", "method": "demo.echo", "id": 3}, headers=auth).json()
    assert version["error"]["code"] == -32600 and version["id"] == 3
    unknown = http(world, "POST", RPC, rpc("demo.nope", {}), headers=auth).json()
    assert unknown["error"]["code"] == -32601 and unknown["error"]["data"]["status"] == "UNIMPLEMENTED"
    wrong_type = http(world, "POST", RPC, rpc("demo.echo_int", {"value": "x"}), headers=auth).json()
    assert wrong_type["error"]["code"] == -32602 and "value" in wrong_type["error"]["message"]
    missing = http(world, "POST", RPC, rpc("demo.echo_int", {}), headers=auth).json()
    assert missing["error"]["code"] == -32602
    extra = http(world, "POST", RPC, rpc("demo.echo_int", {"value": 1, "other": 2}), headers=auth).json()
    assert extra["error"]["code"] == -32602
    empty = http(world, "POST", RPC, [], headers=auth).json()
    assert empty["error"]["code"] == -32600 and empty["id"] is None
    junk = http(world, "POST", RPC, [1, "x"], headers=auth).json()
    assert [a["error"]["code"] for a in junk] == [-32600, -32600]
    bad_params = http(world, "POST", RPC, {"jsonrpc": "2.0", "method": "demo.echo", "params": 3, "id": 1}).json()
    assert bad_params["error"]["code"] == -32600
    positional = http(world, "POST", RPC, rpc("demo.echo_int", [41]), headers=auth).json()
    assert positional["result"] == "int:41"
    too_many = http(world, "POST", RPC, rpc("demo.echo_int", [1, 2]), headers=auth).json()
    assert too_many["error"]["code"] == -32602


def test_notifications_get_no_response(world: World) -> None:
    auth = bearer(world, "ada")
    only = http(world, "POST", RPC, [{"jsonrpc": "2.0", "method": "demo.echo", "params": {"value": 1}}], headers=auth)
    assert only.status == 204 and only.body == b""
    single = http(world, "POST", RPC, {"jsonrpc": "2.0", "method": "demo.nope"}, headers=auth)
    assert single.status == 204 and single.body == b""
    mixed = [{"jsonrpc": "2.0", "method": "demo.echo", "params": {"value": 1}}, rpc("demo.echo", {"value": 2}, "b")]
    assert http(world, "POST", RPC, mixed, headers=auth).json() == [{"jsonrpc": "2.0", "result": 2, "id": "b"}]


def test_credentials_are_the_servers(world: World) -> None:
    bad = {"Authorization": "Bearer bst_" + "x" * 43}
    assert http(world, "POST", "/v1/demo/echo", {"value": 1}, headers=bad).status == 401
    answer = http(world, "POST", RPC, rpc("demo.echo", {"value": 1}), headers=bad).json()
    assert answer["error"]["code"] == -32016 and answer["error"]["data"]["status"] == "UNAUTHENTICATED"
    # Anonymous callers: public methods only, and unknown methods are not told apart from private ones.
    assert http(world, "POST", "/v1/auth/whoami", {}).json()["name"] == "anonymous"
    assert http(world, "POST", "/v1/demo/echo", {"value": 1}).status == 401
    assert http(world, "POST", "/v1/demo/nope", {}).status == 401
    assert http(world, "POST", "/v1/demo/nope", {}, headers=bearer(world, "ada")).status == 404


def test_every_401_carries_a_bearer_challenge(world: World) -> None:
    """RFC 9110 (15.5.2): a 401 MUST carry WWW-Authenticate. Only /metrics' did; the API's 401s -- from the
    front (bearer requests) and from the Starlette routes (anonymous, cookie, login) -- said nothing of how."""
    bad = {"Authorization": "Bearer bst_" + "x" * 43}
    basic = {"Authorization": "Basic YWRhOnB3"}
    refusals = [
        http(world, "POST", "/v1/demo/echo", {"value": 1}, headers=bad),  # the front, after the bridge
        http(world, "POST", "/v1/demo/echo", {"value": 1}, headers=basic),  # the front, before it
        http(world, "POST", RPC, rpc("demo.echo", {"value": 1}), headers=basic),
        http(world, "POST", "/v1/demo/echo", {"value": 1}),  # Starlette: no credential
        http(world, "POST", "/v1/auth/login", {"username": "carol", "password": "wrong"}),
    ]
    for reply in refusals:
        assert reply.status == 401, reply
        assert reply.headers.get("www-authenticate", "").startswith("Bearer"), reply.headers
    assert "www-authenticate" not in http(world, "POST", "/v1/demo/nope", {}, headers=bearer(world, "ada")).headers


def test_server_streams_are_refused_on_rpc_with_a_pointer_to_ws(world: World) -> None:
    answer = http(world, "POST", RPC, rpc("kv.watch", {}), headers=bearer(world, "ada")).json()
    assert "/ws" in answer["error"]["message"]
    assert http(world, "POST", "/v1/kv/watch", {}, headers=bearer(world, "ada")).status == 400


def test_bytes_travel_as_base64(world: World) -> None:
    auth = bearer(world, "ada")
    value = bytes(range(256))
    encoded = base64.b64encode(value).decode()
    assert http(world, "POST", "/v1/kv/put", {"key": "b64", "value": encoded}, headers=auth).status == 200
    got = http(world, "POST", RPC, rpc("kv.get", {"key": "b64"}), headers=auth).json()["result"]
    assert base64.b64decode(got["value"]) == value
    not_base64 = http(world, "POST", "/v1/kv/put", {"key": "b64", "value": "!!!"}, headers=auth)
    assert not_base64.status == 400 and not_base64.json()["error"]["status"] == "INVALID_ARGUMENT"


# -- one rule set through every door -------------------------------------------------------


def test_permission_denied_through_every_door(world: World) -> None:
    async def native() -> str:
        async with Client(f"127.0.0.1:{world.native_port}", token=world.tokens["ada"], insecure=True) as client:
            with pytest.raises(bastion.PermissionDenied) as info:
                await client.call("demo.ops_only", tag="x")
            return info.value.message

    message = world.run(native())
    answer = http(world, "POST", RPC, rpc("demo.ops_only", {"tag": "x"}), headers=bearer(world, "ada")).json()
    assert answer["error"]["code"] == -32007
    assert answer["error"]["data"] == {"status": "PERMISSION_DENIED", "code": 7}
    assert answer["error"]["message"] == message
    v1 = http(world, "POST", "/v1/demo/ops_only", {"tag": "x"}, headers=bearer(world, "ada"))
    assert v1.status == 403 and v1.json()["error"]["message"] == message
    with ws_connect(ws_url(world)) as ws:
        ws.send(msgspec.json.encode(rpc("auth", {"token": world.tokens["ada"]}, "a")).decode())
        assert ws_recv(ws) == {"jsonrpc": "2.0", "result": {"authenticated": True}, "id": "a"}
        ws.send(msgspec.json.encode(rpc("demo.ops_only", {"tag": "x"}, 2)).decode())
        over_ws = ws_recv(ws)
    assert over_ws["error"]["code"] == -32007 and over_ws["error"]["message"] == message
    # The holder of the role passes through the same doors.
    assert http(world, "POST", "/v1/demo/ops_only", {"tag": "x"}, headers=bearer(world, "olga")).status == 200


# -- limits and headers ----------------------------------------------------------------------------


def _raw_exchange(world: World, head: bytes, body: bytes = b"") -> bytes:
    assert world.gateway is not None
    with socket.create_connection((world.gateway.host, world.gateway.port), timeout=10) as sock:
        sock.sendall(head + body)
        data = b""
        while b"\r\n\r\n" not in data:
            chunk = sock.recv(65536)
            if not chunk:
                break
            data += chunk
        return data


def test_oversized_bodies_are_refused_before_reading(world: World) -> None:
    # Declared too large: answered with no body byte sent at all.
    head = (
        b"POST /rpc HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\nContent-Length: 10485760\r\n\r\n"
    )
    assert _raw_exchange(world, head).startswith(b"HTTP/1.1 413")
    # Chunked: refused once the count passes the limit.
    chunk = b"[" + b" " * (world.config.max_body + 10) + b"]"
    head = b"POST /v1/demo/echo HTTP/1.1\r\nHost: 127.0.0.1\r\nTransfer-Encoding: chunked\r\n\r\n"
    body = f"{len(chunk):x}\r\n".encode() + chunk + b"\r\n0\r\n\r\n"
    assert _raw_exchange(world, head, body).startswith(b"HTTP/1.1 413")


class _Records(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


@pytest.mark.parametrize("path", ["/rpc", "/v1/demo/echo", "/v1/auth/login"])
def test_a_client_leaving_mid_body_is_not_logged_as_an_error(world: World, path: str) -> None:
    """Any client can hang up halfway through a body: that is no server error, with no traceback to log."""
    assert world.gateway is not None
    records = _Records()
    loggers = [logging.getLogger(name) for name in ("bastion.gateway", "uvicorn.error")]
    for logger in loggers:
        logger.addHandler(records)
    tasks = world.gateway._uvicorn.server_state.tasks
    try:
        with socket.create_connection((world.gateway.host, world.gateway.port), timeout=10) as sock:
            head = (
                f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                "Content-Type: application/json\r\nContent-Length: 100\r\n\r\n"
            )
            sock.sendall(head.encode() + b'{"value"')
            wait_for(lambda: len(tasks) == 1)  # the request is being served: its body read
        wait_for(lambda: not tasks)  # and it is done with
    finally:
        for logger in loggers:
            logger.removeHandler(records)
    assert [r.getMessage() for r in records.records] == []
    assert http(world, "GET", "/livez").status == 200


def test_a_batch_answers_the_public_document_once(world: World) -> None:
    """rpc.discover needs no credentials and answers up to tens of KB: a batch of them is not a megabyte
    amplifier."""
    batch = [rpc("rpc.discover", ident=i) for i in range(99)] + [rpc("demo.echo", {"value": 1}, ident="e")]
    for auth in ({}, bearer(world, "ada")):  # the Starlette routes and the front
        reply = http(world, "POST", RPC, batch, headers=auth)
        assert reply.status == 200
        answers = {a["id"]: a for a in reply.json()}
        assert answers[0]["result"]["openrpc"]
        assert all(answers[i]["error"]["code"] == -32600 for i in range(1, 99))
        assert ("result" in answers["e"]) is bool(auth)
        one = http(world, "POST", RPC, rpc("rpc.discover"), headers=auth).body
        assert len(reply.body) < len(one) + 150 * len(batch)  # one document, and a short refusal for each other
    with ws_connect(ws_url(world)) as ws:
        ws.send(msgspec.json.encode(batch).decode())
        answers = {a["id"]: a for a in ws_recv(ws)}
        assert answers[0]["result"]["openrpc"] and answers[98]["error"]["code"] == -32600


def test_json_depth_is_bounded(world: World) -> None:
    deep: Any = 1
    for _ in range(world.config.max_json_depth + 5):
        deep = [deep]
    answer = http(world, "POST", RPC, rpc("demo.echo", {"value": deep}), headers=bearer(world, "ada")).json()
    assert answer["error"]["code"] == -32600 and "nested" in answer["error"]["message"]
    assert http(world, "POST", "/v1/demo/echo", {"value": deep}, headers=bearer(world, "ada")).status == 400
    # Brackets inside strings are not nesting.
    assert json_depth(b'{"a": "' + b"[" * 100 + b'"}', 32) <= 32
    shallow = http(world, "POST", "/v1/demo/echo", {"value": "[" * 100}, headers=bearer(world, "ada"))
    assert shallow.json() == "[" * 100


def test_security_headers_and_no_cors_by_default(world: World) -> None:
    reply = http(world, "GET", "/livez")
    assert reply.status == 200
    assert reply.headers["x-content-type-options"] == "nosniff"
    assert reply.headers["x-frame-options"] == "DENY"
    assert "frame-ancestors 'none'" in reply.headers["content-security-policy"]
    assert "default-src 'self'" in reply.headers["content-security-policy"]
    assert reply.headers["referrer-policy"] == "no-referrer"
    assert reply.headers["cache-control"] == "no-store"
    preflight = http(
        world,
        "OPTIONS",
        "/rpc",
        headers={"Origin": "https://elsewhere.example", "Access-Control-Request-Method": "POST"},
    )
    assert "access-control-allow-origin" not in preflight.headers
    cross = http(
        world, "POST", "/v1/demo/echo", {"value": 1}, headers={**bearer(world, "ada"), "Origin": "https://x.example"}
    )
    assert cross.status == 403


def test_openapi_document(world: World) -> None:
    doc = http(world, "GET", "/openapi.json", headers=bearer(world, "root")).json()  # an admin's: every method
    assert doc["openapi"].startswith("3.1")
    put = doc["paths"]["/v1/kv/put"]["post"]
    schema = put["requestBody"]["content"]["application/json"]["schema"]
    ref = schema["$ref"].rsplit("/", 1)[1]
    assert set(doc["components"]["schemas"][ref]["required"]) == {"key", "value"}
    assert "/v1/kv/watch" not in doc["paths"]  # streams are for /ws
    assert doc["paths"]["/v1/demo/ops_only"]["post"]["x-bastion-roles"] == ["ops"]
    discover = http(world, "POST", RPC, rpc("rpc.discover"), headers=bearer(world, "ada")).json()["result"]
    assert {m["name"] for m in discover["methods"]} >= {"kv.put", "kv.watch", "demo.echo"}


# -- cookies and CSRF -------------------------------------------------------------------------------


def _cookie_values(set_cookies: list[str]) -> dict[str, str]:
    return {c.split(";", 1)[0].split("=", 1)[0]: c.split(";", 1)[0].split("=", 1)[1] for c in set_cookies}


def test_cookie_login_csrf_and_logout(world: World) -> None:
    wrong = http(world, "POST", "/v1/auth/login", {"username": "carol", "password": "nope"})
    assert wrong.status == 401 and not wrong.cookies
    login = http(world, "POST", "/v1/auth/login", {"username": "carol", "password": PASSWORD})
    assert login.status == 200
    session = next(c for c in login.cookies if c.startswith("__Host-bastion_session="))
    lowered = session.lower()
    assert "httponly" in lowered and "secure" in lowered and "samesite=strict" in lowered
    cookies = _cookie_values(login.cookies)
    assert cookies["__Host-bastion_session"].startswith("bst_")
    assert cookies["__Host-bastion_session"].encode() not in login.body  # the token never reaches a page
    assert login.json()["csrf_token"] == cookies["__Host-bastion_csrf"]
    jar = {"Cookie": "; ".join(f"{name}={value}" for name, value in cookies.items())}
    no_csrf = http(world, "POST", "/v1/auth/whoami", {}, headers=jar)
    assert no_csrf.status == 403
    with_csrf = {**jar, "X-CSRF-Token": cookies["__Host-bastion_csrf"]}
    assert http(world, "POST", "/v1/auth/whoami", {}, headers=with_csrf).json()["name"] == "carol"
    forged = http(world, "POST", RPC, rpc("auth.whoami"), headers={**jar, "X-CSRF-Token": "guess"})
    assert forged.status == 403 and forged.json()["error"]["data"]["status"] == "PERMISSION_DENIED"
    assert http(world, "POST", RPC, rpc("auth.whoami"), headers=with_csrf).json()["result"]["name"] == "carol"
    logout = http(world, "POST", "/logout", headers=with_csrf)
    assert logout.status == 200 and logout.json() == {"logged_out": True}
    assert all("max-age=0" in c.lower() for c in logout.cookies) and len(logout.cookies) == 2
    # The token is revoked at the server, not just forgotten by the browser.
    assert http(world, "POST", "/v1/auth/whoami", {}, headers=with_csrf).status == 401


# -- WebSocket --------------------------------------------------------------------------------------


def test_websocket_origin_allow_list(world: World) -> None:
    with pytest.raises(InvalidStatus) as info:
        ws_connect(ws_url(world), origin="https://evil.example")  # type: ignore[arg-type]
    assert info.value.response.status_code == 403
    assert_security_headers(world, info.value.response.headers)  # as every other answer
    assert msgspec.json.decode(info.value.response.body)["error"]["status"] == "PERMISSION_DENIED"
    with ws_connect(ws_url(world), origin=world.url) as ws:  # type: ignore[arg-type]
        ws.send(msgspec.json.encode(rpc("auth.whoami")).decode())
        assert ws_recv(ws)["result"]["name"] == "anonymous"


def test_an_upgrade_with_a_bad_authorization_header_is_answered_401(world: World) -> None:
    """UNAUTHENTICATED maps to 401 (with the Bearer challenge) at every door: a WebSocket upgrade whose
    Authorization header is not Bearer was answered 403 with an UNAUTHENTICATED body."""
    with pytest.raises(InvalidStatus) as info:
        ws_connect(ws_url(world), additional_headers={"Authorization": "Basic YWRhOnB3"})
    response = info.value.response
    assert response.status_code == 401
    assert msgspec.json.decode(response.body)["error"]["status"] == "UNAUTHENTICATED"
    assert response.headers["WWW-Authenticate"].startswith("Bearer")
    assert_security_headers(world, response.headers)


def test_kv_watch_over_websocket_delivers_changes_and_cancels(world: World) -> None:
    headers = bearer(world, "ada")
    with ws_connect(ws_url(world), additional_headers=headers) as ws:
        ws.send(msgspec.json.encode(rpc("kv.watch", {"prefix": "watched/"}, "w1")).decode())
        start = ws_recv(ws)
        assert start["method"] == "stream.item" and start["params"]["id"] == "w1"
        assert start["params"]["item"]["type"] == "start"
        value = base64.b64encode(b"hello").decode()
        assert http(world, "POST", "/v1/kv/put", {"key": "watched/a", "value": value}, headers=headers).status == 200
        change = ws_recv(ws)
        item = change["params"]["item"]
        assert (item["type"], item["key"], base64.b64decode(item["value"])) == ("put", "watched/a", b"hello")
        # Plain calls still answer while the stream is open.
        ws.send(msgspec.json.encode(rpc("demo.echo", {"value": 7}, 2)).decode())
        assert ws_recv(ws) == {"jsonrpc": "2.0", "result": 7, "id": 2}
        ws.send(msgspec.json.encode(rpc("stream.cancel", {"id": "w1"}, 3)).decode())
        answers = {msg["id"]: msg for msg in (ws_recv(ws), ws_recv(ws))}
        assert answers[3]["result"] is True
        assert answers["w1"]["error"]["data"]["status"] == "CANCELLED"


def test_calls_sent_right_after_a_websocket_auth_run_as_its_user(world: World) -> None:
    """A client need not wait for the "auth" answer: what it sends next runs as the user it named."""
    auth = rpc("auth", {"token": world.tokens["ada"]}, 0)
    for _ in range(10):
        with ws_connect(ws_url(world)) as ws:
            ws.send(msgspec.json.encode(auth).decode())
            for ident in range(1, 6):
                ws.send(msgspec.json.encode(rpc("auth.whoami", ident=ident)).decode())
            ws.send(msgspec.json.encode(rpc("kv.watch", {"prefix": "after-auth/"}, "w")).decode())
            answers = [ws_recv(ws) for _ in range(7)]
            assert answers[0] == {"jsonrpc": "2.0", "result": {"authenticated": True}, "id": 0}
            names = {a["id"]: a["result"]["name"] for a in answers if a.get("id") in range(1, 6)}
            assert names == dict.fromkeys(range(1, 6), "ada")
            items = [a for a in answers if a.get("method") == "stream.item"]
            assert [i["params"]["item"]["type"] for i in items] == ["start"]


# -- curl ----------------------------------------------------------------------------------------------


def test_curl_against_rpc_and_v1(world: World) -> None:
    token = world.tokens["ada"]

    def curl(path: str, body: str) -> Any:
        out = subprocess.run(
            ["curl", "-sS", "--fail-with-body", "-H", f"Authorization: Bearer {token}", "-H",
             "Content-Type: application/json", "--data-binary", body, world.url + path],
            capture_output=True, check=True, timeout=30,
        )  # fmt: skip
        return msgspec.json.decode(out.stdout)

    assert curl("/rpc", '{"jsonrpc":"2.0","method":"demo.length","params":{"text":"abc"},"id":"c"}') == {
        "jsonrpc": "2.0",
        "result": 3,
        "id": "c",
    }
    assert curl("/v1/demo/echo_str", '{"value":"hi"}') == "str:hi"


# -- readiness -------------------------------------------------------------------------------------------


def test_readyz_turns_503_while_draining(tmp_path: Path) -> None:
    world = start_world(tmp_path)
    try:
        assert http(world, "GET", "/readyz").status == 200
        assert http(world, "GET", "/healthz").json() == {"status": "ready"}
        assert world.server is not None
        world.run(world.server.shutdown(grace=1))
        assert http(world, "GET", "/readyz").status == 503
        assert http(world, "GET", "/healthz").json() == {"status": "draining"}
        assert http(world, "GET", "/livez").status == 200
    finally:
        world.stop()


def test_an_upload_with_an_unknown_query_argument_is_refused_without_echoing_it(world: World) -> None:
    """An upload's query arguments are converted to the method's arguments, which forbid unknown names:
    msgspec named an unknown one in full, and a 50,000-character name came back whole in the error."""
    headers = {**bearer(world, "ada"), "Content-Type": "application/octet-stream"}
    reply = http(world, "POST", f"/v1/demo/take?{'q' * 50_000}=1", headers=headers, raw=b"abc")
    assert reply.status == 400, reply.body[:200]
    error = msgspec.json.decode(reply.body)["error"]
    assert error["status"] == "INVALID_ARGUMENT" and "bad query arguments" in error["message"]
    assert len(error["message"]) < 400, len(error["message"])
