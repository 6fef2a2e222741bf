"""The gateway's HTTP connections are bounded before a request reaches the application.

A request's line and headers are held in memory until they are complete:
past ``MAX_HEAD`` bytes the request is answered 431 and the connection
closed; a head not complete within ``header_timeout`` (or a new connection
that sends nothing that long) has its connection closed. A body must keep
pace (``body_timeout``, ``body_min_rate``) or is answered 408. Real server,
raw sockets.
"""

from __future__ import annotations

import logging
import select
import socket
import time
from collections.abc import Iterator

import pytest

from bastion.gateway import GatewayConfig
from bastion.gateway._protocol import MAX_HEAD, MAX_PIPELINED
from tests.gateway.conftest import World, assert_security_headers, bearer, http, start_world

HEADER_TIMEOUT = 0.5
BODY_TIMEOUT = 0.5
BODY_MIN_RATE = 100.0


@pytest.fixture(scope="module")
def quick(tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    """A world whose gateway gives a request head ``HEADER_TIMEOUT`` seconds, and a body ``BODY_TIMEOUT``
    seconds plus one per ``BODY_MIN_RATE`` bytes."""
    config = GatewayConfig(
        http_port=0, header_timeout=HEADER_TIMEOUT, body_timeout=BODY_TIMEOUT, body_min_rate=BODY_MIN_RATE
    )
    w = start_world(tmp_path_factory.mktemp("quick"), config)
    yield w
    w.stop()


def _connect(world: World) -> socket.socket:
    assert world.gateway is not None
    return socket.create_connection((world.gateway.host, world.gateway.port), timeout=10)


def _answer(sock: socket.socket) -> bytes:
    """Everything the server sends until it closes the connection (a 10 s silence fails the test)."""
    data = b""
    while chunk := sock.recv(65536):
        data += chunk
    return data


@pytest.mark.parametrize(
    ("head", "filler"),
    [
        (b"GET /", b"a"),  # an endless URL
        (b"GET /livez HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Long: ", b"a"),  # one endless header
        (b"GET /livez HTTP/1.1\r\nHost: 127.0.0.1\r\n", b"X-A: b\r\n"),  # endless headers
    ],
    ids=["url", "header", "headers"],
)
def test_a_request_head_past_the_limit_is_refused(world: World, head: bytes, filler: bytes) -> None:
    with _connect(world) as sock:
        # Just past the limit, then silence: sending on after the refusal would meet a reset, not the 431.
        sock.sendall(head + filler * (MAX_HEAD // len(filler) + 64))
        answer = _answer(sock)
    assert answer.startswith(b"HTTP/1.1 431 "), answer[:100]
    assert b"connection: close" in answer
    assert http(world, "POST", "/v1/demo/echo", {"value": 1}).status == 401  # serving everyone else
    assert http(world, "GET", "/livez").status == 200


def _fields(answer: bytes) -> dict[str, str]:
    """The header fields of a raw HTTP answer, names in lower case."""
    lines = answer.split(b"\r\n\r\n", 1)[0].decode("latin-1").split("\r\n")[1:]
    return {name.strip().lower(): value.strip() for name, _, value in (line.partition(":") for line in lines)}


def test_the_answers_the_protocol_writes_carry_the_security_headers(world: World) -> None:
    """The 431 (head too large) and the 400 (a request that cannot be parsed) are written by the HTTP
    protocol, not the application: they carry the security headers all the same."""
    with _connect(world) as sock:
        sock.sendall(b"GET /" + b"a" * (MAX_HEAD + 64))
        too_large = _answer(sock)
    with _connect(world) as sock:
        sock.sendall(b"NOT HTTP AT ALL\r\n\r\n")
        garbled = _answer(sock)
    assert too_large.startswith(b"HTTP/1.1 431 ") and garbled.startswith(b"HTTP/1.1 400 "), (too_large, garbled)
    for answer in (too_large, garbled):
        assert_security_headers(world, _fields(answer))
        assert _fields(answer)["connection"] == "close"


def test_a_large_head_within_the_limit_is_served(world: World) -> None:
    cookie = "x" * (MAX_HEAD // 2)
    reply = http(world, "GET", "/livez", headers={"Cookie": f"other={cookie}"})
    assert reply.status == 200


def test_a_silent_connection_is_closed(quick: World) -> None:
    with _connect(quick) as sock:
        started = time.monotonic()
        assert _answer(sock) == b""
        assert time.monotonic() - started < HEADER_TIMEOUT + 5


def test_a_head_trickled_slowly_is_cut_off(quick: World) -> None:
    with _connect(quick) as sock:
        sock.sendall(b"GET /livez HTTP/1.1\r\nHost: 127.0.0.1\r\n")
        deadline = time.monotonic() + HEADER_TIMEOUT + 5
        closed = False
        while not closed and time.monotonic() < deadline:
            try:
                sock.sendall(b"X-Slow: y\r\n")
                sock.settimeout(HEADER_TIMEOUT / 5)
                closed = sock.recv(1) == b""
            except TimeoutError:
                continue
            except OSError:  # reset: closed as well
                closed = True
        assert closed


def test_keep_alive_requests_are_not_cut_off(quick: World) -> None:
    """The head timeout runs per head: a connection serving one request after another lives on."""
    with _connect(quick) as sock:
        for _ in range(4):
            sock.sendall(b"GET /livez HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
            data = b""
            while b'"ok"' not in data:
                chunk = sock.recv(65536)
                assert chunk, "closed while serving"
                data += chunk
            assert data.startswith(b"HTTP/1.1 200 ")
            time.sleep(HEADER_TIMEOUT / 2)  # idle between requests, each time less than the timeout


def test_an_answer_slower_than_the_head_timeout_is_delivered(quick: World) -> None:
    """The head timeout bounds the client's head, not the server's answer: a call that takes longer than
    ``header_timeout`` (its request came whole in one read) still gets its answer on its connection."""
    seconds = HEADER_TIMEOUT * 3
    reply = http(quick, "POST", "/v1/demo/slow", {"seconds": seconds}, headers=bearer(quick, "ada"))
    assert reply.status == 200 and reply.json() == seconds


def _post_head(world: World, length: int) -> bytes:
    token = world.tokens["ada"]
    return (
        f"POST /v1/demo/echo HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer {token}\r\n"
        f"Content-Type: application/json\r\nContent-Length: {length}\r\n\r\n"
    ).encode()


def _trickle(sock: socket.socket, pieces: list[bytes], interval: float, limit: float) -> bytes:
    """Send ``pieces`` one per ``interval`` (for at most ``limit`` seconds) until the server answers;
    then everything it sends until it closes (b"" if it never answered)."""
    deadline = time.monotonic() + limit
    for piece in pieces:
        readable, _, _ = select.select([sock], [], [], interval)
        if readable or time.monotonic() > deadline:
            break
        sock.sendall(piece)
    else:
        select.select([sock], [], [], limit)
    readable, _, _ = select.select([sock], [], [], 0)
    return _answer(sock) if readable else b""


def test_a_body_trickled_slowly_is_answered_408(quick: World, caplog: pytest.LogCaptureFixture) -> None:
    """A body slower than ``body_min_rate`` (here 10 bytes/s against 100) is answered 408 and its connection
    closed once it has used up ``body_timeout`` plus what its bytes bought (about 0.56 s here); the route
    waiting for it ends quietly."""
    body = b'{"value": "' + b"x" * 200 + b'"}'
    with _connect(quick) as sock:
        sock.sendall(_post_head(quick, len(body)))
        started = time.monotonic()
        answer = _trickle(sock, [body[i : i + 1] for i in range(len(body))], 0.1, limit=5.0)
        took = time.monotonic() - started
    assert answer.startswith(b"HTTP/1.1 408 "), answer[:200]
    assert took < BODY_TIMEOUT + 3
    fields = _fields(answer)
    assert fields["connection"] == "close"
    assert_security_headers(quick, fields)
    assert http(quick, "POST", "/v1/demo/echo", {"value": 1}, headers=bearer(quick, "ada")).json() == 1
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING], caplog.text


def test_a_body_that_never_comes_is_answered_408(quick: World) -> None:
    with _connect(quick) as sock:
        sock.sendall(_post_head(quick, 20))
        started = time.monotonic()
        answer = _trickle(sock, [], 0.1, limit=5.0)
        assert time.monotonic() - started < BODY_TIMEOUT + 3
    assert answer.startswith(b"HTTP/1.1 408 "), answer[:200]


def test_a_body_at_a_fair_pace_is_served_however_long_it_takes(quick: World) -> None:
    """Each byte buys time: a body at 5x ``body_min_rate`` that takes three times ``body_timeout`` is served."""
    text = "y" * 700
    body = b'{"value": "' + text.encode() + b'"}'
    pieces = [body[i : i + 50] for i in range(0, len(body), 50)]  # 50 bytes every 0.1 s: 500 bytes/s
    with _connect(quick) as sock:
        sock.sendall(_post_head(quick, len(body)))
        started = time.monotonic()
        for piece in pieces:
            sock.sendall(piece)
            time.sleep(0.1)  # the client's pace, not a wait for the server
        assert time.monotonic() - started > BODY_TIMEOUT * 2
        data = b""
        while not data.endswith(f'"{text}"'.encode()):
            chunk = sock.recv(65536)
            assert chunk, data
            data += chunk
    assert data.startswith(b"HTTP/1.1 200 ")


@pytest.mark.parametrize(
    "filler",
    [b"X-T: y\r\n", b"a"],  # endless trailer fields; one endless trailer field
    ids=["trailers", "trailer"],
)
def test_a_chunked_bodys_trailers_past_the_limit_are_refused(world: World, filler: bytes) -> None:
    # The trailer section after a chunked body's last chunk is header fields again: held (by the parser and as
    # the request's headers) until it ends. It is bounded as a head is, not kept for as long as the body's pace allows.
    body = b'{"jsonrpc":"2.0","method":"demo.echo","params":{"value":1},"id":1}'
    assert world.gateway is not None
    head = (
        f"POST /rpc HTTP/1.1\r\nHost: 127.0.0.1:{world.gateway.port}\r\nAuthorization: Bearer {world.tokens['ada']}\r\n"
        "Content-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n"
    ).encode()
    prefix = b"X-Long: " if filler == b"a" else b""
    with _connect(world) as sock:
        sock.sendall(head + b"%x\r\n%s\r\n0\r\n" % (len(body), body) + prefix)
        sock.sendall(filler * (MAX_HEAD // len(filler) + 64))
        answer = _answer(sock)
    assert answer.startswith(b"HTTP/1.1 431 "), answer[:100]
    assert b"connection: close" in answer
    assert (
        http(
            world,
            "POST",
            "/rpc",
            {"jsonrpc": "2.0", "method": "demo.echo", "params": {"value": 2}, "id": 2},
            headers=bearer(world, "ada"),
        ).json()["result"]
        == 2
    )


def test_a_chunked_body_with_small_trailers_is_served(world: World) -> None:
    body = b'{"jsonrpc":"2.0","method":"demo.echo","params":{"value":1},"id":1}'
    assert world.gateway is not None
    head = (
        f"POST /rpc HTTP/1.1\r\nHost: 127.0.0.1:{world.gateway.port}\r\nAuthorization: Bearer {world.tokens['ada']}\r\n"
        "Content-Type: application/json\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n"
    ).encode()
    with _connect(world) as sock:
        sock.sendall(head + b"%x\r\n%s\r\n" % (len(body), body))
        sock.sendall(b"0\r\n" + b"X-Checksum: abc\r\n" * 100 + b"\r\n")
        answer = _answer(sock)
    assert answer.startswith(b"HTTP/1.1 200 "), answer[:100]
    assert b'"result":1' in answer


@pytest.mark.parametrize(
    ("trailers", "status"), [(MAX_HEAD // 20, b"200"), ((MAX_HEAD + 600) // 10, b"431")], ids=["under", "over"]
)
def test_a_chunked_bodys_trailers_are_counted_apart_from_the_head(world: World, trailers: int, status: bytes) -> None:
    # A head just under the limit, its body and its trailer section, sent at once (so the server reads the trailer
    # section's start with the head): the head's bytes are not the trailers'. Trailers under the limit are served;
    # trailers past it (by less than the head's room: its bytes in that read are not counted as trailers, up to the
    # limit) are still refused (and nothing is sent after them: more would meet a reset, not the 431).
    body = b'{"jsonrpc":"2.0","method":"demo.echo","params":{"value":1},"id":1}'
    assert world.gateway is not None
    head = (
        f"POST /rpc HTTP/1.1\r\nHost: 127.0.0.1:{world.gateway.port}\r\nAuthorization: Bearer {world.tokens['ada']}\r\n"
        "Content-Type: application/json\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n"
    ).encode()
    head += b"X-Pad: " + b"p" * (MAX_HEAD - len(head) - 512) + b"\r\n\r\n"
    assert MAX_HEAD - 512 < len(head) < MAX_HEAD
    with _connect(world) as sock:
        sock.sendall(head + b"%x\r\n%s\r\n0\r\n" % (len(body), body) + b"X-Sum: y\r\n" * trailers)
        if status == b"200":  # the trailer section ends in a later read
            sock.sendall(b"\r\n")
        answer = _answer(sock)
    assert answer.startswith(b"HTTP/1.1 " + status + b" "), answer[:100]
    if status == b"200":
        assert b'"result":1' in answer


def _pipelined(world: World, count: int) -> tuple[bytes, bool]:
    """``count`` GET /livez sent at once on one connection, read only afterwards: (what came back, whether the
    gateway closed the connection)."""
    assert world.gateway is not None
    request = f"GET /livez HTTP/1.1\r\nHost: 127.0.0.1:{world.gateway.port}\r\n\r\n".encode()
    with _connect(world) as sock:
        sock.sendall(request * count)
        data = b""
        sock.settimeout(2)
        try:
            while data.count(b"HTTP/1.1 ") < count and (chunk := sock.recv(65536)):
                data += chunk
            closed = data.count(b"HTTP/1.1 ") < count or not sock.recv(65536)
        except TimeoutError:
            closed = False
        except ConnectionResetError:
            closed = True
    return data, closed


def test_a_few_pipelined_requests_are_all_answered(world: World) -> None:
    data, closed = _pipelined(world, 20)
    assert data.count(b"HTTP/1.1 200 ") == 20 and not closed


def test_a_flood_of_pipelined_requests_closes_the_connection(world: World) -> None:
    """Each pipelined request waiting behind another is held (its scope, its cycle) until its turn; uvicorn
    parses every one a read holds, and reads on as each answer completes: 10 MB of pipelined GETs from a
    client that never reads held ~400 MB. Past ``MAX_PIPELINED`` waiting, the connection is closed."""
    data, closed = _pipelined(world, 5000)
    assert closed
    assert data.count(b"HTTP/1.1 200 ") <= MAX_PIPELINED + 1
    assert http(world, "GET", "/livez").status == 200
