"""The protocol's state machines, as data (docs/protocol.md, section 5).

Two machines run per connection:

* the **connection** machine, one per connection, keyed by the connection's
  state and the direction and type of a message;
* the **call** machine, one per call id, keyed by the call's state and a
  ``CallInput``.

Each is a table ``{(state, input): new_state}``. An input that is not in the
table is a protocol error: the peer's fault when the input was received, ours
when we tried to send it. Nothing else in the package decides legality.
"""

from __future__ import annotations

import enum
from typing import Final

from bastion.protocol.messages import (
    Call,
    Cancel,
    Credit,
    End,
    Error,
    GoAway,
    Hello,
    Item,
    Ping,
    Pong,
    Result,
    Welcome,
)

__all__ = [
    "CALL_TRANSITIONS",
    "CONNECTION_TRANSITIONS",
    "CallInput",
    "CallState",
    "ConnectionState",
    "Direction",
    "Role",
]


class _FastEnum(enum.Enum):
    # Members are singletons compared by identity, so identity hashing is
    # consistent with equality -- and C-fast, unlike Enum's hash of the name,
    # which every state-table lookup on the hot path would otherwise pay.
    __hash__ = object.__hash__


class Role(_FastEnum):
    CLIENT = "client"
    SERVER = "server"


class Direction(_FastEnum):
    SEND = "send"
    RECV = "recv"


class ConnectionState(_FastEnum):
    IDLE = "idle"  # nothing exchanged yet
    HANDSHAKE = "handshake"  # Hello sent (client) or received (server)
    OPEN = "open"  # Welcome exchanged: calls flow
    DRAINING = "draining"  # a GoAway went one way or the other: no new calls
    CLOSED = "closed"  # nothing more may be sent or received


class CallState(_FastEnum):
    IDLE = "idle"
    OPEN = "open"  # both sides may still send stream items
    HALF_CLOSED_LOCAL = "half-closed (local)"  # we sent everything; waiting on the peer
    HALF_CLOSED_REMOTE = "half-closed (remote)"  # the peer sent everything; we answer
    CLOSED = "closed"


class CallInput(_FastEnum):
    SEND_CALL = "send Call"
    SEND_CALL_STREAM = "send Call(stream)"
    RECV_CALL = "recv Call"
    RECV_CALL_STREAM = "recv Call(stream)"
    SEND_ITEM = "send Item"
    RECV_ITEM = "recv Item"
    SEND_END = "send End"
    RECV_END = "recv End"
    SEND_FINISH = "send Result/Error"
    RECV_FINISH = "recv Result/Error"
    SEND_CANCEL = "send Cancel"
    RECV_CANCEL = "recv Cancel"


_S, _R = Direction.SEND, Direction.RECV
_C = ConnectionState
_CLIENT_SENDS: Final = (Call, Cancel, Item, End, Credit, Ping, Pong)
_CLIENT_RECEIVES: Final = (Result, Error, Item, Credit, Ping, Pong)


def _connection_table(role: Role) -> dict[tuple[ConnectionState, Direction, type], ConnectionState]:
    table: dict[tuple[ConnectionState, Direction, type], ConnectionState] = {}
    sends, receives = (_CLIENT_SENDS, _CLIENT_RECEIVES) if role is Role.CLIENT else (_CLIENT_RECEIVES, _CLIENT_SENDS)
    # Handshake.
    if role is Role.CLIENT:
        table[_C.IDLE, _S, Hello] = _C.HANDSHAKE
        table[_C.HANDSHAKE, _R, Welcome] = _C.OPEN
        table[_C.HANDSHAKE, _R, GoAway] = _C.CLOSED  # refused
    else:
        table[_C.IDLE, _R, Hello] = _C.HANDSHAKE
        table[_C.HANDSHAKE, _S, Welcome] = _C.OPEN
        table[_C.HANDSHAKE, _S, GoAway] = _C.CLOSED  # refused
    # Open and draining: everything but new calls keeps flowing while draining.
    for state in (_C.OPEN, _C.DRAINING):
        for cls in sends:
            if not (state is _C.DRAINING and cls is Call):
                table[state, _S, cls] = state
        for cls in receives:
            table[state, _R, cls] = state
        table[state, _S, GoAway] = _C.DRAINING
        table[state, _R, GoAway] = _C.DRAINING
    if role is Role.SERVER:
        # Calls the client sent before it saw our GoAway; the core drops the
        # ones above last_id without answering.
        table[_C.DRAINING, _R, Call] = _C.DRAINING
    return table


CONNECTION_TRANSITIONS: Final = {role: _connection_table(role) for role in Role}

_I, _CS = CallInput, CallState
CALL_TRANSITIONS: Final[dict[tuple[CallState, CallInput], CallState]] = {
    (_CS.IDLE, _I.SEND_CALL): _CS.HALF_CLOSED_LOCAL,
    (_CS.IDLE, _I.SEND_CALL_STREAM): _CS.OPEN,
    (_CS.IDLE, _I.RECV_CALL): _CS.HALF_CLOSED_REMOTE,
    (_CS.IDLE, _I.RECV_CALL_STREAM): _CS.OPEN,
    (_CS.OPEN, _I.SEND_ITEM): _CS.OPEN,
    (_CS.OPEN, _I.RECV_ITEM): _CS.OPEN,
    (_CS.OPEN, _I.SEND_END): _CS.HALF_CLOSED_LOCAL,
    (_CS.OPEN, _I.RECV_END): _CS.HALF_CLOSED_REMOTE,
    # The server may answer before the client finished streaming (e.g. a
    # rejected upload); late items for the closed call are then dropped.
    (_CS.OPEN, _I.SEND_FINISH): _CS.CLOSED,
    (_CS.OPEN, _I.RECV_FINISH): _CS.CLOSED,
    (_CS.OPEN, _I.SEND_CANCEL): _CS.CLOSED,
    (_CS.OPEN, _I.RECV_CANCEL): _CS.CLOSED,
    (_CS.HALF_CLOSED_LOCAL, _I.RECV_ITEM): _CS.HALF_CLOSED_LOCAL,
    (_CS.HALF_CLOSED_LOCAL, _I.RECV_FINISH): _CS.CLOSED,
    (_CS.HALF_CLOSED_LOCAL, _I.SEND_CANCEL): _CS.CLOSED,
    (_CS.HALF_CLOSED_REMOTE, _I.SEND_ITEM): _CS.HALF_CLOSED_REMOTE,
    (_CS.HALF_CLOSED_REMOTE, _I.SEND_FINISH): _CS.CLOSED,
    (_CS.HALF_CLOSED_REMOTE, _I.RECV_CANCEL): _CS.CLOSED,
}
