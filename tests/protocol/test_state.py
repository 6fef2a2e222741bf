"""bastion/protocol/state.py: every (state, input) pair of both machines.

Two layers. The tables' shape is checked directly. Then every pair is
exercised through a real ``Connection`` put into the state with the public
API: a pair in the table must be accepted and land where the table says; a
pair outside it must raise -- ``RemoteProtocolError`` (and close) when the
input was received, ``LocalProtocolError`` (changing nothing) when we tried to
send it. The space is small (a few hundred cases), so it is walked
exhaustively rather than sampled.
"""

from __future__ import annotations

import itertools
import typing
from collections.abc import Callable
from typing import Any

import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from bastion.exceptions import LocalProtocolError, RemoteProtocolError
from bastion.protocol.connection import Connection, ProtocolLimits
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
    Pong,
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
from tests.protocol.helpers import (
    ConnectionPair,
    decode_output,
    frame,
    hello_for,
    raw,
    welcome_for,
)

S, R = Direction.SEND, Direction.RECV
CS = ConnectionState
MESSAGE_TYPES: list[type] = list(typing.get_args(Message))
RECEIVABLE = {
    Role.CLIENT: set(typing.get_args(ServerMessage)),
    Role.SERVER: set(typing.get_args(ClientMessage)),
}


def peer_of(role: Role) -> Role:
    return Role.SERVER if role is Role.CLIENT else Role.CLIENT


# -- table shape -----------------------------------------------------------------


@pytest.mark.parametrize("role", list(Role))
def test_connection_table_keys_and_values_are_well_typed(role: Role) -> None:
    table = CONNECTION_TRANSITIONS[role]
    for (state, direction, cls), new in table.items():
        assert isinstance(state, ConnectionState)
        assert isinstance(direction, Direction)
        assert cls in MESSAGE_TYPES
        assert isinstance(new, ConnectionState)


@pytest.mark.parametrize("role", list(Role))
def test_nothing_leaves_closed(role: Role) -> None:
    assert not [key for key in CONNECTION_TRANSITIONS[role] if key[0] is CS.CLOSED]


@pytest.mark.parametrize("role", list(Role))
def test_what_one_end_sends_the_other_may_receive(role: Role) -> None:
    # Ignoring states: the two roles' tables are mirror images message-wise.
    ours = CONNECTION_TRANSITIONS[role]
    theirs = CONNECTION_TRANSITIONS[peer_of(role)]
    sent = {cls for (_, d, cls) in ours if d is S}
    received_by_peer = {cls for (_, d, cls) in theirs if d is R}
    assert sent == received_by_peer


@pytest.mark.parametrize("role", list(Role))
def test_received_classes_match_the_decoder(role: Role) -> None:
    # A message the decoder accepts but no state accepts is dead weight; one a
    # state accepts but the decoder rejects can never arrive.
    received = {cls for (_, d, cls) in CONNECTION_TRANSITIONS[role] if d is R}
    assert received == RECEIVABLE[role]


@pytest.mark.parametrize("role", list(Role))
def test_states_are_reachable_in_order(role: Role) -> None:
    table = CONNECTION_TRANSITIONS[role]
    reachable = {CS.IDLE}
    frontier = [CS.IDLE]
    while frontier:
        state = frontier.pop()
        for (s, _, _), new in table.items():
            if s is state and new not in reachable:
                reachable.add(new)
                frontier.append(new)
    assert reachable == set(CS)


@pytest.mark.parametrize("role", list(Role))
def test_auto_answers_are_always_legal(role: Role) -> None:
    # The core sends a Pong for every Ping, and a server refuses a Call over
    # max_inflight with an Error, without consulting the table: check that it
    # would have allowed them.
    table = CONNECTION_TRANSITIONS[role]
    for state in CS:
        if (state, R, Ping) in table:
            assert (state, S, Pong) in table
        if (state, R, Call) in table:
            assert (state, S, Error) in table


def test_only_a_server_receives_calls_while_draining() -> None:
    assert (CS.DRAINING, R, Call) in CONNECTION_TRANSITIONS[Role.SERVER]
    assert (CS.DRAINING, S, Call) not in CONNECTION_TRANSITIONS[Role.CLIENT]


def test_call_table_shape() -> None:
    for (state, event), new in CALL_TRANSITIONS.items():
        assert isinstance(state, CallState)
        assert isinstance(event, CallInput)
        assert isinstance(new, CallState)
        assert state is not CallState.CLOSED
        assert new is not CallState.IDLE
    # Only the four opening inputs leave IDLE, and nothing else accepts them.
    opening = {
        CallInput.SEND_CALL,
        CallInput.SEND_CALL_STREAM,
        CallInput.RECV_CALL,
        CallInput.RECV_CALL_STREAM,
    }
    assert {e for (s, e) in CALL_TRANSITIONS if s is CallState.IDLE} == opening
    assert {s for (s, e) in CALL_TRANSITIONS if e in opening} == {CallState.IDLE}
    # Every non-idle, non-closed state can reach CLOSED in one step.
    for state in (CallState.OPEN, CallState.HALF_CLOSED_LOCAL, CallState.HALF_CLOSED_REMOTE):
        assert CallState.CLOSED in {n for (s, _), n in CALL_TRANSITIONS.items() if s is state}


# -- building a Connection in a given state, through the real API ----------------------

# Every builder leaves call 1 (a streaming call, call state OPEN at both ends)
# in place whenever the connection state allows calls.


def _open(role: Role) -> tuple[Connection, ConnectionPair]:
    pair = ConnectionPair()
    pair.handshake()
    pair.client.send_call("m", None, stream=True)
    pair.to_server()
    conn = pair.client if role is Role.CLIENT else pair.server
    assert conn.call_state(1) is CallState.OPEN
    return conn, pair


def _idle(role: Role) -> Connection:
    return Connection(role)


def _handshake(role: Role) -> Connection:
    pair = ConnectionPair()
    pair.client.send_hello(hello_for(pair.client.limits))
    pair.to_server()
    return pair.client if role is Role.CLIENT else pair.server


def _draining_sent(role: Role) -> Connection:
    conn, _ = _open(role)
    conn.send_goaway()
    return conn


def _draining_received(role: Role) -> Connection:
    conn, pair = _open(role)
    if role is Role.CLIENT:
        pair.server.send_goaway()
        pair.to_client()
    else:
        pair.client.send_goaway()
        pair.to_server()
    return conn


def _closed_refused(role: Role) -> Connection:
    pair = ConnectionPair()
    pair.client.send_hello(hello_for(pair.client.limits))
    pair.to_server()
    pair.server.reject(Status.UNAUTHENTICATED, "no")
    pair.to_client()
    return pair.client if role is Role.CLIENT else pair.server


def _closed_by_close(role: Role) -> Connection:
    conn, _ = _open(role)
    conn.close()
    return conn


def _closed_by_eof(role: Role) -> Connection:
    conn, _ = _open(role)
    conn.receive_eof()
    return conn


def _closed_by_failure(role: Role) -> Connection:
    conn, _ = _open(role)
    with pytest.raises(RemoteProtocolError):
        conn.receive_data(b"\x00\x00\x00\x01\xc1")
    return conn


BUILDERS: dict[ConnectionState, list[Callable[[Role], Connection]]] = {
    CS.IDLE: [_idle],
    CS.HANDSHAKE: [_handshake],
    CS.OPEN: [lambda role: _open(role)[0]],
    CS.DRAINING: [_draining_sent, _draining_received],
    CS.CLOSED: [_closed_refused, _closed_by_close, _closed_by_eof, _closed_by_failure],
}


@pytest.mark.parametrize("role", list(Role))
@pytest.mark.parametrize("state", list(CS))
def test_builders_reach_their_state(role: Role, state: ConnectionState) -> None:
    for build in BUILDERS[state]:
        assert build(role).state is state


def _cases() -> list[Any]:
    return [
        pytest.param(role, state, build, id=f"{role.value}-{state.value}-{i}")
        for role in Role
        for state in CS
        for i, build in enumerate(BUILDERS[state])
    ]


# -- the connection machine, received input -------------------------------------------

# A received message of each class that is legal at the call level whenever
# the connection state accepts it (call 1 is open at both ends; 2 is unused).
RECEIVED_SAMPLES: dict[type, Message] = {
    Hello: hello_for(ProtocolLimits()),
    Welcome: welcome_for(ProtocolLimits()),
    Call: Call(2, "m", raw(None), stream=True),
    Result: Result(1, raw("done")),
    Error: Error(1, int(Status.NOT_FOUND), "no"),
    Cancel: Cancel(1),
    Item: Item(1, raw(1)),
    End: End(1),
    Credit: Credit(1, 1),
    Ping: Ping(42),
    Pong: Pong(42),
    GoAway: GoAway(1, 0, "bye"),
}


@pytest.mark.parametrize(("role", "state", "build"), _cases())
@pytest.mark.parametrize("cls", MESSAGE_TYPES, ids=lambda c: c.__name__)
def test_every_received_input(role: Role, state: ConnectionState, build: Any, cls: type) -> None:
    conn = build(role)
    conn.data_to_send()
    data = frame(RECEIVED_SAMPLES[cls])
    new = CONNECTION_TRANSITIONS[role].get((state, R, cls))
    if state is CS.CLOSED:
        # Bytes that arrive after the end are ignored: the transport is closing.
        assert conn.receive_data(data) == []
        assert conn.data_to_send() == b""
        assert conn.state is CS.CLOSED
    elif new is None:
        with pytest.raises(RemoteProtocolError):
            conn.receive_data(data)
        assert conn.state is CS.CLOSED
        [goaway] = decode_output(conn.data_to_send(), role)
        assert isinstance(goaway, GoAway)
        assert goaway.code != Status.OK
    else:
        conn.receive_data(data)
        assert conn.state is new


# -- the connection machine, sent input --------------------------------------------------

SENDERS: dict[type, Callable[[Connection], Any]] = {
    Hello: lambda c: c.send_hello(hello_for(c.limits)),
    Welcome: lambda c: c.send_welcome(welcome_for(c.limits)),
    Call: lambda c: c.send_call("m", None, stream=True),
    Result: lambda c: c.send_result(1, "done"),
    Error: lambda c: c.send_error(1, Status.NOT_FOUND, "no"),
    Cancel: lambda c: c.send_cancel(1),
    Item: lambda c: c.send_item(1, "x"),
    End: lambda c: c.send_end(1),
    Credit: lambda c: c.grant(1, 1),
    Ping: lambda c: c.send_ping(42),
}


def test_every_sendable_message_has_an_api_but_pong() -> None:
    # A Pong is only ever sent automatically, in answer to a Ping.
    assert set(SENDERS) | {GoAway, Pong} == set(MESSAGE_TYPES)


@pytest.mark.parametrize(("role", "state", "build"), _cases())
@pytest.mark.parametrize("cls", list(SENDERS), ids=lambda c: c.__name__)
def test_every_sent_input(role: Role, state: ConnectionState, build: Any, cls: type) -> None:
    conn = build(role)
    conn.data_to_send()
    call_before = conn.call_state(1)
    new = CONNECTION_TRANSITIONS[role].get((state, S, cls))
    if new is not None:
        result = SENDERS[cls](conn)
        assert result is not False
        assert conn.state is new
        assert [type(m) for m in decode_output(conn.data_to_send(), role)] == [cls]
        return
    try:
        result = SENDERS[cls](conn)
    except LocalProtocolError:
        pass
    else:
        # Only a call-level operation on a call that has already closed may
        # decline quietly instead of raising.
        assert state is CS.CLOSED, f"{cls.__name__} returned {result!r}"
        assert result is False
    assert conn.state is state
    assert conn.call_state(1) is call_before
    assert conn.data_to_send() == b""


@pytest.mark.parametrize(("role", "state", "build"), _cases())
def test_goaway_sent_in_every_state(role: Role, state: ConnectionState, build: Any) -> None:
    conn = build(role)
    conn.data_to_send()
    new = CONNECTION_TRANSITIONS[role].get((state, S, GoAway))
    conn.send_goaway(Status.UNAVAILABLE, "shutting down")
    if new is None:
        # Before (or after) there is anything to tell the peer, going away is
        # just closing.
        assert conn.state is CS.CLOSED
        assert conn.data_to_send() == b""
    else:
        assert conn.state is new
        [goaway] = decode_output(conn.data_to_send(), role)
        assert isinstance(goaway, GoAway)
        assert goaway.code == Status.UNAVAILABLE


# -- the call machine -----------------------------------------------------------------

CALL_INPUT_MESSAGE: dict[CallInput, type] = {
    CallInput.SEND_CALL: Call,
    CallInput.SEND_CALL_STREAM: Call,
    CallInput.RECV_CALL: Call,
    CallInput.RECV_CALL_STREAM: Call,
    CallInput.SEND_ITEM: Item,
    CallInput.RECV_ITEM: Item,
    CallInput.SEND_END: End,
    CallInput.RECV_END: End,
    CallInput.SEND_FINISH: Result,
    CallInput.RECV_FINISH: Result,
    CallInput.SEND_CANCEL: Cancel,
    CallInput.RECV_CANCEL: Cancel,
}


def _call_in_state(role: Role, state: CallState) -> Connection:
    """An OPEN connection whose call 1 is in ``state`` on ``role``'s side, if reachable."""
    pair = ConnectionPair()
    pair.handshake()
    conn = pair.client if role is Role.CLIENT else pair.server
    if state is CallState.IDLE:
        return conn
    if state is CallState.OPEN:
        pair.client.send_call("m", None, stream=True)
    elif state in (CallState.HALF_CLOSED_LOCAL, CallState.HALF_CLOSED_REMOTE):
        pair.client.send_call("m", None)
    else:
        pair.client.send_call("m", None)
        pair.to_server()
        pair.server.send_result(1, "done")
        pair.to_client()
    pair.to_server()
    assert conn.call_state(1) is state
    return conn


def _apply(conn: Connection, event: CallInput) -> Any:
    """Apply ``event`` to call 1 of ``conn``, through the public API."""
    direction = S if event.value.startswith("send") else R
    stream = event in (CallInput.SEND_CALL_STREAM, CallInput.RECV_CALL_STREAM)
    if direction is S:
        return {
            CallInput.SEND_CALL: lambda: conn.send_call("m", None),
            CallInput.SEND_CALL_STREAM: lambda: conn.send_call("m", None, stream=True),
            CallInput.SEND_ITEM: lambda: conn.send_item(1, "x"),
            CallInput.SEND_END: lambda: conn.send_end(1),
            CallInput.SEND_FINISH: lambda: conn.send_result(1, "done"),
            CallInput.SEND_CANCEL: lambda: conn.send_cancel(1),
        }[event]()
    message: Message = {
        CallInput.RECV_CALL: Call(1, "m", raw(None), stream=stream),
        CallInput.RECV_CALL_STREAM: Call(1, "m", raw(None), stream=stream),
        CallInput.RECV_ITEM: Item(1, raw("x")),
        CallInput.RECV_END: End(1),
        CallInput.RECV_FINISH: Result(1, raw("done")),
        CallInput.RECV_CANCEL: Cancel(1),
    }[event]
    return conn.receive_data(frame(message))


# End is client-only, so only a client half-closes its own side, and only a
# server sees the other side half-close.
UNREACHABLE = {(Role.SERVER, CallState.HALF_CLOSED_LOCAL), (Role.CLIENT, CallState.HALF_CLOSED_REMOTE)}

CALL_CASES = [
    pytest.param(role, state, event, id=f"{role.value}-{state.name}-{event.name}")
    for role, state, event in itertools.product(Role, CallState, CallInput)
    if (role, state) not in UNREACHABLE
]


@pytest.mark.parametrize(("role", "state"), sorted(UNREACHABLE, key=str))
def test_unreachable_call_states(role: Role, state: CallState) -> None:
    # No input that this role can produce (per its connection table) leads there.
    table = CONNECTION_TRANSITIONS[role]
    for (old, event), new in CALL_TRANSITIONS.items():
        if new is state and old is not state:
            direction = S if event.value.startswith("send") else R
            assert (CS.OPEN, direction, CALL_INPUT_MESSAGE[event]) not in table


@pytest.mark.parametrize(("role", "state", "event"), CALL_CASES)
def test_every_call_input(role: Role, state: CallState, event: CallInput) -> None:
    conn = _call_in_state(role, state)
    conn.data_to_send()
    sending = event.value.startswith("send")
    error = LocalProtocolError if sending else RemoteProtocolError
    cls = CALL_INPUT_MESSAGE[event]
    role_may = (CS.OPEN, S if sending else R, cls) in CONNECTION_TRANSITIONS[role]
    opening = event in (CallInput.SEND_CALL, CallInput.SEND_CALL_STREAM)
    if opening and state is not CallState.IDLE:
        # send_call always opens a fresh id; it cannot address call 1 again.
        if role_may:
            assert conn.send_call("m", None) == 2
            assert conn.call_state(1) is state
        else:
            with pytest.raises(LocalProtocolError):
                _apply(conn, event)
        return
    new = CALL_TRANSITIONS.get((state, event))
    if not role_may:
        with pytest.raises(error):
            _apply(conn, event)
    elif state is CallState.CLOSED and event not in (CallInput.RECV_CALL, CallInput.RECV_CALL_STREAM):
        # Frames for a closed call crossed its end on the wire: dropped quietly.
        assert _apply(conn, event) in (False, [])
        assert conn.state is CS.OPEN
        assert conn.data_to_send() == b""
    elif new is None:
        with pytest.raises(error):
            _apply(conn, event)
        if sending:
            assert conn.call_state(1) is state
            assert conn.data_to_send() == b""
        else:
            assert conn.state is CS.CLOSED
    else:
        _apply(conn, event)
        assert conn.call_state(1) is new
        assert conn.state is CS.OPEN


# -- a random walk through legal use --------------------------------------------------

# The exhaustive tests above show each step alone; this drives both ends with
# random legal API calls and random delivery timing (so frames cross on the
# wire) and checks that a well-behaved peer is never blamed for anything and
# that, once the wire is empty, both ends agree on every call's state.

_AGREE = {
    CallState.OPEN: CallState.OPEN,
    CallState.HALF_CLOSED_LOCAL: CallState.HALF_CLOSED_REMOTE,
    CallState.CLOSED: CallState.CLOSED,
}


class LegalUse(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        limits = ProtocolLimits(window=2, max_inflight=3)
        self.pair = ConnectionPair(limits, limits)
        self.pair.handshake()
        self.ids: list[int] = []

    @property
    def client(self) -> Connection:
        return self.pair.client

    @property
    def server(self) -> Connection:
        return self.pair.server

    def _pick(self, data: st.DataObject) -> int:
        return data.draw(st.sampled_from(self.ids))

    @precondition(lambda self: self.client.state is CS.OPEN)
    @rule(stream=st.booleans())
    def start_call(self, stream: bool) -> None:
        self.ids.append(self.client.send_call("m", None, stream=stream))

    @precondition(lambda self: self.ids)
    @rule(data=st.data())
    def client_item(self, data: st.DataObject) -> None:
        call_id = self._pick(data)
        if self.client.call_state(call_id) is CallState.OPEN and self.client.send_credit(call_id):
            assert self.client.send_item(call_id, "c")

    @precondition(lambda self: self.ids)
    @rule(data=st.data())
    def client_end(self, data: st.DataObject) -> None:
        call_id = self._pick(data)
        if self.client.call_state(call_id) is CallState.OPEN:
            assert self.client.send_end(call_id)

    @precondition(lambda self: self.ids)
    @rule(data=st.data())
    def client_cancel(self, data: st.DataObject) -> None:
        call_id = self._pick(data)
        expected = self.client.call_state(call_id) is not CallState.CLOSED
        assert self.client.send_cancel(call_id) is expected

    @precondition(lambda self: self.ids)
    @rule(data=st.data(), server=st.booleans(), n=st.integers(1, 3))
    def grant(self, data: st.DataObject, server: bool, n: int) -> None:
        conn = self.server if server else self.client
        call_id = self._pick(data)
        if conn.call_state(call_id) is not CallState.IDLE:
            conn.grant(call_id, n)

    @precondition(lambda self: self.ids)
    @rule(data=st.data())
    def server_item(self, data: st.DataObject) -> None:
        call_id = self._pick(data)
        answering = self.server.call_state(call_id) in (CallState.OPEN, CallState.HALF_CLOSED_REMOTE)
        if answering and self.server.send_credit(call_id):
            assert self.server.send_item(call_id, "s")

    @precondition(lambda self: self.ids)
    @rule(data=st.data(), ok=st.booleans())
    def server_finish(self, data: st.DataObject, ok: bool) -> None:
        call_id = self._pick(data)
        if self.server.call_state(call_id) in (CallState.OPEN, CallState.HALF_CLOSED_REMOTE):
            if ok:
                assert self.server.send_result(call_id, "r")
            else:
                assert self.server.send_error(call_id, Status.ABORTED, "no")

    @rule(server=st.booleans())
    def ping(self, server: bool) -> None:
        (self.server if server else self.client).send_ping(1)

    @rule(server=st.booleans())
    def goaway(self, server: bool) -> None:
        (self.server if server else self.client).send_goaway()

    @rule()
    def deliver_to_server(self) -> None:
        self.pair.to_server()

    @rule()
    def deliver_to_client(self) -> None:
        self.pair.to_client()

    @invariant()
    def nobody_failed(self) -> None:
        assert self.client.state is not CS.CLOSED
        assert self.server.state is not CS.CLOSED

    @invariant()
    def quiet_wire_means_agreement(self) -> None:
        if self.client.pending_output or self.server.pending_output:
            return
        assert self.client.open_calls == self.server.open_calls
        for call_id in self.ids:
            assert _AGREE[self.client.call_state(call_id)] is self.server.call_state(call_id)


TestLegalUse = LegalUse.TestCase
TestLegalUse.settings = settings(max_examples=150, stateful_step_count=50, deadline=None)
