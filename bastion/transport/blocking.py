"""The blocking edge: a socket (plain or TLS) driving a sans-IO Connection.

Used by ``SyncClient``. ``BlockingLink.receive`` reads once (waiting at most
until a deadline) and returns the messages the core decoded; ``flush`` writes
whatever the core queued. OS and ssl errors become ``TransportError``s here.
"""

from __future__ import annotations

import contextlib
import select
import socket
import ssl
import time
from collections.abc import Callable

from bastion.exceptions import ConnectError, ConnectionClosed, DeadlineExceeded, RemoteProtocolError
from bastion.protocol.connection import Connection
from bastion.protocol.messages import Message
from bastion.transport.tls_errors import HTTP_PEER, describe_tls_error, looks_like_http, looks_like_tls

__all__ = ["BlockingLink"]

READ_SIZE = 65536
#: How long ``poll_idle`` lets a read take once ``select`` said there is something (a TLS record's rest).
_IDLE_READ = 0.5


class BlockingLink:
    def __init__(self, core: Connection, sock: socket.socket) -> None:
        self.core = core
        self.sock = sock
        self.closed = False
        self.received_any = False
        #: ``abort`` was called: the owner's next read or write fails, and it knows why.
        self.aborted = False
        #: Told how many Pings a read brought, before their Pongs are sent: why to drop the
        #: connection (a flood), or None to answer them.
        self.on_pings: Callable[[int], str | None] | None = None
        self._pings_seen = 0  # ``core.pings_received`` when last looked at

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
        alpn: str | None = None,
        source_address: str | None = None,
    ) -> BlockingLink:
        """Connect (and with ``ssl_context``, do the TLS handshake, insisting on ALPN ``alpn`` if given)."""
        sock: socket.socket | None = None
        try:
            source = (source_address, 0) if source_address else None
            sock = socket.create_connection((host, port), timeout=timeout, source_address=source)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            if ssl_context is not None:
                sock = ssl_context.wrap_socket(sock, server_hostname=server_hostname or host)
        except ssl.SSLError as exc:
            _close_quietly(sock)
            raise ConnectError(f"TLS handshake with {host}:{port} failed: {describe_tls_error(exc)}") from None
        except TimeoutError:  # before OSError, of which it is one: nothing was closed, nothing answered
            _close_quietly(sock)
            stage = "" if sock is None else " (no answer to the TLS handshake)"
            raise ConnectError(f"timed out connecting to {host}:{port}{stage}") from None
        except OSError as exc:
            _close_quietly(sock)
            if ssl_context is not None and sock is not None:
                reason = f"connection closed during the TLS handshake ({exc.strerror or exc}); does it speak TLS?"
                raise ConnectError(f"TLS handshake with {host}:{port} failed: {reason}") from None
            raise ConnectError(f"cannot connect to {host}:{port}: {exc.strerror or exc}") from None
        if alpn is not None and isinstance(sock, ssl.SSLSocket) and sock.selected_alpn_protocol() != alpn:
            _close_quietly(sock)
            raise ConnectError(f"TLS handshake with {host}:{port} failed: the server did not agree to ALPN {alpn}")
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
        except ssl.SSLError as exc:
            self.close()
            raise ConnectionClosed(f"receive failed: {describe_tls_error(exc)}") from None
        except OSError as exc:
            self.close()
            raise ConnectionClosed(f"receive failed: {exc.strerror or exc}") from None
        if not data:
            self.core.receive_eof()
            self.close()
            raise ConnectionClosed("connection closed by peer")
        first = not self.received_any
        self.received_any = True
        try:
            events = self.core.receive_data(data)
        except RemoteProtocolError as exc:
            self.flush()
            self.close()
            if first and not isinstance(self.sock, ssl.SSLSocket) and looks_like_tls(data):
                raise ConnectionClosed("the peer speaks TLS, this end plaintext (drop the insecure setting)") from None
            if first and looks_like_http(data):
                raise ConnectionClosed(HTTP_PEER) from None
            raise ConnectionClosed(f"protocol error: {exc}") from None
        pings = self.core.pings_received - self._pings_seen
        if pings:
            self._pings_seen += pings
            flood = self.on_pings(pings) if self.on_pings is not None else None
            if flood is not None:
                self.core.data_to_send()  # the Pongs queued: never sent
                self.close()
                raise ConnectionClosed(flood)
        self.flush()  # Pongs and the like
        return events

    def poll_idle(self) -> list[Message]:
        """Between calls: take in what the peer sent while nobody was reading, without waiting.

        A Ping is answered; a GoAway leaves the core draining; the peer's
        close (or a reset) closes the link -- so the owner sees a connection
        that died while idle before it writes a call to it, not after.
        Returns the messages read (the late answers of abandoned calls,
        say). One ``select`` when nothing came.
        """
        if self.closed:
            return []
        sock = self.sock
        pending = isinstance(sock, ssl.SSLSocket) and sock.pending() > 0
        try:
            if not pending and not select.select([sock], [], [], 0)[0]:
                return []
            return self.receive(time.monotonic() + _IDLE_READ)
        except DeadlineExceeded:  # part of a TLS record: the rest comes with the next read
            return []
        except ConnectionClosed:
            return []  # closed: the owner connects again
        except (OSError, ValueError):  # a descriptor select will not take
            self.close()
            return []

    def abort(self) -> None:
        """Make a ``receive`` blocked in another thread return at once (with ConnectionClosed); thread-safe.

        It shuts the TCP socket down under the TLS layer (whose state belongs
        to the thread using it); the owner closes the link when it sees that.
        """
        self.aborted = True
        with contextlib.suppress(OSError):
            socket.socket.shutdown(self.sock, socket.SHUT_RDWR)

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            self.core.close()
            with contextlib.suppress(OSError):
                self.sock.close()


def _close_quietly(sock: socket.socket | None) -> None:
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.close()
