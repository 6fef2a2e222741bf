"""The receiving half of the sans-IO connection: what each message from the peer does.

``Inbound`` is the base of ``Connection`` (connection.py, where the theory
of operation and the rules are): it applies one received message to the
connection's and its call's state tables (``_receive``), steps those tables
for both directions (``_next_state``, ``_step_call``) and, on a violation by
the peer, queues the GoAway that says why (``_fail``). ``Connection`` sets
every attribute it declares, in its ``__init__``, and handles the usual
messages inline in ``receive_data`` before they reach ``_receive``.
"""

from __future__ import annotations

from typing import Final

import msgspec

from bastion.exceptions import LocalProtocolError, RemoteProtocolError
from bastion.protocol.frames import FrameWriter
from bastion.protocol.limits import ProtocolLimits
from bastion.protocol.messages import (
    PROTOCOL_VERSION,
    Call,
    Cancel,
    Credit,
    End,
    Error,
    GoAway,
    Hello,
    Item,
    Message,
    Ping,
    Pong,
    Result,
    Welcome,
)
from bastion.protocol.state import CALL_TRANSITIONS, CallInput, CallState, ConnectionState, Direction, Role
from bastion.status import Status

__all__ = ["MAX_CREDIT", "Inbound"]

#: A credit grant may not push a call's credit above this.
MAX_CREDIT: Final = 2**31 - 1


class _CallRecord(msgspec.Struct, gc=False):
    """One open call: its state and its stream credit both ways.

    A Struct, not a class with ``__init__``: one is made per call, in C.
    (``gc=False``: it holds an enum member and two ints, never a cycle.)
    """

    state: CallState
    send_credit: int
    recv_credit: int


_SEND, _RECV = Direction.SEND, Direction.RECV
_FINISHED: Final = (Result, Error)
_CLOSED: Final = ConnectionState.CLOSED
_CALL_CLOSED: Final = CallState.CLOSED
_SEND_FINISH, _RECV_FINISH = CallInput.SEND_FINISH, CallInput.RECV_FINISH
#: The call states a received Result or Error closes (any other is the peer's error).
_FINISHABLE: Final = frozenset(
    state for (state, event), new in CALL_TRANSITIONS.items() if event is _RECV_FINISH and new is _CALL_CLOSED
)
#: A new call's state, by (direction, stream).
_NEW_CALL: Final = {
    (_SEND, False): CALL_TRANSITIONS[CallState.IDLE, CallInput.SEND_CALL],
    (_SEND, True): CALL_TRANSITIONS[CallState.IDLE, CallInput.SEND_CALL_STREAM],
    (_RECV, False): CALL_TRANSITIONS[CallState.IDLE, CallInput.RECV_CALL],
    (_RECV, True): CALL_TRANSITIONS[CallState.IDLE, CallInput.RECV_CALL_STREAM],
}


class Inbound:
    """A connection's handling of what the peer sends (the base of ``Connection``)."""

    role: Role
    limits: ProtocolLimits
    state: ConnectionState
    _table: dict[tuple[ConnectionState, Direction, type], ConnectionState]
    _accepting: frozenset[ConnectionState]
    _writer: FrameWriter
    _calls: dict[int, _CallRecord]
    _highest_id: int
    _peer_window: int
    _peer_max_frame: int
    last_id: int | None
    peer_max_inflight: int
    goaway: GoAway | None
    refused_calls: int
    pings_received: int

    # -- the state tables, both ways -----------------------------------------

    def _next_state(self, direction: Direction, cls: type) -> ConnectionState:
        """The state after ``cls`` goes ``direction``; a protocol error if illegal."""
        new = self._table.get((self.state, direction, cls))
        if new is None:
            what = f"{direction.value} {cls.__name__} in state {self.state.value}"
            if direction is _RECV:
                raise RemoteProtocolError(f"unexpected message: {what}")
            raise LocalProtocolError(f"cannot {what}")
        return new

    def _step_call(self, call_id: int, event: CallInput, *, local: bool) -> bool:
        """Advance one call's machine. False: the call has closed, drop the frame."""
        record = self._calls.get(call_id)
        if record is None:
            if 0 < call_id <= self._highest_id:
                return False
            if local:
                raise LocalProtocolError(f"call {call_id} was never started")
            raise RemoteProtocolError(f"call {call_id} was never started")
        new = CALL_TRANSITIONS.get((record.state, event))
        if new is None:
            what = f"call {call_id}: {event.value} in state {record.state.value}"
            if local:
                raise LocalProtocolError(f"cannot {what}")
            raise RemoteProtocolError(f"unexpected {what}")
        record.state = new
        return True

    # -- input ------------------------------------------------------------------

    def _fail(self, exc: RemoteProtocolError) -> None:
        if self.state is not ConnectionState.CLOSED:
            last = 0
            if self.role is Role.SERVER:
                last = self._highest_id if self.last_id is None else self.last_id
            # The reason is a courtesy: if it does not fit the peer's limit
            # (multi-byte text, a tiny handshake cap), send the code alone,
            # and never let a LocalProtocolError replace the peer's error.
            for reason in (str(exc)[:512], ""):
                try:
                    self._writer.write(GoAway(last, int(exc.status), reason))
                    break
                except LocalProtocolError:
                    continue
        self.state = ConnectionState.CLOSED
        self._calls.clear()

    def _receive(self, message: Message) -> bool:
        """Apply one received message; True if the application should see it."""
        cls = type(message)
        if cls is Call:
            return self._receive_call(message)  # type: ignore[arg-type]
        new = self._table.get((self.state, _RECV, cls))
        self.state = new if new is not None else self._next_state(_RECV, cls)
        if cls is Result or cls is Error:
            # The usual answer to the usual call, closed here (``_receive_finish``
            # without its call: a client receives one of these per call).
            record = self._calls.get(message.id)  # type: ignore[union-attr]
            if record is not None and record.state in _FINISHABLE:
                del self._calls[message.id]  # type: ignore[union-attr]
                return True
            return self._receive_finish(message)  # type: ignore[arg-type]
        if cls is Item:
            return self._receive_item(message)  # type: ignore[arg-type]
        if cls is Credit:
            return self._receive_credit(message)  # type: ignore[arg-type]
        if cls is Cancel:
            ok = self._step_call(message.id, CallInput.RECV_CANCEL, local=False)  # type: ignore[union-attr]
            if ok:
                del self._calls[message.id]  # type: ignore[union-attr]
            return ok
        if cls is End:
            return self._step_call(message.id, CallInput.RECV_END, local=False)  # type: ignore[union-attr]
        if cls is Ping:
            self.pings_received += 1
            self._writer.write(Pong(message.payload))  # type: ignore[union-attr]
            return True
        if cls is Hello:
            return self._receive_hello(message)  # type: ignore[arg-type]
        if cls is Welcome:
            return self._receive_welcome(message)  # type: ignore[arg-type]
        if cls is GoAway:
            return self._receive_goaway(message)  # type: ignore[arg-type]
        return True  # Pong

    def _receive_hello(self, hello: Hello) -> bool:
        if hello.version < PROTOCOL_VERSION:
            raise RemoteProtocolError(f"protocol version {hello.version} is not supported", Status.FAILED_PRECONDITION)
        if hello.window < 1 or hello.max_frame < 1024:
            raise RemoteProtocolError("Hello: window must be >= 1 and max_frame >= 1024")
        self._peer_window = min(hello.window, MAX_CREDIT)
        # Not yet: the Welcome, or a refusal, only has to fit the handshake cap.
        self._peer_max_frame = min(hello.max_frame, 2**32 - 1)
        return True

    def _receive_welcome(self, welcome: Welcome) -> bool:
        if welcome.version != PROTOCOL_VERSION:
            raise RemoteProtocolError(f"server chose protocol version {welcome.version}", Status.FAILED_PRECONDITION)
        if welcome.window < 1 or welcome.max_frame < 1024 or welcome.max_inflight < 1:
            raise RemoteProtocolError("Welcome: window, max_frame and max_inflight out of range")
        self._peer_window = min(welcome.window, MAX_CREDIT)
        self._writer.max_frame = min(welcome.max_frame, 2**32 - 1)
        self.peer_max_inflight = welcome.max_inflight
        return True

    def _receive_goaway(self, goaway: GoAway) -> bool:
        self.goaway = goaway
        if self.role is Role.CLIENT:
            self.last_id = goaway.last_id if self.last_id is None else min(self.last_id, goaway.last_id)
            for call_id in [i for i in self._calls if i > self.last_id]:
                del self._calls[call_id]
        return True

    def _receive_call(self, call: Call) -> bool:
        call_id = call.id
        if not self._highest_id < call_id < 2**63:  # ids are at most 2**63-1 (6.1)
            raise RemoteProtocolError(f"call id {call_id} is not above {self._highest_id} and below 2**63")
        if self.state not in self._accepting:
            new = self._table.get((self.state, _RECV, Call))
            self.state = new if new is not None else self._next_state(_RECV, Call)
        self._highest_id = call_id
        if self.last_id is not None and call_id > self.last_id:
            return False  # sent before the client saw our GoAway: never started
        limits = self.limits
        if len(self._calls) >= limits.max_inflight:
            self.refused_calls += 1
            self._writer.write(
                Error(call_id, int(Status.RESOURCE_EXHAUSTED), f"more than {limits.max_inflight} calls in flight")
            )
            return False
        self._calls[call_id] = _CallRecord(_NEW_CALL[_RECV, call.stream], self._peer_window, limits.window)
        return True

    def _receive_item(self, item: Item) -> bool:
        if not self._step_call(item.id, CallInput.RECV_ITEM, local=False):
            return False
        record = self._calls[item.id]
        record.recv_credit -= 1
        if record.recv_credit < 0:
            raise RemoteProtocolError(f"call {item.id}: stream item sent without credit", Status.RESOURCE_EXHAUSTED)
        return True

    def _receive_finish(self, message: Result | Error) -> bool:
        """A Result or Error ``_receive`` could not simply close a call with: dropped, or the error that explains."""
        if not self._step_call(message.id, _RECV_FINISH, local=False):  # False, or the error that explains
            return False
        del self._calls[message.id]
        return True

    def _receive_credit(self, credit: Credit) -> bool:
        record = self._calls.get(credit.id)
        if record is None:
            if not 0 < credit.id <= self._highest_id:
                raise RemoteProtocolError(f"credit for call {credit.id}, which was never started")
            return False
        if credit.n < 1:
            raise RemoteProtocolError(f"credit of {credit.n} items")
        record.send_credit = min(record.send_credit + credit.n, MAX_CREDIT)
        return True
