"""The gateway's HTTP/1.1 protocol: uvicorn's httptools protocol with a bounded request head and body pace.

uvicorn's httptools protocol keeps every byte of a request's line and headers
until the head is complete, with no limit on their size and no deadline: one
client could send an endless URL or endless headers on a single connection
and the process held all of it (hundreds of MB, and more as Python objects),
or open connections and send nothing -- or a header every few seconds --
and hold them (and their file descriptors) for ever. Nor does it bound how
slowly a body may come: a byte every few seconds held a request (and its
route's task) open for as long as the client liked. So here:

- a connection with more than ``MAX_PIPELINED`` requests waiting behind the
  one being answered is closed (uvicorn parsed every pipelined request a read
  held, and read on as each answer completed: a client sending requests and
  never reading the answers had them all held, about 40 times their size);
- a head over ``MAX_HEAD`` bytes is answered 431 and the connection closed,
  and so is a chunked body's trailer section (header fields after its last
  chunk, which the parser holds as it does a head's) over ``MAX_HEAD`` bytes;
  trailers are not added to the request's headers (ASGI carries none);
- a request whose target is absolute-form (``GET http://name/path``) naming
  another authority than its Host header (or with no Host) is answered 400 and
  the connection closed (``target_refusal`` in _http.py): uvicorn routes by
  the path alone, and the Host check would judge a name the request is not for;
- a head not complete ``head_timeout`` seconds after its first byte -- or a
  new connection silent that long -- gets its connection closed;
- a body must keep pace (Apache's ``RequestReadTimeout body=20,MinRate=500``):
  it has ``body_timeout`` seconds, and every byte received buys
  ``1 / body_min_rate`` seconds more; past that the request is answered 408
  (or, if its answer has begun, the connection just closed) and the
  connection closed. The clock runs only while the gateway is reading: not
  while the application has not yet taken what came (flow control), nor
  before it asks for a body sent with ``Expect: 100-continue``.

These answers carry the same security headers as every other (``_http.py``),
as does the 500 uvicorn sends when an exception escapes the application
before it answered (``_send_500``, put on each request's cycle; for a
WebSocket upgrade, ``WebSocketProtocol``).
A response's writes wait for the client to read, each at most ``send_timeout``
seconds, and its last one too: then the connection is aborted (_send.py).
Between requests uvicorn's own keep-alive timeout closes an idle connection;
the body's size and the response are the application's (``max_body``, flow control).
"""

from __future__ import annotations

import asyncio
import functools
import logging
from collections.abc import Awaitable, Callable
from typing import Any

import httptools
from uvicorn.protocols.http.flow_control import FlowControl
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol, RequestResponseCycle
from uvicorn.protocols.utils import is_ssl
from uvicorn.protocols.websockets.websockets_sansio_impl import WebSocketsSansIOProtocol
from websockets.frames import CloseCode, Frame

from bastion.exceptions import InvalidArgument
from bastion.gateway._gate import ConnectionGate, peer_host, refusal_answer
from bastion.gateway._http import INTERNAL_ERROR_BODY, NO_STORE, SECURITY_HEADERS, error_body, target_refusal
from bastion.gateway._send import drained
from bastion.gateway._shared import REFUSALS_LOGGED, _encoder
from bastion.observability.loglimit import suppressed_note

__all__ = ["MAX_FRAGMENTS", "MAX_HEAD", "MAX_PIPELINED", "HeadBoundedProtocol", "WebSocketProtocol", "bounded_protocol"]

#: The most bytes of a request line and headers one request may have (cookies and a bearer token fit many times).
MAX_HEAD = 64 * 1024
#: The most pipelined requests one connection may have waiting behind the one being answered (past it: closed).
MAX_PIPELINED = 64
#: The most frames (fragments) one WebSocket message may come in: each is held as an object of its own until the
#: message ends, and empty ones count nothing against its size limit (ws_max_size).
MAX_FRAGMENTS = 1024
#: Seconds a connection refused for a connection cap (answered at once) stays open for its request to arrive,
#: so that the answer is not lost to a reset (closing on unread bytes); then it is closed regardless.
REFUSED_GRACE = 1.0
#: The most refused connections held open for that grace at once (outside the caps they were refused by);
#: past it, a flood's connections are closed at once, unanswered, as over TLS.
REFUSED_LINGERING = 64

log = logging.getLogger("bastion.gateway")

_HEADERS = b"".join(name + b": " + value + b"\r\n" for name, value in [*SECURITY_HEADERS, NO_STORE])


class _PipelineFull(Exception):
    """More than ``MAX_PIPELINED`` requests wait on one connection: it is closed, the rest of the read unparsed."""


class _Refused(Exception):
    """A request refused by the protocol (answered already, the connection closed): the rest of the read unparsed."""


class _Flow(FlowControl):
    """uvicorn's read/write flow control, telling the protocol when reading stops and resumes."""

    def __init__(self, transport: asyncio.Transport, protocol: HeadBoundedProtocol) -> None:
        super().__init__(transport)
        self.protocol: HeadBoundedProtocol | None = protocol  # None once the connection is gone (no cycle left)

    def pause_reading(self) -> None:
        super().pause_reading()
        if self.protocol is not None and self.protocol._in_body:
            self.protocol._update_body_clock()

    def resume_reading(self) -> None:  # also called each time the application asks for more body
        super().resume_reading()
        if self.protocol is not None and self.protocol._in_body:
            self.protocol._update_body_clock()


class HeadBoundedProtocol(HttpToolsProtocol):
    """``HttpToolsProtocol`` with the request head bounded in size and time and the body's pace bounded
    (see the module docstring)."""

    head_timeout = 20.0
    body_timeout = 20.0
    body_min_rate = 500.0
    send_timeout = 30.0  # (_send.py)
    #: The connection caps (_gate.py), which a plaintext connection takes here (over TLS: the TLS layer).
    gate: ConnectionGate | None = None

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._in_head = True  # the next bytes belong to a request's head
        self._head_begun = False  # a request's head has begun and is not complete
        self._head_bytes = 0
        self._heads = 0  # request heads begun on this connection
        self._head_timer: asyncio.TimerHandle | None = None
        self._in_body = False  # a request's head is complete and its body is not
        self._body_bytes = 0
        self._body_used = 0.0  # seconds the body's clock ran before _body_since
        self._body_since: float | None = None  # when the body's clock last started; None: stopped
        self._body_timer: asyncio.TimerHandle | None = None
        self._bare_chunk = False  # a chunk's size line came and none of its data since: the last chunk's trailers
        self._trailer_bytes = 0
        self._head_tail = b""  # the last bytes of a head not yet complete (where it ends may straddle reads)
        self._gate_host: str | None = None  # admitted by the gate: the slot to give back
        self._refusal: bytes | None = None  # past a cap: the answer it was sent

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self.flow = _Flow(transport, self)
        self._arm_head_timer()  # a connection that never sends a byte is closed too
        if self.gate is not None and not is_ssl(transport):
            host = peer_host(transport)
            refusal = self.gate.admit(host)
            if refusal is None:
                self._gate_host = host
            elif self.gate.lingering >= REFUSED_LINGERING:  # a flood: no descriptor held even for the grace
                self._refusal = b""
                self._disarm_head_timer()
                transport.abort()
            else:  # answered at once, closed when its request comes or soon after: not held for head_timeout
                self._refusal = refusal_answer(refusal)
                self.gate.lingering += 1  # given back in connection_lost
                transport.write(self._refusal)
                self._disarm_head_timer()
                self._head_timer = self.loop.call_later(REFUSED_GRACE, transport.close)

    def connection_lost(self, exc: Exception | None) -> None:
        if self._refusal and self.gate is not None:
            self.gate.lingering -= 1
        self._give_back()
        self._disarm_head_timer()
        self._end_body()
        super().connection_lost(exc)
        if isinstance(self.flow, _Flow):
            self.flow.protocol = None

    def data_received(self, data: bytes) -> None:
        if self._refusal is not None:  # past a connection cap: answered already; what it sent is read, then closed
            self.transport.close()
            return
        idle = self._in_head and not self._head_begun  # between requests: a head would begin at this read's start
        heads = self._heads
        body_before = self._body_bytes
        in_body = self._in_body
        tail = self._head_tail if self._head_begun else b""
        self._feed(data)
        if self.transport.is_closing():
            return
        if self._in_body and self._bare_chunk:
            # In the last chunk's trailer section, which the read ends in: what of the read was not body was
            # trailer fields -- and the chunks' size lines (a few bytes per chunk) and, in the read where the
            # head ended, the head's end, which is found and not counted (lest a head near the limit make small
            # trailers a 431). A read that also held another request (pipelined) is not counted (as a head's:
            # at most one read goes uncounted).
            if self._heads == heads and in_body:  # the read began in this body
                share = len(data) - (self._body_bytes - body_before)
            elif self._heads == heads or (idle and self._heads == heads + 1):  # ... in this request's head
                share = len(data) - _head_end(data, tail) - self._body_bytes
            else:
                share = 0
            self._trailer_bytes += max(share, 0)
            if self._trailer_bytes > MAX_HEAD:
                self._refuse_trailers()
                return
        if self._in_body and self._body_since is None:  # a body that came whole in one read needs no clock
            self._update_body_clock()
        if not self._in_head:
            return
        if self._head_timer is None and self._head_begun:  # a head that came whole in one read needs no timer
            self._arm_head_timer()
        if self._head_begun and (self._heads == heads or (idle and self._heads == heads + 1)):
            # A head that is still not complete began before this read, or at its start: all of the read
            # was head. (A head beginning later in a read is counted from the next one: at most one read
            # goes uncounted.) A read that held a whole request and its body is not counted as head.
            self._head_bytes += len(data)
            if self._head_bytes > MAX_HEAD:
                self._refuse_head()
        if self._head_begun:
            self._head_tail = data[-3:]

    def _feed(self, data: bytes) -> None:
        """uvicorn's ``data_received``, with its line per refused request budgeted (``REFUSALS_LOGGED``): it
        logged a WARNING per connection whose request the parser failed on -- and on those the gateway refused
        from inside the parser (``_PipelineFull``, ``_Refused``) -- a line per connection, at line rate."""
        self._unset_keepalive_if_required()
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError as exc:  # (an exception a callback raised is its __context__)
            if isinstance(exc.__context__, _PipelineFull):
                self._log_refusal("pipelined", f"more than {MAX_PIPELINED} pipelined requests waiting")
            elif isinstance(exc.__context__, _Refused):
                self._log_refusal("absolute", "an absolute-form target for another authority than its Host")
            else:
                self._log_refusal("malformed", "a malformed HTTP request", logging.WARNING)
            self.send_400_response("Invalid HTTP request received.")
        except httptools.HttpParserUpgrade:
            if self._should_upgrade():
                self.handle_websocket_upgrade()
            else:
                self._log_refusal("upgrade", "an upgrade to another protocol than WebSocket (served as HTTP)")

    def _log_refusal(self, kind: str, what: str, level: int = logging.INFO) -> None:
        if (skipped := REFUSALS_LOGGED.take(f"http_{kind}")) is not None:
            source = self.client[0] if self.client else "?"
            log.log(level, "refused a request from %s: %s%s", source, what, suppressed_note(skipped))

    def on_message_begin(self) -> None:
        if len(self.pipeline) >= MAX_PIPELINED:  # (raising stops the parser: the rest of the read is not parsed)
            self.transport.close()
            raise _PipelineFull
        self._head_begun = True
        self._heads += 1
        super().on_message_begin()

    def on_headers_complete(self) -> None:
        host = next((value for name, value in self.headers if name == b"host"), None)
        if (refusal := target_refusal(self.url, host)) is not None:  # an absolute-form target not for this Host
            self._disarm_head_timer()
            if self.cycle is None or self.cycle.response_complete:  # not in the middle of another response
                self.transport.write(self._plain_answer(b"400 Bad Request", refusal))
            self.transport.close()
            raise _Refused
        self._in_head = False
        self._head_begun = False
        self._head_bytes = 0
        self._disarm_head_timer()
        super().on_headers_complete()
        cycle = self.cycle
        if cycle is not None:  # uvicorn's own 500 (an exception escaped the application) with our headers
            cycle.send_500_response = functools.partial(_send_500, cycle)  # type: ignore[method-assign]
            cycle.send = functools.partial(_send_in_time, self, cycle.send)  # type: ignore[method-assign]
        # (An upgrade to a WebSocket has no body: the connection is the WebSocket protocol's from here.)
        self._in_body = not (self.parser.should_upgrade() and self._should_upgrade())
        self._body_bytes = 0
        self._bare_chunk = False
        self._trailer_bytes = 0
        self._body_used = 0.0

    def on_body(self, body: bytes) -> None:
        self._bare_chunk = False
        self._trailer_bytes = 0  # (what was counted ended at a chunk's size line: no trailers after all)
        self._body_bytes += len(body)
        super().on_body(body)

    def on_chunk_header(self) -> None:
        self._bare_chunk = True

    def on_chunk_complete(self) -> None:
        self._bare_chunk = False

    def on_header(self, name: bytes, value: bytes) -> None:
        if self._in_head:  # (a trailer field: not one of the request's headers, which the application has)
            super().on_header(name, value)

    def on_message_complete(self) -> None:
        self._end_body()
        super().on_message_complete()
        self._in_head = True
        self._head_bytes = 0

    def handle_websocket_upgrade(self) -> None:
        super().handle_websocket_upgrade()
        protocol = self.transport.get_protocol()
        if self._gate_host is not None and isinstance(protocol, WebSocketProtocol):
            host, self._gate_host = self._gate_host, None  # the WebSocket gives the slot back when it closes
            protocol.gate_release = functools.partial(self._release, host)

    def _release(self, host: str) -> None:
        if self.gate is not None:
            self.gate.release(host)

    def _give_back(self) -> None:
        if self._gate_host is not None:
            host, self._gate_host = self._gate_host, None
            self._release(host)

    def send_400_response(self, msg: str) -> None:
        if self.transport.is_closing():  # (closed for a reason of ours: _PipelineFull)
            return
        self.transport.write(self._plain_answer(b"400 Bad Request", msg))
        self.transport.close()

    # -- the head ----------------------------------------------------------------------------

    def _arm_head_timer(self) -> None:
        self._disarm_head_timer()
        self._head_timer = self.loop.call_later(self.head_timeout, self._head_timed_out)

    def _disarm_head_timer(self) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None

    def _head_timed_out(self) -> None:
        self._head_timer = None
        if self._in_head and not self.transport.is_closing():
            self.transport.close()

    def _refuse_head(self) -> None:
        self._disarm_head_timer()
        if self.cycle is None or self.cycle.response_complete:  # not in the middle of another response
            message = f"request line and headers over {MAX_HEAD} bytes"
            self.transport.write(self._plain_answer(b"431 Request Header Fields Too Large", message))
        self.transport.close()

    def _refuse_trailers(self) -> None:
        self._end_body()
        if self.cycle is None or not self.cycle.response_started:
            message = f"chunked body trailers over {MAX_HEAD} bytes"
            self.transport.write(self._plain_answer(b"431 Request Header Fields Too Large", message))
        self.transport.close()

    # -- the body's pace ---------------------------------------------------------------------

    def _update_body_clock(self) -> None:
        """Run the body's clock while the gateway reads the body; stop it while reading is paused or
        the application has not yet asked for a body that waits for ``100 Continue``."""
        cycle = self.cycle
        running = (
            self._in_body
            and not self.flow.read_paused
            and not (cycle is not None and cycle.waiting_for_100_continue)
            and not self.transport.is_closing()
        )
        if running and self._body_since is None:
            self._body_since = self.loop.time()
            self._arm_body_timer(self._body_budget() - self._body_used)
        elif not running and self._body_since is not None:
            self._body_used += self.loop.time() - self._body_since
            self._body_since = None
            self._disarm_body_timer()

    def _body_budget(self) -> float:
        """Seconds the body may have taken so far: ``body_timeout``, plus what the bytes received bought."""
        return self.body_timeout + self._body_bytes / self.body_min_rate

    def _arm_body_timer(self, delay: float) -> None:
        self._disarm_body_timer()
        self._body_timer = self.loop.call_later(max(delay, 0.0), self._body_clock_rang)

    def _disarm_body_timer(self) -> None:
        if self._body_timer is not None:
            self._body_timer.cancel()
            self._body_timer = None

    def _end_body(self) -> None:
        self._in_body = False
        self._body_since = None
        self._disarm_body_timer()

    def _body_clock_rang(self) -> None:
        self._body_timer = None
        if self._body_since is None or self.transport.is_closing():
            return
        left = self._body_budget() - self._body_used - (self.loop.time() - self._body_since)
        if left > 0:  # bytes came meanwhile and bought more time
            self._arm_body_timer(left)
            return
        self._end_body()
        if self.cycle is None or not self.cycle.response_started:
            message = f"the request body came slower than {self.body_min_rate:g} bytes/s"
            self.transport.write(self._plain_answer(b"408 Request Timeout", message))
        self.transport.close()

    def _plain_answer(self, status: bytes, message: str) -> bytes:
        """A complete ``text/plain`` answer that closes the connection, with the usual headers."""
        body = message.encode()
        head = [b"HTTP/1.1 ", status, b"\r\ncontent-type: text/plain; charset=utf-8\r\n"]
        head.append(b"content-length: %d\r\nconnection: close\r\n" % len(body))
        head += [name + b": " + value + b"\r\n" for name, value in self.server_state.default_headers]
        return b"".join([*head, _HEADERS, b"\r\n", body])


def _head_end(data: bytes, tail: bytes) -> int:
    """Where in ``data`` the request head that ends in it ends (just past its blank line): a head that began
    at the read's start (``tail`` empty; the empty lines the parser skips before one are its), or one whose
    earlier reads ended in ``tail`` (their last 3 bytes). The parser takes CRLF line ends only, so a head
    ends at its first CRLF CRLF; ``len(data)`` if none is found."""
    start = 0 if tail else len(data) - len(data.lstrip(b"\r\n"))
    end = (tail + data).find(b"\r\n\r\n", start)
    return len(data) if end < 0 else max(end + 4 - len(tail), 0)


async def _send_in_time(protocol: HeadBoundedProtocol, send: Callable[[Any], Awaitable[None]], message: Any) -> None:
    """uvicorn's ``send``, the buffer drained (in ``send_timeout``) before each write and after a response's last."""
    flow, peer = protocol.flow, protocol.client[0] if protocol.client else "?"
    if flow.write_paused and not await drained(flow.drain(), protocol.transport, protocol.send_timeout, peer):
        return
    await send(message)
    if message["type"] == "http.response.body" and not message.get("more_body", False) and flow.write_paused:
        await drained(flow.drain(), protocol.transport, protocol.send_timeout, peer)


async def _send_500(cycle: RequestResponseCycle) -> None:
    """What uvicorn answers when an exception escapes the application before it answered: a 500, as
    uvicorn's own but with the headers every answer of the gateway's carries (the exception is logged)."""
    headers = [
        (b"content-type", b"application/json"),
        (b"content-length", b"%d" % len(INTERNAL_ERROR_BODY)),
        (b"connection", b"close"),
        *SECURITY_HEADERS,
        NO_STORE,
    ]
    await cycle.send({"type": "http.response.start", "status": 500, "headers": headers})
    await cycle.send({"type": "http.response.body", "body": INTERNAL_ERROR_BODY, "more_body": False})


class WebSocketProtocol(WebSocketsSansIOProtocol):
    """uvicorn's sans-I/O WebSocket protocol, whose 500 to an upgrade (an exception escaped the
    application before it accepted or refused) carries the gateway's headers too, and which stops
    reading a client whose pongs it cannot send, answers an upgrade request the WebSocket library cannot parse
    (400), closes (1009) a connection whose message comes in more than ``MAX_FRAGMENTS`` frames, and does not
    log an ERROR for every refused upgrade.

    uvicorn keeps each fragment of a message in a list until the final one: a message of one-byte fragments
    held over 40 bytes per byte (a 1 MiB message, 40 MiB), and empty continuation frames -- which count nothing
    against the message size limit -- grew the list for as long as a client sent them.

    uvicorn answers every ping with a pong written straight to the transport, however full its
    write buffer: a client that sent pings and never read made the gateway buffer pongs without
    end (as many bytes as it sent). Here, a ping answered while the transport is past its high-water
    mark pauses reading the connection until the buffer drains (``resume_writing``), so TCP pushes
    back on the client instead.
    """

    _pongs_blocked = False  # reading paused here, for pongs that cannot be sent
    send_timeout = 30.0  # how long a message being written may wait for the client to read (_send.py)
    #: Gives the connection's slot back to the gate (_gate.py) when it closes (set on a plaintext upgrade).
    gate_release: Callable[[], None] | None = None

    def connection_lost(self, exc: Exception | None) -> None:
        release, self.gate_release = self.gate_release, None
        if release is not None:
            release()
        super().connection_lost(exc)

    async def send(self, message: Any) -> None:
        peer = self.client[0] if self.client else "?"
        if not self.writable.is_set():  # (aborted past send_timeout: uvicorn's send raises ClientDisconnected)
            await drained(self.writable.wait(), self.transport, self.send_timeout, peer)
        await super().send(message)
        if message["type"] == "websocket.send" and not self.writable.is_set():  # counted until taken (_send.py)
            await drained(self.writable.wait(), self.transport, self.send_timeout, peer)
        if message["type"] == "websocket.http.response.body" and not message.get("more_body", False):
            # A refusal (403, 400) answers the upgrade completely; uvicorn would log an ERROR for each one
            # ("returned without completing handshake") -- a line per refusal anyone can send at will.
            self.handshake_complete = True

    def data_received(self, data: bytes) -> None:
        super().data_received(data)
        if not self.handshake_initiated and self.conn.handshake_exc is not None and not self.transport.is_closing():
            # The request passed the HTTP parser (64 KiB) but not the WebSocket library's own (8 KiB per
            # line, 128 headers): it then waits for nothing, so uvicorn never answered nor closed. Say why.
            message = "the WebSocket upgrade request has a header line over 8 KiB or over 128 headers"
            body = _encoder.encode(error_body(InvalidArgument(message)))
            head = b"HTTP/1.1 400 Bad Request\r\ncontent-type: application/json\r\nconnection: close\r\n"
            head += b"content-length: %d\r\n%s\r\n" % (len(body), _HEADERS)
            self.handshake_complete = True
            self.close_sent = True
            self.transport.write(head + body)
            self.transport.close()

    def handle_cont(self, event: Frame) -> None:
        if self.close_sent:
            return
        if len(self.frames) >= MAX_FRAGMENTS:
            self.frames = []
            self.conn.fail(CloseCode.MESSAGE_TOO_BIG, f"a message in more than {MAX_FRAGMENTS} fragments")
            if self.conn.close_sent is not None:
                self.handle_parser_exception()  # the close frame sent, the application told, the connection closed
            else:  # (already closing)
                self.transport.close()
            return
        super().handle_cont(event)

    def handle_ping(self) -> None:
        super().handle_ping()
        if not self.writable.is_set() and not self.transport.is_closing():
            # (Again after uvicorn resumed reading for the application's sake: one read's pongs at most.)
            self._pongs_blocked = True
            self.transport.pause_reading()

    def resume_writing(self) -> None:
        super().resume_writing()
        if self._pongs_blocked:
            self._pongs_blocked = False
            if not self.read_paused:  # (else uvicorn resumes once the application has taken its messages)
                self.transport.resume_reading()

    def send_500_response(self) -> None:
        if self.initial_response or self.handshake_complete:
            return
        response = self.conn.reject(500, "Internal Server Error")
        for name, value in [*SECURITY_HEADERS, NO_STORE]:
            response.headers[name.decode()] = value.decode()
        self.conn.send_response(response)
        self.transport.write(b"".join(self.conn.data_to_send()))


def bounded_protocol(
    head_timeout: float,
    body_timeout: float = 20.0,
    body_min_rate: float = 500.0,
    gate: ConnectionGate | None = None,
    send_timeout: float = 30.0,
) -> type[HeadBoundedProtocol]:
    """The protocol class for uvicorn (it makes one per connection), with these bounds (and caps)."""
    attributes = {
        "head_timeout": head_timeout,
        "body_timeout": body_timeout,
        "body_min_rate": body_min_rate,
        "gate": gate,
        "send_timeout": send_timeout,
    }
    return type("HeadBoundedProtocol", (HeadBoundedProtocol,), attributes)
