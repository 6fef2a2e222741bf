"""Test harness for the sans-IO core: two ``Connection`` objects wired back to back.

Modelled on h11's ``tests/helpers.py``: no sockets, no event loop. What one end
queues in ``data_to_send`` is handed to the other's ``receive_data`` by
``ConnectionPair.shuttle`` (or one direction at a time by ``to_server`` and
``to_client``), and the messages each end surfaces are returned for assertions.
"""

from __future__ import annotations

from typing import Any

import msgspec

from bastion.protocol.connection import Connection, ProtocolLimits
from bastion.protocol.frames import FrameReader, FrameWriter
from bastion.protocol.messages import (
    PROTOCOL_VERSION,
    ClientMessage,
    Hello,
    Message,
    ServerMessage,
    Welcome,
)
from bastion.protocol.state import ConnectionState, Role

#: A frame cap large enough for anything the tests build.
BIG = 2**32 - 1


def frame(*messages: object) -> bytes:
    """The wire bytes of ``messages``, each behind its length prefix."""
    writer = FrameWriter(BIG)
    for message in messages:
        writer.write(message)
    return writer.take()


def raw_frame(body: bytes) -> bytes:
    """A frame around an arbitrary body (which may be invalid MessagePack)."""
    return len(body).to_bytes(4, "big") + body


def decode_output(data: bytes, sender: Role) -> list[Message]:
    """Decode bytes a ``sender`` connection queued, as its peer would."""
    union = ClientMessage if sender is Role.CLIENT else ServerMessage
    reader: FrameReader[Message] = FrameReader(union, BIG)
    messages = reader.feed(data)
    assert reader.buffered == 0, "output ended in a partial frame"
    return messages


def raw(value: Any) -> msgspec.Raw:
    """``value`` as a ``Raw`` field, the way a receiver sees it."""
    return msgspec.Raw(msgspec.msgpack.encode(value))


def hello_for(limits: ProtocolLimits, **overrides: Any) -> Hello:
    """The Hello a client with ``limits`` sends."""
    fields: dict[str, Any] = {
        "version": PROTOCOL_VERSION,
        "client": "test-client",
        "window": limits.window,
        "max_frame": limits.max_frame,
    }
    fields.update(overrides)
    return Hello(**fields)


def welcome_for(limits: ProtocolLimits, **overrides: Any) -> Welcome:
    """The Welcome a server with ``limits`` sends."""
    fields: dict[str, Any] = {
        "version": PROTOCOL_VERSION,
        "server": "test-server",
        "principal": "anonymous",
        "max_frame": limits.max_frame,
        "max_inflight": limits.max_inflight,
        "window": limits.window,
        "ping_interval_ms": 30_000,
    }
    fields.update(overrides)
    return Welcome(**fields)


class ConnectionPair:
    """A client and a server ``Connection`` that talk only to each other."""

    def __init__(
        self,
        client_limits: ProtocolLimits | None = None,
        server_limits: ProtocolLimits | None = None,
    ) -> None:
        self.client = Connection(Role.CLIENT, client_limits)
        self.server = Connection(Role.SERVER, server_limits)

    def to_server(self) -> list[Message]:
        """Deliver everything the client queued; return what the server surfaces."""
        return self.server.receive_data(self.client.data_to_send())

    def to_client(self) -> list[Message]:
        """Deliver everything the server queued; return what the client surfaces."""
        return self.client.receive_data(self.server.data_to_send())

    def shuttle(self) -> tuple[list[Message], list[Message]]:
        """Move bytes both ways until neither end has output left.

        Returns (messages the client surfaced, messages the server surfaced),
        so automatic answers (a Pong for a Ping, a refusal) also travel.
        """
        client_events: list[Message] = []
        server_events: list[Message] = []
        while self.client.pending_output or self.server.pending_output:
            server_events += self.to_server()
            client_events += self.to_client()
        return client_events, server_events

    def handshake(self, hello: Hello | None = None, welcome: Welcome | None = None) -> None:
        """Run Hello/Welcome; both ends end up OPEN."""
        self.client.send_hello(hello or hello_for(self.client.limits))
        [received_hello] = self.to_server()
        assert isinstance(received_hello, Hello)
        self.server.send_welcome(welcome or welcome_for(self.server.limits))
        [received_welcome] = self.to_client()
        assert isinstance(received_welcome, Welcome)
        assert self.client.state is ConnectionState.OPEN
        assert self.server.state is ConnectionState.OPEN


def open_pair(
    client_limits: ProtocolLimits | None = None,
    server_limits: ProtocolLimits | None = None,
) -> ConnectionPair:
    """A ``ConnectionPair`` that has completed its handshake."""
    pair = ConnectionPair(client_limits, server_limits)
    pair.handshake()
    return pair
