"""Abusive WebSocket clients on a real ``bastion serve`` (plaintext, raw sockets): the gateway stays bounded.

A client that sends pings and never reads the pongs must not make the
gateway buffer pongs without end: once the connection's write buffer is
full, the gateway stops reading that connection (TCP pushes back on the
client) until the client reads again.
"""

from __future__ import annotations

import json
import os
import socket
import struct
import threading
import time
import urllib.parse
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.server import ServerProcess, start_server


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    server = start_server(tmp_path_factory.mktemp("ws-abuse"), insecure=True, http=True)
    try:
        yield server
    finally:
        assert server.stop() == 0, server.log()


def _address(server: ServerProcess) -> tuple[str, int]:
    assert server.gateway_url is not None
    parts = urllib.parse.urlsplit(server.gateway_url)
    assert parts.hostname is not None and parts.port is not None
    return parts.hostname, parts.port


def open_ws(server: ServerProcess, rcvbuf: int | None = None, token: str | None = None) -> socket.socket:
    """A raw socket past a WebSocket upgrade to /ws (no Origin: not a browser; with ``token``, as its bearer)."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    if rcvbuf is not None:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
    sock.settimeout(10)
    sock.connect(_address(server))
    host, port = _address(server)
    sock.sendall(
        (
            f"GET /ws HTTP/1.1\r\nHost: {host}:{port}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
            + (f"Authorization: Bearer {token}\r\n" if token is not None else "")
            + "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
        ).encode()
    )
    head = b""
    while b"\r\n\r\n" not in head:
        chunk = sock.recv(1)
        assert chunk, head
        head += chunk
    assert head.startswith(b"HTTP/1.1 101"), head
    return sock


def client_frame(opcode: int, payload: bytes) -> bytes:
    """A masked (client) frame with a payload under 126 bytes."""
    mask = os.urandom(4)
    masked = bytes(b ^ mask[i % 4] for i, b in enumerate(payload))
    return struct.pack("!BB", 0x80 | opcode, 0x80 | len(payload)) + mask + masked


def read_frame(sock: socket.socket) -> tuple[int, bytes]:
    """(opcode, payload) of the next (unmasked, server) frame."""
    first, second = _read_exactly(sock, 2)
    length = second & 0x7F
    if length == 126:
        (length,) = struct.unpack("!H", _read_exactly(sock, 2))
    elif length == 127:
        (length,) = struct.unpack("!Q", _read_exactly(sock, 8))
    return first & 0x0F, _read_exactly(sock, length)


def _read_exactly(sock: socket.socket, n: int) -> bytes:
    data = b""
    while len(data) < n:
        chunk = sock.recv(n - len(data))
        assert chunk, "the gateway closed the connection"
        data += chunk
    return data


def rss(pid: int) -> int:
    """Resident memory of ``pid`` in bytes."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


def test_a_ping_flood_that_never_reads_its_pongs_is_pushed_back(served: ServerProcess) -> None:
    pid = served.process.pid
    before = rss(pid)
    sock = open_ws(served, rcvbuf=4096)
    pings = client_frame(0x9, b"p" * 125) * 512  # 64 KiB of pings
    sent = 0
    budget = 64 << 20  # what an unbounded gateway would buffer (as pongs) for us
    sock.settimeout(1.0)
    deadline = time.monotonic() + 60
    try:
        while sent < budget and time.monotonic() < deadline:
            try:
                sent += sock.send(pings)
            except TimeoutError:
                break  # the gateway stopped reading us: pushed back
        grown = rss(pid) - before
        assert sent < budget, f"the gateway read {sent} bytes of pings never answered by a read"
        assert grown < 24 << 20, f"the gateway grew by {grown >> 20} MiB for {sent >> 20} MiB of unread pongs"
        # Once the client reads, the connection goes on: its pongs come, then the answer to a call.
        sock.settimeout(20)
        frames: list[tuple[int, bytes]] = []

        def read_until_text() -> None:
            while not frames or frames[-1][0] != 0x1:
                frames.append(read_frame(sock))

        reader = threading.Thread(target=read_until_text, daemon=True)
        reader.start()
        sock.sendall(client_frame(0x1, b'{"jsonrpc":"2.0","method":"demo.echo","params":[7],"id":7}'))
        reader.join(30)
        assert frames and frames[-1][0] == 0x1 and b'"id":7' in frames[-1][1], frames[-1:]
        assert {opcode for opcode, _ in frames[:-1]} == {0xA}  # pongs, every one of them answered
        # Everyone else is still served meanwhile.
        assert served.gateway_url is not None
        with urllib.request.urlopen(served.gateway_url + "/livez", timeout=10) as response:
            assert response.status == 200
    finally:
        sock.close()


def test_refused_cross_site_upgrades_cannot_flood_the_log(served: ServerProcess) -> None:
    """A cross-site page (or anyone) can send refused upgrades as fast as it likes, each with an ``Origin`` up
    to 8 KiB: the log gets a bounded, truncated account of them, not a copy of each."""
    host, port = _address(served)
    log_before = len(served.log())
    origin = "https://evil.example/" + "x" * 6_000
    for _ in range(200):
        with socket.create_connection((host, port), timeout=10) as sock:
            sock.sendall(
                (
                    f"GET /ws HTTP/1.1\r\nHost: {host}:{port}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                    f"Origin: {origin}\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
                    "Sec-WebSocket-Version: 13\r\n\r\n"
                ).encode()
            )
            answer = b""
            while chunk := sock.recv(65536):
                answer += chunk
            assert answer.startswith(b"HTTP/1.1 403"), answer[:100]
            assert len(answer) < 2048  # the answer does not echo the whole header either
    grown = len(served.log()) - log_before
    assert grown < 8192, f"the log grew by {grown} bytes for 200 refused upgrades"


@pytest.mark.parametrize("header", ["X-Long: " + "y" * 10_000, "many"])
def test_an_upgrade_request_the_websocket_parser_refuses_is_answered_400(served: ServerProcess, header: str) -> None:
    """The HTTP head may be 64 KiB, but the WebSocket library parses an upgrade request again with its own
    limits (8 KiB per line, 128 headers): a request past them got no answer at all, and its connection was
    held open for ever (the head's deadline had passed to the WebSocket protocol)."""
    headers = header if header.startswith("X-Long") else "".join(f"X-Many-{i}: z\r\n" for i in range(200))[:-2]
    host, port = _address(served)
    with socket.create_connection((host, port), timeout=10) as sock:
        sock.sendall(
            (
                f"GET /ws HTTP/1.1\r\nHost: {host}:{port}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                f"{headers}\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
            ).encode()
        )
        answer = b""
        while chunk := sock.recv(65536):
            answer += chunk
    assert answer.startswith(b"HTTP/1.1 400"), answer[:200]
    head, _, body = answer.partition(b"\r\n\r\n")
    assert b"x-content-type-options: nosniff" in head.lower()
    assert json.loads(body)["error"]["status"] == "INVALID_ARGUMENT"


def _fragments(pieces: list[bytes]) -> bytes:
    """One text message sent as ``pieces``: a first frame (not final), continuations, the last one final."""
    first = client_frame(0x1, pieces[0])
    frames = [bytes([first[0] & 0x7F]) + first[1:]]  # not final
    for piece in pieces[1:-1]:
        frame = client_frame(0x0, piece)
        frames.append(bytes([frame[0] & 0x7F]) + frame[1:])  # a continuation, not final
    frames.append(client_frame(0x0, pieces[-1]))
    return b"".join(frames)


def test_a_message_in_a_few_fragments_is_answered(served: ServerProcess) -> None:
    call = b'{"jsonrpc":"2.0","method":"auth.whoami","id":5}'
    sock = open_ws(served)
    try:
        sock.sendall(_fragments([call[:10], *(call[i : i + 1] for i in range(10, len(call) - 1)), call[-1:]]))
        opcode, payload = read_frame(sock)
        assert opcode == 0x1 and json.loads(payload)["result"]["name"] == "anonymous", payload
    finally:
        sock.close()


def test_a_message_in_endless_fragments_closes_the_connection(served: ServerProcess) -> None:
    """Each fragment of a message was kept as an object of its own until the message ended, and empty ones
    count nothing against the message size limit: a client could send empty continuation frames for as long
    as it liked (the list grew without bound), or a 1 MiB message in one-byte fragments (over 40 MiB held)."""
    sock = open_ws(served)
    try:
        sock.sendall(_fragments([b"[", *([b""] * 5000), b"]"]))
        opcode, payload = read_frame(sock)
        assert opcode == 0x8, (opcode, payload[:100])
        (code,) = struct.unpack("!H", payload[:2])
        assert code == 1009, payload
        assert b"fragments" in payload
    finally:
        sock.close()


def test_refused_stream_calls_from_a_client_that_never_reads_are_pushed_back(served: ServerProcess) -> None:
    """A stream call the socket refuses (no id, an id in use, too many streams) was answered by a task of its
    own, outside the bound on messages handled at once: a client that sent batches of them and never read
    was read on without end, each call leaving a task waiting to send (anonymous: 20 MB of such batches took
    the gateway up by 500 MB, 336 000 tasks). The refusals are now part of the message's answer."""
    pid = served.process.pid
    before = rss(pid)
    sock = open_ws(served, rcvbuf=4096)
    batch = json.dumps([{"jsonrpc": "2.0", "method": "kv.watch", "params": {}}] * 100).encode()
    mask = os.urandom(4)
    message = struct.pack("!BBH", 0x81, 0x80 | 126, len(batch)) + mask
    message += bytes(b ^ mask[i % 4] for i, b in enumerate(batch))
    sent = 0
    budget = 32 << 20
    sock.settimeout(1.0)
    deadline = time.monotonic() + 60
    try:
        while sent < budget and time.monotonic() < deadline:
            try:
                sock.sendall(message)
            except TimeoutError:
                break  # the gateway stopped reading us: pushed back
            sent += len(message)
        grown = rss(pid) - before
        assert sent < budget, f"the gateway read {sent} bytes of refused stream calls never answered by a read"
        assert grown < 64 << 20, f"the gateway grew by {grown >> 20} MiB for {sent >> 20} MiB of refused calls"
    finally:
        sock.close()
    assert served.gateway_url is not None
    with urllib.request.urlopen(served.gateway_url + "/livez", timeout=10) as response:
        assert response.status == 200


def test_a_refused_stream_call_is_answered_in_its_message(served: ServerProcess) -> None:
    sock = open_ws(served)
    try:
        batch = b'[{"jsonrpc":"2.0","method":"kv.watch","params":{}},{"jsonrpc":"2.0","method":"auth.whoami","id":2}]'
        sock.sendall(_fragments([batch[:100], batch[100:]]))
        opcode, payload = read_frame(sock)
        assert opcode == 0x1
        answers = json.loads(payload)
        assert isinstance(answers, list) and len(answers) == 2, answers
        refused = next(a for a in answers if a["id"] is None)
        assert refused["error"]["code"] == -32600 and "needs an id" in refused["error"]["message"]
        assert next(a for a in answers if a["id"] == 2)["result"]["name"] == "anonymous"
    finally:
        sock.close()


def test_a_client_that_never_reads_holds_its_answers_not_its_messages(served: ServerProcess) -> None:
    """Up to WS_MAX_PENDING messages of one socket are handled at once, and one whose answer cannot be sent
    (the client does not read) waits with it. It held its whole message meanwhile -- up to max_body (1 MiB)
    each, so ~80 MB per socket of messages padded with whitespace whose answers are small. Once its answer is
    made, a message is let go: what waits is the answer."""
    pid = served.process.pid
    before = rss(pid)
    sock = open_ws(served, rcvbuf=4096)
    calls = json.dumps([{"jsonrpc": "2.0", "method": "auth.whoami", "id": i} for i in range(100)]).encode()
    payload = calls + b" " * ((1 << 20) - 1024 - len(calls))  # just under max_body
    # A zero masking key (the gateway takes any): the payload goes as it is, no 1 MiB XOR in Python.
    message = struct.pack("!BBQ", 0x81, 0x80 | 127, len(payload)) + bytes(4) + payload
    sent = 0
    sock.settimeout(2.0)
    try:
        for _ in range(200):
            try:
                sock.sendall(message)
            except TimeoutError:
                break  # pushed back
            sent += 1
        grown = rss(pid) - before
        assert sent < 200, "the gateway read 200 MiB of messages whose answers were never read"
        assert grown < 32 << 20, f"the gateway grew by {grown >> 20} MiB for {sent} unanswered 1 MiB messages"
    finally:
        sock.close()
