"""The asyncio edge: an ``asyncio.Protocol`` that drives a sans-IO Connection.

Theory of operation. ``Link`` owns the transport and the core. Each read is
fed whole to the core; the decoded messages go to the session above (server
or client logic) in one list; whatever the core then has to send is written
in one ``transport.write``. Messages the session sends later, from tasks, are
coalesced: the first one schedules a flush for the end of the loop turn, and
the rest ride along. Writes honour backpressure: when the transport's buffer
passes its high-water mark, ``drain()`` blocks senders until it empties.
Output coalesced past the high-water mark is written at once instead of at
the end of the turn, so the check above sees it.

Backpressure on reads. ``pause_reading(reason)`` stops reading from the
peer until every reason given has been released; the session uses it when it
has too much work queued. A server Link (``pause_reads_with_writes``) also
stops reading while its writes are paused: a peer that does not read what it
is sent cannot make the server accept more work whose answers would pile up.

Slow readers. With ``write_stall_timeout`` a Link whose write buffer is
still above the high-water mark that long after writes paused drops the
connection (``abort``: unsent output is discarded, its memory freed); with
``write_hard_limit`` it drops the connection as soon as the buffer passes
that size. ``dropped`` then says why. A ``close`` that cannot flush within
``write_stall_timeout`` becomes an abort too.

OS and ssl errors are translated here into ``TransportError`` subclasses;
nothing above sees a raw ``OSError``.

TLS. When the transport is TLS, ``connection_made`` runs after the TLS
handshake; the Link records the ``ssl_object``, the negotiated ALPN protocol
and then calls the ``on_secure`` hook it was given (the server's: it sets
``tls_identity`` from the client certificate and may ``refuse`` the
connection) before the session sees the connection. A refused connection
never reaches the session's logic: its Hello is answered with a GoAway
carrying the refusal reason, and it is closed.
"""

from __future__ import annotations

import asyncio
import ssl
from collections.abc import Callable
from typing import Any, Protocol, cast

from bastion.exceptions import ConnectionClosed, ProtocolError, RemoteProtocolError, TransportError
from bastion.protocol.connection import Connection
from bastion.protocol.messages import Message
from bastion.protocol.state import ConnectionState
from bastion.status import Status
from bastion.transport.tls_errors import HTTP_PEER, describe_tls_error, looks_like_http, looks_like_tls

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
        return ConnectionClosed(describe_tls_error(exc))
    if isinstance(exc, OSError):
        return ConnectionClosed(f"connection failed: {exc.strerror or exc}")
    if exc is None:
        return ConnectionClosed("connection closed by peer")
    return ConnectionClosed(f"connection lost: {exc!r}")


class Link(asyncio.Protocol):
    """Glue between one asyncio transport and one sans-IO ``Connection``."""

    def __init__(
        self,
        core: Connection,
        session: Session,
        *,
        write_high_water: int = 1 << 20,
        write_hard_limit: int | None = None,
        write_stall_timeout: float | None = None,
        pause_reads_with_writes: bool = False,
        on_secure: Callable[[Link], None] | None = None,
        on_writing_paused: Callable[[bool], None] | None = None,
    ) -> None:
        self.core = core
        self._output = core.output
        self.session = session
        self.transport: asyncio.Transport | None = None
        self.peer = "?"
        self.closed = False
        self.error: BaseException | None = None
        #: TLS: the ssl object, the negotiated ALPN protocol, and (server side,
        #: set by the ``on_secure`` hook) the verified client certificate's
        #: ``(subject, serial)`` and its expiry (Unix time); all None on a plaintext connection.
        self.ssl_object: Any = None
        self.alpn: str | None = None
        self.peer_cert_identity: tuple[str, int] | None = None
        self.peer_cert_expires: float | None = None
        self.peer_cert_issued: float | None = None  # its notBefore
        self._on_secure = on_secure
        self._refusal: tuple[Status, str] | None = None
        self._received_any = False
        self._high_water = write_high_water
        self._loop = asyncio.get_running_loop()
        #: A flush is scheduled for the end of this loop turn (``schedule_flush``); read-only outside.
        self.flush_scheduled = False
        self._paused = False
        #: Told True when writing pauses, False when it resumes or the connection is lost while paused.
        self._on_writing_paused = on_writing_paused
        self._pause_told = False  # _on_writing_paused was told True, not yet False
        self._drain_waiters: list[asyncio.Future[None]] = []
        self._hard_limit = write_hard_limit
        self._stall_timeout = write_stall_timeout
        self._pause_reads_with_writes = pause_reads_with_writes
        self._read_holds: set[str] = set()
        self._stall_timer: asyncio.TimerHandle | None = None
        self._close_timer: asyncio.TimerHandle | None = None
        #: Why this Link dropped the connection itself (a peer that stopped reading), else None.
        self.dropped: str | None = None

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
        ssl_object = transport.get_extra_info("ssl_object")
        if ssl_object is not None:
            self.ssl_object = ssl_object
            self.alpn = ssl_object.selected_alpn_protocol()
        if self._on_secure is not None:
            self._on_secure(self)
        self.session.on_connect(self)

    def data_received(self, data: bytes) -> None:
        first = not self._received_any
        self._received_any = True
        try:
            events = self.core.receive_data(data)
        except RemoteProtocolError as exc:
            if first and self.ssl_object is None and looks_like_tls(data):
                self.error = ConnectionClosed("the peer speaks TLS, this end plaintext (drop the insecure setting)")
            elif first and looks_like_http(data):
                self.error = ConnectionClosed(HTTP_PEER)
            else:
                self.error = exc
            self.close()
            return
        if self._refusal is not None:
            if self.core.state is ConnectionState.HANDSHAKE:  # its Hello is in: answer it with the reason
                self.core.reject(*self._refusal)
                self.close()
            return
        # Even with no events: the session counts traffic and abuse the core
        # handled on its own (partial frames, calls refused over max_inflight).
        self.session.on_events(events)
        if self._output.buffer:  # flush's first check, without the call for a read that queued nothing
            self.flush()

    def eof_received(self) -> bool | None:
        self.core.receive_eof()
        return None  # let the transport close itself

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        for timer in (self._stall_timer, self._close_timer):
            if timer is not None:
                timer.cancel()
        self.core.close()
        error = self.error or exc
        for waiter in self._drain_waiters:
            if not waiter.done():
                waiter.set_exception(translate_error(error))
        self._drain_waiters.clear()
        try:
            self.session.on_close(error)
        finally:
            self._tell_resumed()  # no resume_writing follows a lost connection

    def pause_writing(self) -> None:
        self._paused = True
        if self._on_writing_paused is not None and not self._pause_told and not self.closed:
            self._pause_told = True
            self._on_writing_paused(True)
        if self._pause_reads_with_writes:
            self.pause_reading("writing")
        if self._stall_timeout is not None and self._stall_timer is None:
            self._stall_timer = self._loop.call_later(self._stall_timeout, self._check_stall)

    def resume_writing(self) -> None:
        self._paused = False
        self._tell_resumed()
        if self._stall_timer is not None:
            self._stall_timer.cancel()
            self._stall_timer = None
        self.resume_reading("writing")
        for waiter in self._drain_waiters:
            if not waiter.done():
                waiter.set_result(None)
        self._drain_waiters.clear()

    def _tell_resumed(self) -> None:
        if self._pause_told and self._on_writing_paused is not None:
            self._pause_told = False
            self._on_writing_paused(False)

    # -- for the session --------------------------------------------------------

    @property
    def tls_identity(self) -> str | None:
        """The verified client certificate's subject (its CN, else the whole subject), or None."""
        return self.peer_cert_identity[0] if self.peer_cert_identity is not None else None

    @property
    def received_any(self) -> bool:
        """Whether the peer has sent a single byte (above TLS) yet."""
        return self._received_any

    def refuse(self, status: Status, message: str) -> None:
        """Never let this connection reach the session: answer its Hello with GoAway(status, message), close.

        Until the Hello arrives the session's handshake deadline still runs,
        so a refused peer that sends nothing is closed when it expires.
        """
        self._refusal = (status, message)

    def flush(self) -> None:
        """Write whatever the core has queued, now."""
        # A flush already scheduled stays scheduled (it finds little or nothing
        # to write): clearing the flag here would let the same loop turn
        # schedule a second one.
        if self.core.pending_output and self.transport is not None and not self.closed:
            self.transport.write(self.core.data_to_send())
            if self._hard_limit is not None and self.transport.get_write_buffer_size() > self._hard_limit:
                self.drop(f"the peer is not reading: over {self._hard_limit} bytes of output waiting")

    def schedule_flush(self) -> None:
        """Write what the core has queued at the end of this loop turn (now, if it is a lot)."""
        if not self.flush_scheduled:
            self._loop.call_soon(self._scheduled_flush)  # first: if it raises (a closed loop), none is scheduled
            self.flush_scheduled = True
        elif len(self._output.buffer) >= self._high_water:  # core.pending_output, without the property
            self.flush()

    def flush_if_full(self) -> None:
        """Write what the core has queued now if it is past the high-water mark; else leave it to
        whoever flushes next (the end of ``data_received``, for what a read's calls answered)."""
        if len(self._output.buffer) >= self._high_water:
            self.flush()

    def _scheduled_flush(self) -> None:
        self.flush_scheduled = False
        self.flush()

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

    def pause_reading(self, reason: str) -> None:
        """Stop reading from the peer until ``resume_reading`` for every reason given."""
        if not self._read_holds and self.transport is not None and not self.closed:
            self.transport.pause_reading()
        self._read_holds.add(reason)

    def resume_reading(self, reason: str) -> None:
        if reason not in self._read_holds:
            return
        self._read_holds.discard(reason)
        if not self._read_holds and self.transport is not None and not self.transport.is_closing():
            self.transport.resume_reading()

    @property
    def reading_paused(self) -> bool:
        return bool(self._read_holds)

    def close(self) -> None:
        """Send what is queued (a GoAway, say), then close.

        With ``write_stall_timeout``, a peer that will not take those last
        bytes within it is dropped: a closing connection must not hold its
        buffer forever.
        """
        self.flush()
        if self.transport is not None and not self.transport.is_closing():
            self.transport.close()
            if self._stall_timeout is not None and not self.closed:
                self._close_timer = self._loop.call_later(self._stall_timeout, self.abort)

    def abort(self) -> None:
        if self.transport is not None:
            self.transport.abort()

    def drop(self, reason: str) -> None:
        """Abort the connection now, discarding unsent output; ``dropped`` records why."""
        if self.closed or self.dropped is not None:
            return
        self.dropped = reason
        self.error = ConnectionClosed(reason)
        self.abort()

    def _check_stall(self) -> None:
        self._stall_timer = None
        if not self._paused or self.closed or self.transport is None:
            return
        if self.transport.get_write_buffer_size() > self._high_water:
            self.drop(f"the peer is not reading: output stalled for {self._stall_timeout:g}s")
        else:  # draining, slowly: look again later
            assert self._stall_timeout is not None
            self._stall_timer = self._loop.call_later(self._stall_timeout, self._check_stall)
