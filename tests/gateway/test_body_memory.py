"""Decoded JSON bodies count against ``limits.max_args_memory``, on a real ``bastion serve``.

A 1 MiB JSON body of empty arrays decodes to some 20 MB of Python objects,
and the gateway holds it for as long as the request runs -- a batch's
values for as long as its slowest call. The server's own accounting starts
only when a call reaches it, so without the gateway's, a few hundred such
requests from one client (each 429-free) held gigabytes. Past the limit a
request is refused RESOURCE_EXHAUSTED (HTTP 429, Retry-After) before it is
decoded, and everyone else is served.
"""

from __future__ import annotations

import json
import os
import socket
import struct
import threading
import urllib.error
import urllib.request
from collections.abc import Iterator
from typing import Any

import pytest

from tests.gateway.test_ws_abuse import open_ws, read_frame
from tests.support.server import ServerProcess, start_server

JUNK = "[" + ",".join(["[]"] * 340_000) + "]"  # ~1 MB of JSON, ~20 MB decoded
LIMIT = 80 << 20  # the least limits.max_args_memory allows (80 x max_frame): three such bodies at once


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    env = {"BASTION_LIMITS__MAX_ARGS_MEMORY": str(LIMIT)}
    server = start_server(tmp_path_factory.mktemp("body-memory"), env=env, insecure=True, http=True)
    try:
        yield server
    finally:
        assert server.stop() == 0, server.log()


def _post(server: ServerProcess, path: str, body: bytes) -> tuple[int, dict[str, str], Any]:
    assert server.gateway_url is not None
    headers = {"Content-Type": "application/json", "Authorization": f"Bearer {server.token}"}
    request = urllib.request.Request(server.gateway_url + path, data=body, headers=headers)
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            return response.status, dict(response.headers), json.loads(response.read())
    except urllib.error.HTTPError as exc:
        return exc.code, dict(exc.headers), json.loads(exc.read())


def _concurrently(n: int, request: Any) -> list[Any]:
    results: list[Any] = [None] * n

    def run(i: int) -> None:
        results[i] = request()

    threads = [threading.Thread(target=run, args=(i,)) for i in range(n)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(90)
    return results


def test_big_bodies_past_the_args_memory_limit_are_refused_429(served: ServerProcess) -> None:
    batch = (
        '[{"jsonrpc":"2.0","method":"demo.slow","params":{"seconds":3},"id":1},'
        '{"jsonrpc":"2.0","method":"demo.length","params":{"text":"x"},"id":2,"junk":' + JUNK + "}]"
    ).encode()
    results = _concurrently(8, lambda: _post(served, "/rpc", batch))
    refused = [r for r in results if r[0] == 429]
    assert refused, [r[0] for r in results]
    for _, headers, body in refused:
        assert body["error"]["data"]["status"] == "RESOURCE_EXHAUSTED"
        assert "max_args_memory" in body["error"]["message"]
        assert headers["retry-after"] == "1"
    assert any(r[0] == 200 for r in results)  # those under the limit were served
    # A /v1 body is counted too: while slow batches hold the memory, a big /v1 call is refused.
    holders = [threading.Thread(target=_post, args=(served, "/rpc", batch)) for _ in range(4)]
    for thread in holders:
        thread.start()
    seen = []
    while any(thread.is_alive() for thread in holders):
        status, _, body = _post(served, "/v1/demo/echo", b'{"value": ' + JUNK.encode() + b"}")
        seen.append(status)
        if status == 429:
            assert body["error"]["status"] == "RESOURCE_EXHAUSTED"
            break
    for thread in holders:
        thread.join(60)
    assert 429 in seen, seen
    # Once they are done the memory is given back: the same body goes through again.
    status, _, body = _post(served, "/rpc", batch)
    assert status == 200 and body[0]["result"] == 3


def _text_frame(payload: bytes) -> bytes:
    mask = os.urandom(4)
    masked = bytes(b ^ mask[i % 4] for i, b in enumerate(payload))
    return struct.pack("!BBQ", 0x81, 0x80 | 127, len(payload)) + mask + masked


def test_big_websocket_messages_past_the_limit_are_refused(served: ServerProcess) -> None:
    sock = open_ws(served)
    try:
        sock.settimeout(60)
        message = (
            '[{"jsonrpc":"2.0","method":"demo.slow","params":{"seconds":3},"id":1},'
            '{"jsonrpc":"2.0","method":"demo.length","params":{"text":"x"},"id":2,"junk":' + JUNK + "}]"
        ).encode()
        auth = {"jsonrpc": "2.0", "method": "auth", "params": {"token": served.token}, "id": 0}
        sock.sendall(_text_frame(json.dumps(auth).encode()))
        assert json.loads(read_frame(sock)[1])["result"] == {"authenticated": True}
        frame = _text_frame(message)
        for _ in range(6):
            sock.sendall(frame)
        answers = [json.loads(read_frame(sock)[1]) for _ in range(6)]
        refused = [a for a in answers if isinstance(a, dict) and "error" in a]
        assert refused, [str(a)[:300] for a in answers]
        assert all(a["error"]["data"]["status"] == "RESOURCE_EXHAUSTED" for a in refused)
        assert any(isinstance(a, list) for a in answers)
    finally:
        sock.close()
    with socket.create_connection(("127.0.0.1", served.port), timeout=5):
        pass  # the native port, in the same process, still accepts
