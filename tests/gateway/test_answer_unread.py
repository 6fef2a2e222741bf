"""An answer a client does not read stays counted against ``gateway.max_answer_memory`` until the connection has
taken it, and for at most ``gateway.send_timeout``: then the connection is closed and the budget given back (a real
``bastion serve``).

uvicorn waits for the transport to drain only before it writes, so the last write of a /rpc answer put the whole of
it in the transport's buffer and returned at once: its budget was given back while up to ``max_answer_bytes`` sat in
the process for a client that never read, and another client's batch got every result.
"""

from __future__ import annotations

import base64
import json
import os
import socket
import time
import urllib.parse
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.gateway.test_answer_memory import VALUE, _rpc, _text_frame
from tests.gateway.test_ws_abuse import open_ws
from tests.support.server import ServerProcess, start_server, wait_for

BATCH = 20  # kv.get of a 512 KiB value: about 14 MB of JSON, within max_answer_bytes (16 MiB)
MEMORY = 20 << 20  # max_answer_memory: one such answer, and about 8 results of another
BATCH_BODY = [{"jsonrpc": "2.0", "method": "kv.get", "params": {"key": "big"}, "id": i} for i in range(BATCH)]


def _serve(workdir: Path, send_timeout: float) -> ServerProcess:
    env = {
        "BASTION_GATEWAY__MAX_ANSWER_BYTES": str(16 << 20),
        "BASTION_GATEWAY__MAX_ANSWER_MEMORY": str(MEMORY),
        "BASTION_GATEWAY__SEND_TIMEOUT": str(send_timeout),
    }
    server = start_server(workdir, insecure=True, http=True, env=env)
    value = base64.b64encode(os.urandom(VALUE)).decode()
    _rpc(server, {"jsonrpc": "2.0", "method": "kv.put", "params": {"key": "big", "value": value}, "id": 0})
    return server


@pytest.fixture
def patient(tmp_path: Path) -> Iterator[ServerProcess]:
    server = _serve(tmp_path, 60.0)
    try:
        yield server
    finally:
        assert server.stop() == 0, server.log()


@pytest.fixture
def impatient(tmp_path: Path) -> Iterator[ServerProcess]:
    server = _serve(tmp_path, 1.0)
    try:
        yield server
    finally:
        assert server.stop() == 0, server.log()


def _served(server: ServerProcess) -> int:
    """How many of a batch's results another client gets."""
    return sum("result" in item for item in _rpc(server, BATCH_BODY))


def _non_reader(server: ServerProcess) -> tuple[socket.socket, int]:
    """A connection that asks for the batch and reads nothing (a small receive buffer): it and the answer's size."""
    assert server.gateway_url is not None
    url = urllib.parse.urlparse(server.gateway_url)
    assert url.hostname is not None and url.port is not None
    body = json.dumps(BATCH_BODY).encode()
    sock = socket.create_connection((url.hostname, url.port))
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    head = (
        f"POST /rpc HTTP/1.1\r\nHost: {url.netloc}\r\nAuthorization: Bearer {server.token}\r\n"
        f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n"
    )
    sock.sendall(head.encode() + body)
    # Its answer begun (peeked at: left in the socket's buffer), whole: every result counted, none refused.
    sock.settimeout(30)
    deadline = time.monotonic() + 30
    while b"\r\n\r\n" not in (peeked := sock.recv(4096, socket.MSG_PEEK)):
        assert peeked and time.monotonic() < deadline, peeked
    fields = dict(line.split(b": ", 1) for line in peeked.split(b"\r\n\r\n")[0].split(b"\r\n")[1:])
    length = int(fields[b"content-length"])
    assert length > BATCH * VALUE * 4 // 3, peeked  # every result in it
    return sock, length


def test_an_unread_answer_stays_counted_until_the_client_reads(patient: ServerProcess) -> None:
    assert _served(patient) == BATCH  # alone, the whole batch fits
    sock, _ = _non_reader(patient)
    try:
        # Held: another client's batch gets what the remaining budget holds (about 8 results), not all 20.
        served = _served(patient)
        assert 0 < served < BATCH // 2, served
    finally:
        sock.close()
    # The client gone, the budget is back.
    wait_for(lambda: _served(patient) == BATCH, 20, what="the budget given back")


def test_a_client_that_does_not_read_is_cut_off_after_send_timeout(impatient: ServerProcess) -> None:
    sock, _ = _non_reader(impatient)
    with sock:
        # After send_timeout (1 s) the connection is aborted (what the kernel still buffers for it is the kernel's:
        # reading it through a 4 KiB window takes minutes) and the budget is back.
        closed = "it did not read what was sent it within gateway.send_timeout (1 s)"
        wait_for(lambda: closed in impatient.log(), 20, what="the connection closed after send_timeout")
        assert _served(impatient) == BATCH


def _ws_non_reader(server: ServerProcess) -> socket.socket:
    """A WebSocket that sends the batch and reads nothing of its answer, which has begun (peeked at)."""
    sock = open_ws(server, rcvbuf=4096, token=server.token)
    sock.sendall(_text_frame(json.dumps(BATCH_BODY).encode()))
    deadline = time.monotonic() + 30
    while len(peeked := sock.recv(10, socket.MSG_PEEK)) < 10:  # a text frame's head, its 64-bit length
        assert peeked and time.monotonic() < deadline, peeked
    assert peeked[1] == 127 and int.from_bytes(peeked[2:10]) > BATCH * VALUE * 4 // 3, peeked  # every result
    return sock


def test_an_unread_websocket_answer_stays_counted(patient: ServerProcess) -> None:
    sock = _ws_non_reader(patient)
    try:
        served = _served(patient)
        assert 0 < served < BATCH // 2, served
    finally:
        sock.close()
    wait_for(lambda: _served(patient) == BATCH, 20, what="the budget given back")


def test_a_websocket_that_does_not_read_is_cut_off_after_send_timeout(impatient: ServerProcess) -> None:
    with _ws_non_reader(impatient):
        closed = "it did not read what was sent it within gateway.send_timeout (1 s)"
        wait_for(lambda: closed in impatient.log(), 20, what="the connection closed after send_timeout")
        assert _served(impatient) == BATCH
