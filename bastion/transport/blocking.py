"""The blocking edge: a socket (plain or TLS) driving a sans-IO Connection.

Used by ``SyncClient``. ``BlockingLink.receive`` reads once (waiting at most
until a deadline) and returns the messages the core decoded; ``flush`` writes
whatever the core queued. OS and ssl errors become ``TransportError``s here.
"""

from __future__ import annotations

import contextlib
import socket
import ssl
import time

from bastion.exceptions import ConnectError, ConnectionClosed, DeadlineExceeded, RemoteProtocolError
from bastion.protocol.connection import Connection
from bastion.protocol.messages import Message

__all__ = ["BlockingLink"]

READ_SIZE = 65536


class BlockingLink:
    def __init__(self, core: Connection, sock: socket.socket) -> None:
        self.core = core
        self.sock = sock
        self.closed = False

    @classmethod
    def connect(
        cls,
        core: Connection,
        host: str,
        port: int,
        *,
        timeout: float,
        ssl_context: ssl.SSLContext | None = None,
        server_hostname: str | None = None,
    ) -> BlockingLink:
        try:
            sock = socket.create_connection((host, port), timeout=timeout)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            if ssl_context is not None:
                sock = ssl_context.wrap_socket(sock, server_hostname=server_hostname or host)
        except ssl.SSLError as exc:
            raise ConnectError(f"TLS handshake with {host}:{port} failed: {exc.reason or exc}") from None
        except OSError as exc:
            raise ConnectError(f"cannot connect to {host}:{port}: {exc.strerror or exc}") from None
        return cls(core, sock)

    def flush(self) -> None:
        data = self.core.data_to_send()
        if data and not self.closed:
            try:
                self.sock.sendall(data)
            except OSError as exc:
                self.close()
                raise ConnectionClosed(f"send failed: {exc.strerror or exc}") from None

    def receive(self, deadline: float | None) -> list[Message]:
        """Read once and return decoded messages; DeadlineExceeded past ``deadline``."""
        if self.closed:
            raise ConnectionClosed("connection is closed")
        remaining = None if deadline is None else deadline - time.monotonic()
        if remaining is not None and remaining <= 0:
            raise DeadlineExceeded("deadline exceeded")
        try:
            self.sock.settimeout(remaining)
            data = self.sock.recv(READ_SIZE)
        except TimeoutError:
            raise DeadlineExceeded("deadline exceeded") from None
        except (OSError, ssl.SSLError) as exc:
            self.close()
            raise ConnectionClosed(f"receive failed: {exc}") from None
        if not data:
            self.core.receive_eof()
            self.close()
            raise ConnectionClosed("connection closed by peer")
        try:
            events = self.core.receive_data(data)
        except RemoteProtocolError as exc:
            self.flush()
            self.close()
            raise ConnectionClosed(f"protocol error: {exc}") from None
        self.flush()  # Pongs and the like
        return events

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            self.core.close()
            with contextlib.suppress(OSError):
                self.sock.close()
