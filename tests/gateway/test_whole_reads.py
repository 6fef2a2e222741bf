"""A request that arrives whole in one read is served, however large (within ``max_body``).

The gateway's HTTP protocol bounds a request's head to ``MAX_HEAD`` bytes by
counting the reads that carry an unfinished head. A read that holds a whole
request -- head and a body past ``MAX_HEAD`` -- carries no unfinished head:
it must be served, not taken for an endless head and have its connection
closed under it. (That happened when a keep-alive connection had a whole
upload request waiting by the time the server read it: the browser, seeing
the connection close with no answer, sent the request again on a new
connection while the first was still being served, and the upload was
refused as "being written by another call".)

Deterministic: the request is written into one end of a socket pair before
the gateway's protocol (under uvicorn) takes the other end, so its first
read holds all of it.
"""

from __future__ import annotations

import asyncio
import socket
from typing import Any

import uvicorn
from uvicorn.server import ServerState

from bastion.gateway._protocol import MAX_HEAD, bounded_protocol


async def _body_size(scope: dict[str, Any], receive: Any, send: Any) -> None:
    """Reads the whole body and answers its size."""
    size = 0
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            return
        size += len(message.get("body", b""))
        if not message.get("more_body", False):
            break
    body = str(size).encode()
    await send({"type": "http.response.start", "status": 200, "headers": [(b"content-length", b"%d" % len(body))]})
    await send({"type": "http.response.body", "body": body})


def _request(size: int) -> bytes:
    return b"POST /upload HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n" % size + b"x" * size


async def _answer(loop: asyncio.AbstractEventLoop, sock: socket.socket) -> bytes:
    """One answer (head and ``Content-Length`` body), or what came before the server closed."""
    data = b""
    while b"\r\n\r\n" not in data or len(data.split(b"\r\n\r\n", 1)[1]) < _length(data):
        chunk = await loop.sock_recv(sock, 65536)
        if not chunk:
            break
        data += chunk
    return data


def _length(answer: bytes) -> int:
    for line in answer.split(b"\r\n\r\n", 1)[0].split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            return int(value)
    return 0


async def _serve(first: bytes, then: bytes) -> tuple[bytes, bytes]:
    """Write ``first`` before the gateway's protocol reads at all, and ``then`` once ``first`` is
    answered, on the same connection: the two answers (b"" for one never given)."""
    config = uvicorn.Config(
        _body_size, http=bounded_protocol(5.0), lifespan="off", log_level="warning", access_log=False
    )
    config.load()
    state = ServerState()
    ours, theirs = socket.socketpair()
    with ours, theirs:
        theirs.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 1 << 20)
        theirs.sendall(first)
        theirs.setblocking(False)
        loop = asyncio.get_running_loop()
        transport, _ = await loop.connect_accepted_socket(
            lambda: config.http_protocol_class(config=config, server_state=state, app_state={}), ours
        )
        try:
            async with asyncio.timeout(5):
                one = await _answer(loop, theirs)
                two = b""
                if one:
                    await loop.sock_sendall(theirs, then)
                    two = await _answer(loop, theirs)
        finally:
            transport.close()
    return one, two


def test_a_whole_request_past_max_head_in_one_read_is_served_and_the_connection_kept() -> None:
    size = 2 * MAX_HEAD  # head and body together far past MAX_HEAD, and within one read (256 KiB)
    one, two = asyncio.run(_serve(_request(size), _request(10)))
    assert one.startswith(b"HTTP/1.1 200 ") and one.endswith(b"\r\n\r\n%d" % size), one[:300]
    assert two.startswith(b"HTTP/1.1 200 ") and two.endswith(b"\r\n\r\n10"), two[:300]  # the connection lives on
