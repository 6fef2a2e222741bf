"""A raw-socket peer for the adversity tests: bytes exactly as we choose them."""

from __future__ import annotations

import contextlib
import socket
import ssl
import time
from typing import Any

import msgspec

__all__ = ["CALL", "ERROR", "GOAWAY", "HELLO", "RESULT", "WELCOME", "RawPeer", "frame"]

HELLO, WELCOME, CALL, RESULT, ERROR, GOAWAY = 1, 2, 3, 4, 5, 12


def frame(message: Any) -> bytes:
    """One frame: 4-byte big-endian body length + the MessagePack body."""
    body = msgspec.msgpack.encode(message)
    return len(body).to_bytes(4, "big") + body


class RawPeer:
    """A blocking TCP connection that speaks (or abuses) the wire protocol by hand.

    With ``ssl_context`` the bytes go inside TLS (the handshake is done first);
    ``source`` is the local address to connect from (e.g. "127.0.0.2").
    """

    def __init__(
        self,
        host: str,
        port: int,
        timeout: float = 5.0,
        ssl_context: ssl.SSLContext | None = None,
        source: str | None = None,
    ) -> None:
        source_address = (source, 0) if source else None
        self.sock = socket.create_connection((host, port), timeout=timeout, source_address=source_address)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if ssl_context is not None:
            self.sock = ssl_context.wrap_socket(self.sock, server_hostname=host)
        self._buffer = b""

    def __enter__(self) -> RawPeer:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def close(self) -> None:
        self.sock.close()

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def hello(self, token: str | None = None) -> list[Any]:
        """Handshake; return the Welcome."""
        self.send(frame([HELLO, 1, "raw-test/1", token, 16, 1 << 20, {}]))
        welcome = self.read_message()
        assert welcome[0] == WELCOME, welcome
        return welcome

    def _read_exact(self, n: int, deadline: float) -> bytes:
        while len(self._buffer) < n:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError(f"no data within the deadline (have {len(self._buffer)} of {n} bytes)")
            self.sock.settimeout(remaining)
            chunk = self.sock.recv(65536)
            if not chunk:
                raise ConnectionResetError(f"closed by the server (have {len(self._buffer)} of {n} bytes)")
            self._buffer += chunk
        data, self._buffer = self._buffer[:n], self._buffer[n:]
        return data

    def read_message(self, timeout: float = 5.0) -> Any:
        """The next frame's decoded body."""
        deadline = time.monotonic() + timeout
        length = int.from_bytes(self._read_exact(4, deadline), "big")
        assert 0 < length <= 1 << 20, f"bad frame length {length} from the server"
        return msgspec.msgpack.decode(self._read_exact(length, deadline))

    def wait_closed(self, timeout: float = 5.0) -> float:
        """Read (and discard) until the server closes; return the seconds that took."""
        start = time.monotonic()
        deadline = start + timeout
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise AssertionError(f"the server did not close the connection within {timeout}s")
            self.sock.settimeout(remaining)
            try:
                chunk = self.sock.recv(65536)
            except ConnectionResetError:
                return time.monotonic() - start
            except TimeoutError:
                continue
            if not chunk:
                return time.monotonic() - start
            self._buffer += chunk

    def is_closed_now(self) -> bool:
        """True when the server has closed (EOF or reset) without data pending."""
        self.sock.settimeout(0.5)
        try:
            return self.sock.recv(1) == b""
        except ConnectionResetError:
            return True
        except TimeoutError:
            return False


def client_hello() -> bytes:
    """The first flight of a TLS handshake, to send and then walk away from."""
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    tls = context.wrap_bio(incoming, outgoing)
    with contextlib.suppress(ssl.SSLWantReadError):
        tls.do_handshake()
    return outgoing.read()
