"""Per-call stream plumbing on the server: client-stream input, credit waits.

``InputStream`` is what a handler's ``AsyncIterator[T]`` parameter receives.
Items arrive as undecoded ``Raw`` values (at most the window the server
announced, so the queue is bounded by the protocol itself); each is decoded
against the declared item type when the handler takes it, and credit is
returned to the client in batches of half a window as items are consumed.
The window counts items, not bytes: the bytes of the items a stream holds are
also counted in its connection's ``stream_bytes`` (the session closes a
connection past ``limits.max_stream_buffer``; it stops reading past
``limits.max_stream_buffer_total``), from ``feed`` until the handler takes the
item or the call ends (``discard``).
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Callable
from typing import Any, Protocol

import msgspec

from bastion.exceptions import Cancelled, InvalidArgument
from bastion.service import brief_error

__all__ = ["CreditGate", "InputStream", "StreamBytes"]


class StreamBytes(Protocol):
    """What counts the bytes of the items a connection's streams hold (the session)."""

    def stream_taken(self, size: int) -> None:
        """``size`` bytes of items left the buffer: taken by a handler, or dropped with their call."""


class InputStream:
    """An async iterator over one call's client-stream items."""

    def __init__(
        self,
        decoder: msgspec.msgpack.Decoder[Any],
        window: int,
        grant: Callable[[int], None],
        holder: StreamBytes,
    ) -> None:
        self._decoder = decoder
        self._items: deque[msgspec.Raw] = deque()
        self._ended = False
        self._error: BaseException | None = None
        self._waiter: asyncio.Future[None] | None = None
        self._batch = max(1, window // 2)
        self._consumed = 0
        self._grant = grant
        self._holder = holder
        self._bytes = 0  # of the items in _items, counted in the holder's stream_bytes too

    def feed(self, raw: msgspec.Raw, size: int) -> None:
        """Queue an item of ``size`` bytes (the caller has counted them in the holder's stream_bytes)."""
        self._items.append(raw)
        self._bytes += size
        self._wake()

    def discard(self) -> int:
        """The call is over: drop the items no handler took; the bytes they held, to uncount."""
        held, self._bytes = self._bytes, 0
        self._items.clear()
        if self._error is None:
            self._error = Cancelled("call closed")
        self._wake()
        return held

    def end(self) -> None:
        self._ended = True
        self._wake()

    def fail(self, exc: BaseException) -> None:
        self._error = exc
        self._wake()

    def _wake(self) -> None:
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)

    def __aiter__(self) -> InputStream:
        return self

    async def __anext__(self) -> Any:
        while not self._items:
            if self._error is not None:
                raise self._error
            if self._ended:
                raise StopAsyncIteration
            self._waiter = asyncio.get_running_loop().create_future()
            try:
                await self._waiter
            finally:
                self._waiter = None
        raw = self._items.popleft()
        size = len(raw)
        self._bytes -= size
        self._holder.stream_taken(size)
        self._consumed += 1
        if self._consumed >= self._batch:
            self._grant(self._consumed)
            self._consumed = 0
        try:
            return self._decoder.decode(raw)
        except msgspec.ValidationError as exc:
            raise InvalidArgument(f"stream item: {brief_error(str(exc))}") from None
        except UnicodeDecodeError:  # an Item's value is Raw: its text was not checked on arrival
            raise InvalidArgument("stream item: text that is not UTF-8") from None


class CreditGate:
    """Lets a sender wait until the peer grants credit on one call."""

    __slots__ = ("_closed", "_waiter")

    def __init__(self) -> None:
        self._waiter: asyncio.Future[None] | None = None
        self._closed = False

    @property
    def waiting(self) -> bool:
        """Whether a sender waits for credit (the item it holds is not sent)."""
        return self._waiter is not None

    def open(self) -> None:
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)

    def close(self) -> None:
        self._closed = True
        self.open()

    async def wait(self) -> None:
        if self._closed:
            raise Cancelled("call closed")
        self._waiter = asyncio.get_running_loop().create_future()
        try:
            await self._waiter
        finally:
            self._waiter = None
        if self._closed:
            raise Cancelled("call closed")
