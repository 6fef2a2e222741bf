"""An in-memory transport pair: two asyncio protocols wired back to back, no sockets.

Theory of operation. ``connect_pair`` makes two ``MemoryTransport`` objects,
each the peer of the other, and calls ``connection_made`` on both protocols.
``write`` hands a copy of the bytes to the peer protocol's ``data_received``
through ``loop.call_soon``, so delivery happens on a later loop turn, in
order, as it would over a socket -- and a protocol never re-enters itself.
``close`` ends the pair: both ends stop accepting writes at once, bytes
already written are still delivered, then each protocol gets
``connection_lost(None)`` exactly once. ``abort`` is the same but drops the
bytes not yet delivered.

There is no write buffer, so a writer is never paused
(``set_write_buffer_limits`` is accepted and ignored). ``pause_reading`` holds
incoming bytes until ``resume_reading``, which hands them over on a later turn.
"""

from __future__ import annotations

import asyncio
import itertools
from typing import Any

__all__ = ["MemoryTransport", "connect_pair"]

_numbers = itertools.count(1)


class MemoryTransport(asyncio.Transport):
    """One end of an in-memory connection."""

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        protocol: asyncio.Protocol,
        name: tuple[str, int],
        peer_name: tuple[str, int],
    ) -> None:
        super().__init__({"sockname": name, "peername": peer_name})
        self._loop = loop
        self._protocol = protocol
        self._peer: MemoryTransport | None = None
        self._closing = False
        self._aborted = False
        self._lost = False
        self._reading = True
        self._held: list[bytes] = []

    def __repr__(self) -> str:
        state = "closing" if self._closing else "open"
        return f"<MemoryTransport {self.get_extra_info('sockname')} {state}>"

    # -- BaseTransport -------------------------------------------------------------

    def get_protocol(self) -> asyncio.BaseProtocol:
        return self._protocol

    def set_protocol(self, protocol: asyncio.BaseProtocol) -> None:
        assert isinstance(protocol, asyncio.Protocol)
        self._protocol = protocol

    def is_closing(self) -> bool:
        return self._closing

    def close(self) -> None:
        self._shut(abort=False)

    def abort(self) -> None:
        self._shut(abort=True)

    # -- WriteTransport --------------------------------------------------------------

    def write(self, data: bytes | bytearray | memoryview) -> None:
        if self._closing or not data:
            return  # like a socket transport after close(): the bytes go nowhere
        assert self._peer is not None
        self._loop.call_soon(self._peer._deliver, bytes(data))

    def writelines(self, list_of_data: Any) -> None:
        for data in list_of_data:
            self.write(data)

    def can_write_eof(self) -> bool:
        return False

    def get_write_buffer_size(self) -> int:
        return 0

    def get_write_buffer_limits(self) -> tuple[int, int]:
        return (0, 0)

    def set_write_buffer_limits(self, high: int | None = None, low: int | None = None) -> None:
        pass  # nothing is ever buffered

    # -- ReadTransport ---------------------------------------------------------------

    def is_reading(self) -> bool:
        return self._reading and not self._closing

    def pause_reading(self) -> None:
        self._reading = False

    def resume_reading(self) -> None:
        if self._reading:
            return
        self._reading = True
        if self._held:  # on a later turn, as from a socket: a protocol never re-enters itself
            self._loop.call_soon(self._deliver_held)

    def _deliver_held(self) -> None:
        while self._held and self._reading and not self._lost:
            self._deliver(self._held.pop(0), held=True)

    # -- internals -----------------------------------------------------------------------

    def _deliver(self, data: bytes, *, held: bool = False) -> None:
        if self._lost or self._aborted or (self._peer is not None and self._peer._aborted):
            return
        if not self._reading or (self._held and not held):  # bytes held go first
            self._held.append(data)
            return
        self._protocol.data_received(data)

    def _shut(self, *, abort: bool) -> None:
        assert self._peer is not None
        if abort:
            self._aborted = True
        if self._closing:
            return
        for end in (self, self._peer):
            end._closing = True
            self._loop.call_soon(end._connection_lost)

    def _connection_lost(self) -> None:
        if not self._lost:
            self._lost = True
            self._held.clear()
            self._protocol.connection_lost(None)


def connect_pair(
    server_protocol: asyncio.Protocol, client_protocol: asyncio.Protocol
) -> tuple[MemoryTransport, MemoryTransport]:
    """Connect two protocols in memory; returns (server transport, client transport).

    Must be called with an event loop running. ``connection_made`` is called
    on the server protocol first, then on the client's, before this returns.
    Each end's ``get_extra_info('peername')`` is ``('memory', n)``, n
    numbering the ends made in this process.
    """
    loop = asyncio.get_running_loop()
    server_name, client_name = ("memory", next(_numbers)), ("memory", next(_numbers))
    server = MemoryTransport(loop, server_protocol, server_name, client_name)
    client = MemoryTransport(loop, client_protocol, client_name, server_name)
    server._peer, client._peer = client, server
    server_protocol.connection_made(server)
    client_protocol.connection_made(client)
    return server, client
