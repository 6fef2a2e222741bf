"""Framing (docs/protocol.md, section 2 "Framing").

A frame is a 4-byte unsigned big-endian body length followed by that many
bytes of MessagePack body. The length is checked against the receiver's limit
as soon as its four bytes arrive, before any of the body is buffered, so a
peer claiming 4 GB costs us four bytes. A zero length is illegal.

Theory of operation: ``FrameReader`` decodes every whole frame of a read in
one pass, straight from the bytes the transport handed over, and keeps only a
trailing partial frame, as a list of the reads that brought it. While that
partial frame is still short of the length its header announced, further reads
are only appended to the list; once it is whole they are joined, one copy.
"""

from __future__ import annotations

import struct
from typing import Generic, TypeVar

import msgspec

from bastion.exceptions import LocalProtocolError, RemoteProtocolError
from bastion.status import Status

__all__ = [
    "ENCODE_ERRORS",
    "HEADER",
    "HEADER_SIZE",
    "MAX_FRAME_LIMIT",
    "FrameReader",
    "FrameWriter",
    "encode_error",
    "pack_header",
]

HEADER_SIZE = 4
#: The largest frame limit the wire can express.
MAX_FRAME_LIMIT = 2**32 - 1

T = TypeVar("T")
#: Reads shorter than this are gathered into one part of a partial frame.
_SMALL_READ = 4096
#: The length header, read and written in place (no slice, no bytes object per frame).
HEADER = struct.Struct(">I")
#: ``HEADER.pack_into``, bound once: a module that imports ``HEADER`` would look ``pack_into`` up per call.
pack_header = HEADER.pack_into
_unpack_header = HEADER.unpack_from


#: What msgspec raises for a value it cannot encode. RecursionError (a value nested too deeply, or
#: containing itself) comes after part of the value was written: the writer must take it back too.
ENCODE_ERRORS = (TypeError, ValueError, OverflowError, RecursionError)


def encode_error(name: str, exc: Exception) -> LocalProtocolError:
    """The error for a message (``name``) msgspec could not encode."""
    return LocalProtocolError(f"cannot encode {name}: {exc}")


class FrameReader(Generic[T]):
    """Turns a byte stream into decoded messages of type ``T``."""

    def __init__(self, message_type: type[T] | object, max_frame: int) -> None:
        self._decoder: msgspec.msgpack.Decoder[T] = msgspec.msgpack.Decoder(message_type)
        # The trailing partial frame, as the reads that brought it: joined once,
        # when it is whole, so a large frame is copied once, not once per read.
        self._parts: list[bytes | bytearray] = []
        #: Bytes received but not yet decoded (a partial frame); read-only outside.
        self.buffered = 0
        #: How many partial frames have begun: a read that ends inside a new frame counts one, so
        #: a watcher can tell a frame still arriving from the next one (the server's frame pace).
        self.begun = 0
        self._need = HEADER_SIZE  # bytes the partial frame in _parts needs
        self.max_frame = max_frame

    def discard(self) -> None:
        """Drop the partial frame, if any: its connection is gone (a server session that lives on
        for its calls must not hold the bytes)."""
        self._parts = []
        self.buffered = 0
        self._need = HEADER_SIZE

    def feed(self, data: bytes | bytearray | memoryview) -> list[T]:
        """Add ``data`` and return every message it completes, in order.

        Raises RemoteProtocolError for a bad length or an undecodable body; the
        caller must then close the connection.
        """
        if not isinstance(data, bytes):
            data = bytes(data)
        elif not self.buffered and len(data) > HEADER_SIZE:
            # The usual read: one whole frame and nothing before it (the loop below, unrolled once).
            (length,) = _unpack_header(data)
            if len(data) - HEADER_SIZE == length <= self.max_frame:
                try:
                    return [self._decoder.decode(memoryview(data)[HEADER_SIZE:])]
                except (ValueError, RecursionError) as exc:
                    raise _malformed(exc) from None
        if self.buffered:
            parts = self._parts
            if len(data) >= _SMALL_READ:
                parts.append(data)
            elif type(parts[-1]) is bytearray:  # small reads share one part: a peer that
                parts[-1] += data  # trickles bytes must not cost an object per read
            else:
                parts.append(bytearray(data))
            self.buffered += len(data)
            if self.buffered < self._need:
                return []
            data = b"".join(self._parts)
            self._parts.clear()
            self.buffered = 0
        # Decoded ``Raw`` fields keep views into ``data``; it is immutable bytes,
        # so they stay valid after we return.
        view = memoryview(data)
        size = len(data)
        pos = 0
        out: list[T] = []
        decode, append = self._decoder.decode, out.append
        read_header = HEADER.unpack_from
        max_frame = self.max_frame
        while size - pos >= HEADER_SIZE:
            (length,) = read_header(data, pos)
            if not length or length > max_frame:
                if length:
                    raise RemoteProtocolError(
                        f"frame of {length} bytes exceeds the limit of {max_frame}", Status.RESOURCE_EXHAUSTED
                    )
                raise RemoteProtocolError("empty frame")
            body = pos + HEADER_SIZE
            end = body + length
            if end > size:
                self._need = end - pos
                break
            try:
                append(decode(view[body:end]))
            except (ValueError, RecursionError) as exc:
                raise _malformed(exc) from None
            pos = end
        else:
            self._need = HEADER_SIZE
        if pos < size:
            self._parts.append(data[pos:] if pos else data)
            self.buffered = size - pos
            self.begun += 1
        return out


def _malformed(exc: ValueError | RecursionError) -> RemoteProtocolError:
    """The error for a frame body msgspec could not decode. Besides DecodeError (a ValueError), msgspec
    lets through UnicodeDecodeError for a str field that is not UTF-8, and RecursionError for values
    nested too deeply (even inside a Raw field it only skips over)."""
    reason = "nested too deeply" if isinstance(exc, RecursionError) else str(exc)
    return RemoteProtocolError(f"malformed frame: {reason}")


class FrameWriter:
    """Encodes messages into one outgoing buffer, each behind its length.

    ``buffer`` holds the frames written since the last ``take``: read its
    length to see how much output waits (``len(writer)`` says the same, one
    call slower).
    """

    def __init__(self, max_frame: int) -> None:
        #: msgspec's ``encode_into``, this writer's own (an Encoder keeps state while it encodes: one per
        #: connection, never shared between threads). A caller that writes a frame itself
        #: (``Connection.send_call``) encodes the body after a ``HEADER_SIZE`` gap, checks its length
        #: against ``max_frame`` (``too_large``), then packs the header in the gap (``pack_header``).
        self.encode_into = msgspec.msgpack.Encoder().encode_into
        self.buffer = bytearray()
        self.max_frame = max_frame

    def write(self, message: object, name: str | None = None) -> None:
        """Append one frame; LocalProtocolError if its body exceeds ``max_frame``.

        On error nothing is appended, so the caller may answer differently.
        ``name``: what errors call the message (default: its type's name).
        """
        buffer = self.buffer
        start = len(buffer)
        try:
            self.encode_into(message, buffer, start + HEADER_SIZE)
        except ENCODE_ERRORS as exc:
            del buffer[start:]
            raise encode_error(name or type(message).__name__, exc) from None
        length = len(buffer) - start - HEADER_SIZE
        if length > self.max_frame:
            del buffer[start:]
            raise self.too_large(length)
        HEADER.pack_into(buffer, start, length)

    def too_large(self, length: int) -> LocalProtocolError:
        """The error for a frame body of ``length`` bytes, over ``max_frame``."""
        return LocalProtocolError(
            f"frame of {length} bytes exceeds the peer's limit of {self.max_frame}", Status.RESOURCE_EXHAUSTED
        )

    def __len__(self) -> int:
        return len(self.buffer)

    def take(self) -> bytearray:
        """Return everything written so far, and start a new buffer (no copy: the caller owns it now)."""
        data, self.buffer = self.buffer, bytearray()
        return data
