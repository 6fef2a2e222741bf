"""The asyncio edge: an ``asyncio.Protocol`` that drives a sans-IO Connection.

Theory of operation. ``Link`` owns the transport and the core. Each read is
fed whole to the core; the decoded messages go to the session above (server
or client logic) in one list; whatever the core then has to send is written
in one ``transport.write``. Messages the session sends later, from tasks, are
coalesced: the first one schedules a flush for the end of the loop turn, and
the rest ride along. Writes honour backpressure: when the transport's buffer
passes its high-water mark, ``drain()`` blocks senders until it empties.

OS and ssl errors are translated here into ``TransportError`` subclasses;
nothing above sees a raw ``OSError``.
"""

from __future__ import annotations

import asyncio
import ssl
from typing import Protocol, cast

from bastion.exceptions import ConnectionClosed, ProtocolError, RemoteProtocolError, TransportError
from bastion.protocol.connection import Connection
from bastion.protocol.messages import Message

__all__ = ["Link", "Session", "translate_error"]


class Session(Protocol):
    """The logic above a Link (server or client side)."""

    def on_connect(self, link: Link) -> None: ...

    def on_events(self, events: list[Message]) -> None: ...

    def on_close(self, exc: BaseException | None) -> None: ...


def translate_error(exc: BaseException | None) -> TransportError:
    """Turn what asyncio reports for a lost connection into our exception."""
    if isinstance(exc, TransportError):
        return exc
    if isinstance(exc, ProtocolError):
        return ConnectionClosed(f"protocol error: {exc}")
    if isinstance(exc, ssl.SSLError):
        return ConnectionClosed(f"TLS error: {exc.reason or exc}")
    if isinstance(exc, OSError):
        return ConnectionClosed(f"connection failed: {exc.strerror or exc}")
    if exc is None:
        return ConnectionClosed("connection closed by peer")
    return ConnectionClosed(f"connection lost: {exc!r}")


class Link(asyncio.Protocol):
    """Glue between one asyncio transport and one sans-IO ``Connection``."""

    def __init__(self, core: Connection, session: Session, *, write_high_water: int = 1 << 20) -> None:
        self.core = core
        self.session = session
        self.transport: asyncio.Transport | None = None
        self.peer = "?"
        self.closed = False
        self.error: BaseException | None = None
        self._high_water = write_high_water
        self._loop = asyncio.get_running_loop()
        self._flush_scheduled = False
        self._paused = False
        self._drain_waiters: list[asyncio.Future[None]] = []

    # -- asyncio.Protocol -----------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports implement the interface without subclassing it.
        self.transport = cast(asyncio.Transport, transport)
        self.transport.set_write_buffer_limits(high=self._high_water)
        peer = transport.get_extra_info("peername")
        if isinstance(peer, tuple) and len(peer) >= 2:
            self.peer = f"{peer[0]}:{peer[1]}"
        elif peer:
            self.peer = str(peer)
        self.session.on_connect(self)

    def data_received(self, data: bytes) -> None:
        try:
            events = self.core.receive_data(data)
        except RemoteProtocolError as exc:
            self.error = exc
            self.close()
            return
        if events:
            self.session.on_events(events)
        self.flush()

    def eof_received(self) -> bool | None:
        self.core.receive_eof()
        return None  # let the transport close itself

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self.core.close()
        error = self.error or exc
        for waiter in self._drain_waiters:
            if not waiter.done():
                waiter.set_exception(translate_error(error))
        self._drain_waiters.clear()
        self.session.on_close(error)

    def pause_writing(self) -> None:
        self._paused = True

    def resume_writing(self) -> None:
        self._paused = False
        for waiter in self._drain_waiters:
            if not waiter.done():
                waiter.set_result(None)
        self._drain_waiters.clear()

    # -- for the session --------------------------------------------------------

    def flush(self) -> None:
        """Write whatever the core has queued, now."""
        self._flush_scheduled = False
        if self.core.pending_output and self.transport is not None and not self.closed:
            self.transport.write(self.core.data_to_send())

    def schedule_flush(self) -> None:
        """Write what the core has queued at the end of this loop turn."""
        if not self._flush_scheduled:
            self._flush_scheduled = True
            self._loop.call_soon(self.flush)

    @property
    def writing_paused(self) -> bool:
        return self._paused

    async def drain(self) -> None:
        """Wait until the transport's write buffer is below its high-water mark."""
        if self.closed:
            raise translate_error(self.error)
        if not self._paused:
            return
        waiter = self._loop.create_future()
        self._drain_waiters.append(waiter)
        await waiter

    def close(self) -> None:
        """Send what is queued (a GoAway, say), then close."""
        self.flush()
        if self.transport is not None and not self.transport.is_closing():
            self.transport.close()

    def abort(self) -> None:
        if self.transport is not None:
            self.transport.abort()
