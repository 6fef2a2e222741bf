"""The sans-IO connection: bytes in -> messages out, calls in -> bytes out.

Theory of operation. A ``Connection`` is one end (client or server) of one
bastion connection. The transport feeds it what it reads
(``receive_data``/``receive_eof``) and gets back the messages the application
must act on; the application calls ``send_*`` methods, and the transport writes
whatever ``data_to_send`` returns. Some input produces output with no
application call at all -- a Ping is answered, a call over the in-flight limit
is refused -- which is why output is a buffer to drain, not a return value.

Every message passes the connection state table and, when it belongs to a
call, that call's state table (``bastion.protocol.state``). A violation by
the peer raises ``RemoteProtocolError`` after queuing a GoAway that says why;
the transport writes it and closes. A violation by us raises
``LocalProtocolError`` and sends nothing. What each received message does is
``Inbound``'s (inbound.py), the base of ``Connection``; the sends are here.

Rules this module enforces (docs/protocol.md sections 4-7): call ids strictly
increase; frames for a call that has closed are dropped (they crossed a Cancel
or a final answer on the wire); frames for a call never opened are an error;
stream items spend credit the receiver granted; a server in DRAINING drops
calls above the last id it announced; a server with ``max_inflight`` calls
open refuses the next with RESOURCE_EXHAUSTED.
"""

from __future__ import annotations

from typing import Any, Final

from bastion.exceptions import LocalProtocolError, RemoteProtocolError
from bastion.protocol.frames import ENCODE_ERRORS, HEADER_SIZE, FrameReader, FrameWriter, encode_error, pack_header
from bastion.protocol.inbound import (
    _CALL_CLOSED,
    _CLOSED,
    _FINISHABLE,
    _NEW_CALL,
    _RECV,
    _SEND,
    _SEND_FINISH,
    MAX_CREDIT,
    Inbound,
    _CallRecord,
)
from bastion.protocol.limits import ProtocolLimits
from bastion.protocol.messages import (
    Call,
    Cancel,
    ClientMessage,
    Credit,
    End,
    Error,
    GoAway,
    Hello,
    Item,
    Message,
    Ping,
    Result,
    ServerMessage,
    Welcome,
)
from bastion.protocol.state import (
    CALL_TRANSITIONS,
    CONNECTION_TRANSITIONS,
    CallInput,
    CallState,
    ConnectionState,
    Direction,
    Role,
)
from bastion.status import Status

__all__ = ["Connection", "ProtocolLimits"]  # ProtocolLimits: bastion/protocol/limits.py, kept importable here

#: A Call's tag: the first element of its array on the wire (messages.py: tagged, array_like).
_CALL_TAG: Final = Call.__struct_config__.tag
_RESULT_TAG: Final = Result.__struct_config__.tag
#: The call states an answer we send (Result or Error) closes.
_ANSWERABLE_CALL: Final = frozenset(
    state for (state, event), new in CALL_TRANSITIONS.items() if event is _SEND_FINISH and new is _CALL_CLOSED
)
#: ``_NEW_CALL[_SEND, stream]`` for each ``stream`` (the client's hot path).
_SENT_UNARY: Final = _NEW_CALL[_SEND, False]
_SENT_STREAM: Final = _NEW_CALL[_SEND, True]


class Connection(Inbound):
    """One end of a bastion connection, with no I/O of its own."""

    def __init__(self, role: Role, limits: ProtocolLimits | None = None) -> None:
        self.role = role
        self.limits = limits or ProtocolLimits()
        self.state = ConnectionState.IDLE
        self._table = CONNECTION_TRANSITIONS[role]
        # The states in which sending a Call (a client's) or receiving a Result (a
        # client's again) is legal and changes nothing: their hot paths check these.
        self._calling = self._unchanged_by(_SEND, Call)
        self._answerable = self._unchanged_by(_RECV, Result)
        # And the server's: receiving a Call, sending a Result or an Error.
        self._accepting = self._unchanged_by(_RECV, Call)
        self._answering = self._unchanged_by(_SEND, Result) & self._unchanged_by(_SEND, Error)
        #: The frame decoder; read-only outside (the server watches its partial frame's pace).
        self.reader: FrameReader[Message] = FrameReader(
            ClientMessage if role is Role.SERVER else ServerMessage,
            self.limits.handshake_max_frame if role is Role.SERVER else self.limits.max_frame,
        )
        # Until the peer tells us its limit, send nothing above the handshake cap.
        self._writer = FrameWriter(self.limits.handshake_max_frame)
        #: The frames waiting to be sent: ``len(output.buffer)`` is ``pending_output``, read
        #: without a property call (the transport checks it once per call it flushes).
        self.output = self._writer
        self._calls: dict[int, _CallRecord] = {}
        self._window = self.limits.window  # initial receive credit per call, for the peer
        self._highest_id = 0  # highest call id sent (client) or received (server)
        self._peer_window = 0  # initial send credit per call, from the peer
        self._peer_max_frame = self.limits.max_frame  # from the Hello; applies after our Welcome
        self.last_id: int | None = None  # from a GoAway, sent or received
        self.peer_max_inflight = self.limits.max_inflight
        self.goaway: GoAway | None = None  # the one received, if any
        #: Calls refused for max_inflight so far (server): the application never
        #: sees them, but may want to count them as abuse.
        self.refused_calls = 0
        self.pings_received = 0  # each Pong queued at once: a transport can see a flood before sending them

    def _unchanged_by(self, direction: Direction, cls: type) -> frozenset[ConnectionState]:
        """The states ``cls`` going ``direction`` may leave as they are (per the state table)."""
        return frozenset(
            state for (state, way, kind), new in self._table.items() if (way, kind, new) == (direction, cls, state)
        )

    # -- introspection --------------------------------------------------------

    @property
    def open_calls(self) -> int:
        return len(self._calls)

    @property
    def highest_id(self) -> int:
        return self._highest_id

    def is_open(self, call_id: int) -> bool:
        """Whether ``call_id`` is open: started, and neither answered nor cancelled yet."""
        return call_id in self._calls

    def call_state(self, call_id: int) -> CallState:
        record = self._calls.get(call_id)
        if record is not None:
            return record.state
        return CallState.CLOSED if 0 < call_id <= self._highest_id else CallState.IDLE

    def send_credit(self, call_id: int) -> int:
        """Items we may send on ``call_id`` now (0 for a closed call)."""
        record = self._calls.get(call_id)
        return record.send_credit if record is not None else 0

    # -- input ------------------------------------------------------------------

    def receive_data(self, data: bytes | bytearray | memoryview) -> list[Message]:
        """Feed bytes read from the peer; return the messages to act on."""
        if self.state is _CLOSED:
            return []
        try:
            messages = self.reader.feed(data)
            events: list[Message] = []
            receive, keep = self._receive, events.append
            calls = self._calls
            answerable = self.state in self._answerable
            for message in messages:
                if type(message) is Call:  # the server's usual message: straight to its own check
                    if self._receive_call(message):
                        keep(message)
                    if self.state is _CLOSED:  # type: ignore[comparison-overlap]
                        break
                    continue
                if answerable and type(message) is Result:
                    # ``_receive`` for the usual message, inline (a client gets one per
                    # call): the answer to an open call closes it, in a state it leaves as it is.
                    record = calls.pop(message.id, None)
                    if record is not None:
                        if record.state in _FINISHABLE:
                            keep(message)
                            continue
                        calls[message.id] = record  # not to be closed so: _receive says why
                if receive(message):
                    keep(message)
                if self.state is _CLOSED:  # type: ignore[comparison-overlap]  # _receive may close
                    break
                answerable = self.state in self._answerable  # or change the state otherwise
            return events
        except RemoteProtocolError as exc:
            self._fail(exc)
            raise

    def receive_eof(self) -> None:
        """The peer closed its end; every open call is over."""
        self.state = ConnectionState.CLOSED
        self._calls.clear()

    def data_to_send(self) -> bytearray:
        """Everything queued for the peer since the last call, as one buffer (the caller's to keep)."""
        return self._writer.take()

    @property
    def pending_output(self) -> int:
        return len(self._writer.buffer)

    # -- handshake ------------------------------------------------------------

    # The handshake and GoAway sends write first and change state after, so a
    # message too large for the peer (LocalProtocolError) changes nothing and
    # may be retried smaller.

    def send_hello(self, hello: Hello) -> None:
        new = self._next_state(_SEND, Hello)
        self._writer.write(hello)
        self.state = new

    def send_welcome(self, welcome: Welcome) -> None:
        new = self._next_state(_SEND, Welcome)
        self._writer.write(welcome)  # within the handshake cap (docs/protocol.md 2.1)
        self.state = new
        self.reader.max_frame = self.limits.max_frame
        self._writer.max_frame = self._peer_max_frame

    def reject(self, status: Status, message: str) -> None:
        """Refuse the handshake (server) with a coded reason, then close."""
        new = self._next_state(_SEND, GoAway)
        self._writer.write(GoAway(0, int(status), message))
        self.state = new
        self.last_id = 0

    # -- calls ------------------------------------------------------------------

    def send_call(
        self,
        method: str,
        args: Any,
        timeout_ms: int | None = None,
        priority: int | None = None,
        stream: bool = False,
        metadata: dict[str, str] | None = None,
    ) -> int:
        """Start a call (client); returns its id. (Options may be passed by position: the async client's hot path.)"""
        if self.state not in self._calling:  # else the state stays as it is
            self.state = self._next_state(_SEND, Call)
        call_id = self._highest_id + 1
        # The Call's array as a tuple of its fields in wire order: the bytes the Struct encodes
        # to, without making the Struct (the client's hot path; tests/protocol/test_connection.py
        # holds the two equal, field for field, and docs/protocol.md's worked example holds them).
        fields = (_CALL_TAG, call_id, method, args, timeout_ms, priority, stream, metadata)
        # ``FrameWriter.write``, inline: one call fewer. (``encode`` read as an attribute, then
        # called: the interpreter caches that lookup, not a method call on an instance attribute.)
        writer = self._writer
        buffer = writer.buffer
        start = len(buffer)
        encode = writer.encode_into
        try:
            encode(fields, buffer, start + HEADER_SIZE)
        except ENCODE_ERRORS as exc:
            del buffer[start:]
            raise encode_error("Call", exc) from None
        length = len(buffer) - start - HEADER_SIZE
        if length > writer.max_frame:
            del buffer[start:]
            raise writer.too_large(length)
        pack_header(buffer, start, length)
        self._highest_id = call_id
        # (Not a tuple indexed by ``stream``: a bool is not the interpreter's fast int index.)
        self._calls[call_id] = _CallRecord(_SENT_STREAM if stream else _SENT_UNARY, self._peer_window, self._window)
        return call_id

    def send_result(self, call_id: int, value: Any) -> bool:
        """Finish a call with OK (server). False if the call had already closed."""
        record = self._calls.get(call_id)
        if record is not None and record.state in _ANSWERABLE_CALL and self.state in self._answering:
            # _finish's usual case, for the usual answer: the Result's array written as a
            # tuple, without making the Struct (the server's hot path; as send_call's Call).
            self._writer.write((_RESULT_TAG, call_id, value), "Result")
            del self._calls[call_id]
            return True
        return self._finish(call_id, Result(call_id, value))

    def send_error(
        self,
        call_id: int,
        status: Status,
        message: str,
        *,
        details: dict[str, Any] | None = None,
        retry_after_ms: int | None = None,
    ) -> bool:
        """Finish a call with a status (server). False if it had already closed."""
        return self._finish(call_id, Error(call_id, int(status), message, details, retry_after_ms))

    def send_cancel(self, call_id: int) -> bool:
        """Abandon a call (client). False if it had already closed."""
        self._check_send(Cancel)
        if not self._step_call(call_id, CallInput.SEND_CANCEL, local=True):
            return False
        self._transition(_SEND, Cancel)
        self._writer.write(Cancel(call_id))
        del self._calls[call_id]
        return True

    def send_item(self, call_id: int, value: Any) -> bool:
        """Send one stream item, spending one credit. False if the call closed."""
        record = self._calls.get(call_id)
        if record is None:
            self._check_send(Item)
            return self._step_call(call_id, CallInput.SEND_ITEM, local=True)  # raises if never started
        if record.send_credit <= 0:
            raise LocalProtocolError(f"call {call_id}: no stream credit left")
        self._transition(_SEND, Item)
        self._step_call(call_id, CallInput.SEND_ITEM, local=True)
        self._writer.write(Item(call_id, value))
        record.send_credit -= 1
        return True

    def send_end(self, call_id: int) -> bool:
        """Close our side of a call's stream (client). False if the call closed."""
        self._check_send(End)
        if not self._step_call(call_id, CallInput.SEND_END, local=True):
            return False
        self._transition(_SEND, End)
        self._writer.write(End(call_id))
        return True

    def grant(self, call_id: int, n: int) -> bool:
        """Let the peer send ``n`` more items on ``call_id``.

        ``n`` is cut so the peer never holds more than MAX_CREDIT; False if the
        call has closed or there is nothing to grant.
        """
        record = self._calls.get(call_id)
        if record is None:
            self._check_send(Credit)
            if not 0 < call_id <= self._highest_id:
                raise LocalProtocolError(f"call {call_id} was never started")
            return False
        n = min(n, MAX_CREDIT - record.recv_credit)
        if n <= 0:
            return False
        self._transition(_SEND, Credit)
        self._writer.write(Credit(call_id, n))
        record.recv_credit += n
        return True

    # -- connection control -------------------------------------------------

    def send_ping(self, payload: int) -> None:
        self._transition(_SEND, Ping)
        self._writer.write(Ping(payload))

    def send_goaway(self, status: Status = Status.OK, message: str = "") -> int:
        """Stop taking new calls; returns the last call id that will be processed."""
        if self.state is ConnectionState.HANDSHAKE and self.role is Role.SERVER:
            self.reject(status, message)
            return 0
        if self.state not in (ConnectionState.OPEN, ConnectionState.DRAINING):
            self.state = ConnectionState.CLOSED
            return self._highest_id
        new = self._next_state(_SEND, GoAway)
        last_id = 0
        if self.role is Role.SERVER:
            # Calls received after an earlier GoAway raised _highest_id but never
            # started: a second GoAway must not announce them.
            last_id = self._highest_id if self.last_id is None else self.last_id
        self._writer.write(GoAway(last_id, int(status), message))
        self.state = new
        if self.role is Role.SERVER:
            self.last_id = last_id
            return last_id
        return self._highest_id

    def close(self) -> None:
        self.state = ConnectionState.CLOSED
        self._calls.clear()

    # -- internals --------------------------------------------------------------

    def _transition(self, direction: Direction, cls: type) -> None:
        self.state = self._next_state(direction, cls)

    def _check_send(self, cls: type) -> None:
        """LocalProtocolError unless ``cls`` may be sent now, changing nothing.

        Call-level sends check this before touching the call's state, so a
        misuse (a client sending Result, a server sending End) cannot leave the
        call half-advanced. Once CLOSED every call is over, and those sends
        decline quietly in ``_step_call`` instead.
        """
        if self.state is not ConnectionState.CLOSED:
            self._next_state(_SEND, cls)

    def _finish(self, call_id: int, message: Result | Error) -> bool:
        record = self._calls.get(call_id)
        if record is not None and record.state in _ANSWERABLE_CALL and self.state in self._answering:
            # The usual answer to an open call, in a state it leaves as it is: the checks
            # below, precomputed. Nothing changes unless the frame is written.
            self._writer.write(message)
            del self._calls[call_id]
            return True
        state = self.state
        # _check_send, keeping the state it finds: applied below if the call is open.
        new = None
        if state is not _CLOSED:
            new = self._table.get((state, _SEND, type(message)))
            if new is None:
                self._next_state(_SEND, type(message))  # raises
        record = self._calls.get(call_id)
        if record is None or CALL_TRANSITIONS.get((record.state, _SEND_FINISH)) is not _CALL_CLOSED:
            return self._step_call(call_id, _SEND_FINISH, local=True)  # False, or the error that explains
        assert new is not None  # a call is open, so the connection is not CLOSED
        # Nothing changes until the frame is written: one too large for the peer (a
        # Result over its max_frame) leaves the call open, to be answered with an Error.
        self._writer.write(message)
        self.state = new
        del self._calls[call_id]
        return True
