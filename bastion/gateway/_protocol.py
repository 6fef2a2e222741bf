"""The gateway's HTTP/1.1 protocol: uvicorn's httptools protocol with a bounded request head.

uvicorn's httptools protocol keeps every byte of a request's line and headers
until the head is complete, with no limit on their size and no deadline: one
client could send an endless URL or endless headers on a single connection
and the process held all of it (hundreds of MB, and more as Python objects),
or open connections and send nothing -- or a header every few seconds --
and hold them (and their file descriptors) for ever. So here:

- a head over ``MAX_HEAD`` bytes is answered 431 and the connection closed;
- a head not complete ``head_timeout`` seconds after its first byte -- or a
  new connection silent that long -- gets its connection closed.

The answers written here (431, and uvicorn's 400 to a request it cannot
parse) carry the security headers and ``Cache-Control`` of every other
answer (``_http.py``).

Between requests uvicorn's own keep-alive timeout closes an idle connection;
the body and the response are the application's (``max_body``, flow control).
"""

from __future__ import annotations

import asyncio
from typing import Any

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from bastion.gateway._http import NO_STORE, SECURITY_HEADERS

__all__ = ["MAX_HEAD", "HeadBoundedProtocol", "bounded_protocol"]

#: The most bytes of a request line and headers one request may have (cookies and a bearer token fit many times).
MAX_HEAD = 64 * 1024

_HEADERS = b"".join(name + b": " + value + b"\r\n" for name, value in [*SECURITY_HEADERS, NO_STORE])


class HeadBoundedProtocol(HttpToolsProtocol):
    """``HttpToolsProtocol`` with the request head bounded in size and time (see the module docstring)."""

    head_timeout = 20.0

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._in_head = True  # the next bytes belong to a request's head
        self._head_begun = False  # a request's head has begun and is not complete
        self._head_bytes = 0
        self._head_timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._arm_head_timer()  # a connection that never sends a byte is closed too

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm_head_timer()
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        in_head = self._in_head
        super().data_received(data)
        if not self._in_head or self.transport.is_closing():
            return
        if self._head_timer is None and self._head_begun:  # a head that came whole in one read needs no timer
            self._arm_head_timer()
        if in_head:
            # The head began before this chunk and is still not complete: all of it was head. (A head
            # beginning inside a chunk is counted from the next one: at most one read goes uncounted.)
            self._head_bytes += len(data)
            if self._head_bytes > MAX_HEAD:
                self._refuse_head()

    def on_message_begin(self) -> None:
        self._head_begun = True
        super().on_message_begin()

    def on_headers_complete(self) -> None:
        self._in_head = False
        self._head_begun = False
        self._head_bytes = 0
        self._disarm_head_timer()
        super().on_headers_complete()

    def on_message_complete(self) -> None:
        super().on_message_complete()
        self._in_head = True
        self._head_bytes = 0

    def send_400_response(self, msg: str) -> None:
        self.transport.write(self._plain_answer(b"400 Bad Request", msg))
        self.transport.close()

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

    def _plain_answer(self, status: bytes, message: str) -> bytes:
        """A complete ``text/plain`` answer that closes the connection, with the headers every answer carries."""
        body = message.encode()
        head = [b"HTTP/1.1 ", status, b"\r\ncontent-type: text/plain; charset=utf-8\r\n"]
        head.append(b"content-length: %d\r\nconnection: close\r\n" % len(body))
        head += [name + b": " + value + b"\r\n" for name, value in self.server_state.default_headers]
        return b"".join([*head, _HEADERS, b"\r\n", body])


def bounded_protocol(head_timeout: float) -> type[HeadBoundedProtocol]:
    """The protocol class for uvicorn (it makes one per connection), with this ``head_timeout``."""
    return type("HeadBoundedProtocol", (HeadBoundedProtocol,), {"head_timeout": head_timeout})
