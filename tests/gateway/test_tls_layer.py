"""The gateway's TLS layer (bastion/gateway/_tls.py) on each loop it runs on, over real sockets.

Under uvloop (as ``bastion serve`` runs) the layer must be uvloop's own, in C:
asyncio's Python one costs an HTTPS call about 20% more server CPU (bench/README.md,
"Over HTTPS"). On either loop a failed handshake is counted by reason, the
connection's slot in the gate is given back, and an answer written before the
client has finished sending reaches it. tests/gateway/test_gateway_tls.py checks the
same on a real ``bastion serve``.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import socket
import ssl
import threading
from collections import Counter
from collections.abc import Callable, Iterator
from typing import Any, cast

import pytest
import uvloop
from uvloop.loop import SSLProtocol as UvloopSSLProtocol  # type: ignore[attr-defined]

from bastion.gateway._gate import ConnectionGate
from bastion.gateway._tls import REASONS, TLSAcceptor, tls_acceptor
from bastion.security.tls import TLSPaths, ensure_dev_tls, http_server_context
from tests.support.server import wait_for

TIMEOUT = 0.5
LOOPS: dict[str, Callable[[], asyncio.AbstractEventLoop]] = {
    "asyncio": asyncio.new_event_loop,
    "uvloop": uvloop.new_event_loop,
}


class Answering(asyncio.Protocol):
    """The HTTP protocol's stand-in: answers the first bytes it reads with ``answer``, then closes."""

    def __init__(self, answer: bytes) -> None:
        self.answer = answer
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        assert self.transport is not None
        if not self.transport.is_closing():
            self.transport.write(self.answer)
            self.transport.close()


class Listener:
    """A plaintext listener whose connections are TLSAcceptors, on a loop of its own in a thread."""

    def __init__(self, loop_factory: Callable[[], asyncio.AbstractEventLoop], tls: TLSPaths, answer: bytes) -> None:
        self.counters: Counter[str] = Counter()
        self.pending: set[TLSAcceptor] = set()
        self.gate = ConnectionGate(100, 100, self.counters)
        self.protocols: list[asyncio.BaseProtocol] = []
        self.loop = loop_factory()
        context = http_server_context(tls.cert, tls.key)
        started = threading.Event()

        async def start() -> asyncio.Server:
            factory = tls_acceptor(lambda: Answering(answer), context, TIMEOUT, self.counters, self.pending, self.gate)

            def made() -> asyncio.BaseProtocol:
                self.protocols.append(factory())
                return self.protocols[-1]

            return await self.loop.create_server(made, "127.0.0.1", 0)

        def run() -> None:
            asyncio.set_event_loop(self.loop)
            self.server = self.loop.run_until_complete(start())
            started.set()
            self.loop.run_forever()

        self.thread = threading.Thread(target=run, daemon=True)
        self.thread.start()
        assert started.wait(10)
        self.port: int = self.server.sockets[0].getsockname()[1]

    def call(self, function: Callable[[], Any]) -> Any:
        """``function()`` run in the loop's thread (the gate and counters are the loop's)."""

        async def inside() -> Any:
            return function()

        return asyncio.run_coroutine_threadsafe(inside(), self.loop).result(10)

    def wait(self, reached: Callable[[], bool], what: str) -> None:
        wait_for(lambda: self.call(reached), 10, what=what)

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self.server.close)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)
        self.loop.close()


@pytest.fixture(scope="module")
def tls(tmp_path_factory: pytest.TempPathFactory) -> TLSPaths:
    return ensure_dev_tls(tmp_path_factory.mktemp("tls-layer"))


@pytest.fixture(params=sorted(LOOPS))
def listener(request: pytest.FixtureRequest, tls: TLSPaths) -> Iterator[Listener]:
    served = Listener(LOOPS[request.param], tls, b"answered")
    try:
        yield served
    finally:
        served.close()


def _trusting(tls: TLSPaths) -> ssl.SSLContext:
    return ssl.create_default_context(cafile=str(tls.ca))


def test_under_uvloop_the_layer_is_uvloops_own(listener: Listener, tls: TLSPaths) -> None:
    with (
        socket.create_connection(("127.0.0.1", listener.port), timeout=10) as raw,
        _trusting(tls).wrap_socket(raw, server_hostname="localhost") as client,
    ):
        client.sendall(b"hello")
        assert client.recv(100) == b"answered"
    assert len(listener.protocols) == 1
    layer = listener.protocols[0]
    assert isinstance(layer, TLSAcceptor)
    on_uvloop = isinstance(listener.loop, uvloop.Loop)
    assert isinstance(layer, UvloopSSLProtocol) == on_uvloop  # uvloop's transport reads it without Python calls
    assert isinstance(layer, asyncio.sslproto.SSLProtocol) != on_uvloop
    listener.wait(lambda: listener.gate.open == 0, "the connection's slot given back")
    assert not any(listener.counters[f"gateway_tls_{reason}"] for reason in REASONS)


def test_each_failed_handshake_is_counted_by_reason(listener: Listener, tls: TLSPaths) -> None:
    def count(reason: str) -> int:
        return listener.counters[f"gateway_tls_{reason}"]

    def expect(reason: str, n: int) -> None:
        listener.wait(lambda: count(reason) == n, f"{n} {reason}")

    def raw(data: bytes) -> None:
        with socket.create_connection(("127.0.0.1", listener.port), timeout=10) as plain:
            plain.sendall(data)
            with contextlib.suppress(ConnectionResetError):
                plain.recv(100)  # an alert, or the close

    def handshake(context: ssl.SSLContext) -> None:
        with (
            socket.create_connection(("127.0.0.1", listener.port), timeout=10) as plain,
            pytest.raises(ssl.SSLError),
        ):
            context.wrap_socket(plain, server_hostname="localhost")

    raw(b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
    expect("plaintext_http", 1)
    raw(b"\x16\x03\x01\x00\x05\xff\xff\xff\xff\xff")  # a handshake record holding nonsense
    expect("protocol", 1)
    old = _trusting(tls)
    old.maximum_version = ssl.TLSVersion.TLSv1_2  # below tls.min_version (1.3): refused by OpenSSL
    handshake(old)
    expect("protocol", 2)
    handshake(ssl.create_default_context())  # the system's roots: not the dev CA
    expect("certificate_rejected", 1)
    with socket.create_connection(("127.0.0.1", listener.port), timeout=10) as plain:
        plain.sendall(b"\x16\x03\x01\x02\x00\x01")  # the start of a ClientHello, then gone
    expect("closed", 1)
    with (
        socket.create_connection(("127.0.0.1", listener.port), timeout=10) as silent,
        contextlib.suppress(ConnectionResetError),  # (aborted: as good as closed)
    ):
        assert silent.recv(100) == b""  # closed by the layer after TIMEOUT
    expect("timeout", 1)
    listener.wait(lambda: listener.gate.open == 0 and not listener.pending, "every slot given back")
    assert {reason: count(reason) for reason in REASONS} == {
        "timeout": 1,
        "closed": 1,
        "plaintext_http": 1,
        "certificate_rejected": 1,
        "protocol": 2,
        "other": 0,
    }


@pytest.mark.parametrize("loop_name", sorted(LOOPS))
def test_an_answer_written_while_the_client_still_sends_reaches_it(loop_name: str, tls: TLSPaths) -> None:
    """The gateway answers 413 before it reads a body, and closes. asyncio's layer (3.11) fed the body's
    records after its close_notify to ``unwrap``, failed, and reset the connection; the client must read the
    answer (``AsyncioTLSAcceptor._do_shutdown``; uvloop's layer discards them itself)."""
    answer = b"HTTP/1.1 413 \r\nconnection: close\r\n\r\n" + b"a" * 50_000
    served = Listener(LOOPS[loop_name], tls, answer)
    try:
        for _ in range(5):  # (the reset depends on where the close falls among the client's records)
            with (
                socket.create_connection(("127.0.0.1", served.port), timeout=20) as raw,
                _trusting(tls).wrap_socket(raw, server_hostname="localhost") as client,
            ):
                client.sendall(b"x" * (2 << 20))  # all of it: the layer reads and discards what is past the close
                received = b""
                while chunk := client.recv(65536):
                    received += chunk
            assert received == answer
    finally:
        served.close()


def test_the_loop_internals_the_gateways_tls_layer_relies_on_are_there() -> None:
    """_tls.py subclasses uvloop's SSLProtocol (not in its stubs nor its documentation) and asyncio's,
    overriding asyncio's ``_do_shutdown``: a release that renamed what it uses would lose the fast path,
    or silently bring back the reset-instead-of-413 over HTTPS on asyncio's loop."""
    from asyncio.sslproto import SSLProtocol

    assert callable(getattr(SSLProtocol, "_do_shutdown", None))
    assert callable(getattr(SSLProtocol, "_check_handshake_timeout", None))
    assert hasattr(SSLProtocol, "max_size")
    assert "ssl_handshake_timeout" in inspect.signature(SSLProtocol.__init__).parameters
    assert "self._sslobj" in inspect.getsource(SSLProtocol)
    for method in ("connection_made", "connection_lost", "eof_received", "get_buffer", "buffer_updated"):
        assert callable(getattr(UvloopSSLProtocol, method, None)), method
