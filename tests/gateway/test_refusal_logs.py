"""Requests the gateway's HTTP layer refuses write a bounded number of log lines, on a real ``bastion serve``.

uvicorn logged ``Invalid HTTP request received.`` (a WARNING) for every connection whose request it could not
parse -- and for every one the gateway refused itself from inside the parser (too many pipelined requests, an
absolute-form target for another authority): a line per connection, which an attacker sends at line rate. Each
kind is written at most ``LOG_BURST`` times per window (the gateway's ``LogBudget``), and the first line of the
next window says how many were left out.
"""

from __future__ import annotations

import re
import socket
from collections.abc import Callable, Iterator

import pytest

from bastion.observability.loglimit import LOG_BURST, LOG_WINDOW
from tests.support.server import ServerProcess, start_server, wait_for

FLOOD = 3 * LOG_BURST


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    server = start_server(tmp_path_factory.mktemp("refusal-logs"), insecure=True, http=True)
    try:
        yield server
    finally:
        assert server.stop() == 0, server.log()


def _send(server: ServerProcess, data: bytes) -> bytes:
    """``data`` on a connection of its own; what came back until the gateway closed it."""
    assert server.gateway_url is not None
    host, port = server.gateway_url.removeprefix("http://").rsplit(":", 1)
    answer = b""
    with socket.create_connection((host, int(port)), timeout=10) as sock:
        sock.sendall(data)
        try:
            while chunk := sock.recv(65536):
                answer += chunk
        except ConnectionResetError:
            pass
    return answer


def _malformed(server: ServerProcess) -> bytes:
    return b"GET / HTTP/1.1\r\nHost: x\r\nBad Header\r\n\r\n"


def _absolute(server: ServerProcess) -> bytes:
    return b"GET http://evil.example/livez HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n"


def _pipelined(server: ServerProcess) -> bytes:
    assert server.gateway_url is not None
    return f"GET /livez HTTP/1.1\r\nHost: {server.gateway_url.removeprefix('http://')}\r\n\r\n".encode() * 200


KINDS: dict[str, tuple[Callable[[ServerProcess], bytes], str]] = {
    "malformed": (_malformed, "a malformed HTTP request"),
    "absolute": (_absolute, "an absolute-form target"),
    "pipelined": (_pipelined, "pipelined requests"),
}


def _lines(server: ServerProcess, text: str) -> list[str]:
    return [line for line in server.log().splitlines() if text in line]


@pytest.mark.parametrize("kind", list(KINDS))
def test_refused_requests_write_a_budget_of_lines_and_count_the_rest(served: ServerProcess, kind: str) -> None:
    request, text = KINDS[kind]
    before = len(_lines(served, text))
    for _ in range(FLOOD):
        answer = _send(served, request(served))
        assert kind == "pipelined" or answer.startswith(b"HTTP/1.1 400 "), answer[:200]
    assert not _lines(served, "Invalid HTTP request received"), served.log()[-2000:]
    written = _lines(served, text)[before:]
    assert 1 <= len(written) <= LOG_BURST, written
    # The next window's first line says how many were left out (one more refusal each half second until then).
    noted: list[str] = []

    def counted() -> bool:
        _send(served, request(served))
        noted[:] = [line for line in _lines(served, text)[before:] if "more like it" in line]
        return bool(noted)

    wait_for(counted, LOG_WINDOW + 10, interval=0.5, what=f"the line counting the {kind} refusals left out")
    left_out = int(re.search(r"\((\d+) more like it", noted[0]).group(1))  # type: ignore[union-attr]
    assert left_out >= FLOOD - LOG_BURST, noted
