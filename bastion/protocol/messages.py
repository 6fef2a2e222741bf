"""The wire messages (docs/protocol.md, section 3 "Messages").

Every frame body is one MessagePack array whose first element is the message's
type code; the remaining elements are the fields below, in order. Structs are
frozen, ``array_like`` and ``omit_defaults``. Note that msgspec (0.22 at least)
ignores ``omit_defaults`` for array-like structs (jcrist/msgspec#720), so today
every field is sent; receivers accept frames with trailing defaulted fields
left out either way (see the evolution rules below).

Evolution rules (docs/protocol.md, section 9): new fields are only ever added
at the end, with a default; a type code is never reused; a receiver ignores
nothing silently except trailing fields it does not know, which msgspec
already tolerates for array-like structs.

Fields typed ``Raw`` hold an embedded MessagePack value that is decoded later
against the type the *receiver* expects (a method's argument struct, its
return type, a stream's item type) -- never a type named by the peer. Senders
may put any encodable object there; the encoder writes it in place.
"""

from __future__ import annotations

from typing import Any, Final

import msgspec

__all__ = [
    "DEFAULT_PORT",
    "PROTOCOL_VERSION",
    "Call",
    "Cancel",
    "ClientMessage",
    "Credit",
    "End",
    "Error",
    "GoAway",
    "Hello",
    "Item",
    "Message",
    "Ping",
    "Pong",
    "Result",
    "ServerMessage",
    "Welcome",
]

PROTOCOL_VERSION: Final = 1
#: The TCP port a server listens on and a client connects to when none is named (docs/protocol.md).
DEFAULT_PORT: Final = 7400


class _Message(msgspec.Struct, array_like=True, frozen=True, omit_defaults=True, tag_field="type"):
    pass


class Hello(_Message, tag=1, frozen=True):
    """Client -> server, first frame: who is calling and how."""

    version: int
    client: str
    token: str | None = None
    window: int = 16
    max_frame: int = 1_048_576
    metadata: dict[str, str] = {}


class Welcome(_Message, tag=2, frozen=True):
    """Server -> client, answer to Hello: the limits this connection runs under."""

    version: int
    server: str
    principal: str
    max_frame: int
    max_inflight: int
    window: int
    ping_interval_ms: int
    metadata: dict[str, str] = {}


class Call(_Message, tag=3, frozen=True):
    """Client -> server: start call ``id`` of ``method`` with named ``args``."""

    id: int
    method: str
    args: msgspec.Raw
    timeout_ms: int | None = None
    priority: int | None = None
    stream: bool = False
    metadata: dict[str, str] | None = None


class Result(_Message, tag=4, frozen=True):
    """Server -> client: call ``id`` finished with OK and ``value``."""

    id: int
    value: msgspec.Raw


class Error(_Message, tag=5, frozen=True):
    """Server -> client: call ``id`` finished with status ``code``."""

    id: int
    code: int
    message: str
    details: dict[str, Any] | None = None
    retry_after_ms: int | None = None


class Cancel(_Message, tag=6, frozen=True):
    """Client -> server: the client no longer wants call ``id``."""

    id: int


class Item(_Message, tag=7, frozen=True):
    """Either direction: one item of call ``id``'s stream; spends one credit."""

    id: int
    value: msgspec.Raw


class End(_Message, tag=8, frozen=True):
    """Client -> server: the client's stream for call ``id`` is complete."""

    id: int


class Credit(_Message, tag=9, frozen=True):
    """Either direction: the sender may send ``n`` more items on call ``id``."""

    id: int
    n: int


class Ping(_Message, tag=10, frozen=True):
    """Either direction: please answer with a Pong carrying the same payload."""

    payload: int


class Pong(_Message, tag=11, frozen=True):
    """Either direction: the answer to a Ping."""

    payload: int


class GoAway(_Message, tag=12, frozen=True):
    """Either direction: no new calls; calls with ids above ``last_id`` never started."""

    last_id: int
    code: int
    message: str = ""


ClientMessage = Hello | Call | Cancel | Item | End | Credit | Ping | Pong | GoAway
ServerMessage = Welcome | Result | Error | Item | Credit | Ping | Pong | GoAway
Message = Hello | Welcome | Call | Result | Error | Cancel | Item | End | Credit | Ping | Pong | GoAway
