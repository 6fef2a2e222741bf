"""The body's clock (``body_timeout``) runs only while the gateway reads: the server's own delays don't count.

An application that takes its time before reading a body -- so that uvicorn
stops reading once 64 KiB wait (flow control), or has not yet asked for a
body sent with ``Expect: 100-continue`` -- must not get its client's request
answered 408. The gateway's HTTP protocol serves a small ASGI application that
reads the body ``LATE`` seconds after the request arrives, with a body clock
far shorter than that: uvicorn on a real socket, raw client sockets.
"""

from __future__ import annotations

import asyncio
import socket
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest
import uvicorn

from bastion.gateway._protocol import bounded_protocol
from bastion.gateway.runner import bind

BODY_TIMEOUT = 0.3
LATE = BODY_TIMEOUT * 4  # the application reads the body this long after the request arrives


async def _late_reader(scope: dict[str, Any], receive: Any, send: Any) -> None:
    """Waits ``LATE`` seconds, then reads the body and answers its size."""
    await asyncio.sleep(LATE)
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


@pytest.fixture(scope="module")
def address() -> Iterator[tuple[str, int]]:
    """uvicorn with the gateway's protocol (a body must come whole within ``BODY_TIMEOUT`` of reading)."""
    sock = bind("127.0.0.1", 0)
    protocol = bounded_protocol(5.0, body_timeout=BODY_TIMEOUT, body_min_rate=1e12)
    config = uvicorn.Config(_late_reader, http=protocol, lifespan="off", log_level="warning", access_log=False)
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not server.started:
        assert time.monotonic() < deadline and thread.is_alive(), "uvicorn did not start"
        time.sleep(0.01)
    yield sock.getsockname()[:2]
    server.should_exit = True
    thread.join(10)
    sock.close()


def _read_until_closed(sock: socket.socket) -> bytes:
    data = b""
    while chunk := sock.recv(65536):
        data += chunk
    return data


def test_time_the_server_is_not_reading_does_not_count(address: tuple[str, int]) -> None:
    """A body sent at once, larger than uvicorn buffers unread: reading stops until the application reads
    (``LATE`` seconds, longer than the body clock), then the rest comes at once: 200, not 408."""
    size = 1 << 20
    with socket.create_connection(address, timeout=10) as sock:
        head = f"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: {size}\r\nConnection: close\r\n\r\n"
        sock.sendall(head.encode() + b"z" * size)
        answer = _read_until_closed(sock)
    assert answer.startswith(b"HTTP/1.1 200 ") and answer.endswith(b"\r\n\r\n%d" % size), answer[:200]


def test_a_body_waiting_for_100_continue_has_its_clock_start_when_asked_for(address: tuple[str, int]) -> None:
    """With ``Expect: 100-continue`` the client sends the body only once the application asks for it
    (``LATE`` seconds in): the time before does not count."""
    with socket.create_connection(address, timeout=10) as sock:
        head = "POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 10\r\nExpect: 100-continue\r\nConnection: close\r\n\r\n"
        sock.sendall(head.encode())
        interim = b""
        while b"\r\n\r\n" not in interim:
            chunk = sock.recv(65536)
            assert chunk, interim
            interim += chunk
        assert interim.startswith(b"HTTP/1.1 100 "), interim[:200]
        sock.sendall(b"0123456789")
        answer = _read_until_closed(sock)
    assert answer.startswith(b"HTTP/1.1 200 ") and answer.endswith(b"\r\n\r\n10"), answer[:200]


def test_a_body_slower_than_its_clock_is_still_cut_off(address: tuple[str, int]) -> None:
    """The same server does cut off a body the client itself is slow to send (the clock does run)."""
    with socket.create_connection(address, timeout=10) as sock:
        sock.sendall(b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 10\r\n\r\n01234")
        answer = _read_until_closed(sock)  # the rest never comes
    assert answer.startswith(b"HTTP/1.1 408 "), answer[:200]
