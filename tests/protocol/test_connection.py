"""bastion/protocol/connection.py: the sans-IO connection, end to end over bytes."""

from __future__ import annotations

import random

import msgspec
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from bastion.exceptions import LocalProtocolError, RemoteProtocolError
from bastion.protocol.connection import MAX_CREDIT, Connection, ProtocolLimits
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
from bastion.protocol.state import CallState, ConnectionState, Role
from bastion.status import Status
from tests.protocol.helpers import (
    ConnectionPair,
    decode_output,
    frame,
    hello_for,
    open_pair,
    raw,
    raw_frame,
    welcome_for,
)

FAST = settings(max_examples=50, deadline=None)
CS = ConnectionState


def value(message: Message) -> object:
    """The decoded payload of a Result or Item."""
    assert isinstance(message, Result | Item)
    return msgspec.msgpack.decode(message.value)


def assert_failed(conn: Connection, status: Status | None = None) -> GoAway:
    """``conn`` closed after a peer's protocol error, with a GoAway queued."""
    assert conn.state is CS.CLOSED
    assert conn.open_calls == 0
    *_, goaway = decode_output(conn.data_to_send(), conn.role)  # the GoAway comes last
    assert isinstance(goaway, GoAway)
    assert goaway.code != Status.OK
    if status is not None:
        assert goaway.code == status
    return goaway


# -- limits ------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs",
    [
        {"max_frame": 0},
        {"window": 0},
        {"max_inflight": -1},
        {"handshake_max_frame": 2048, "max_frame": 1024},
        {"max_frame": 2**32},
        {"window": 1.5},
    ],
)
def test_invalid_limits_rejected(kwargs: dict[str, object]) -> None:
    with pytest.raises(ValueError):
        ProtocolLimits(**kwargs)  # type: ignore[arg-type]


# -- handshake ---------------------------------------------------------------------


def test_handshake() -> None:
    pair = ConnectionPair()
    assert pair.client.state is CS.IDLE
    pair.client.send_hello(hello_for(pair.client.limits, client="me/1.0", token="t"))
    assert pair.client.state is CS.HANDSHAKE
    [hello] = pair.to_server()
    assert isinstance(hello, Hello)
    assert (hello.client, hello.token) == ("me/1.0", "t")
    assert pair.server.state is CS.HANDSHAKE
    pair.server.send_welcome(welcome_for(pair.server.limits, max_inflight=7, principal="alice"))
    assert pair.server.state is CS.OPEN
    [welcome] = pair.to_client()
    assert isinstance(welcome, Welcome)
    assert welcome.principal == "alice"
    assert pair.client.state is CS.OPEN
    assert pair.client.peer_max_inflight == 7


def test_no_call_before_welcome() -> None:
    pair = ConnectionPair()
    with pytest.raises(LocalProtocolError):
        pair.client.send_call("m", None)
    pair.client.send_hello(hello_for(pair.client.limits))
    with pytest.raises(LocalProtocolError):
        pair.client.send_call("m", None)
    assert pair.client.state is CS.HANDSHAKE


def test_pipelined_call_before_welcome_is_an_error() -> None:
    server = Connection(Role.SERVER)
    with pytest.raises(RemoteProtocolError):
        server.receive_data(frame(hello_for(server.limits), Call(1, "m", raw(None))))
    assert_failed(server)


def test_handshake_rejected() -> None:
    pair = ConnectionPair()
    pair.client.send_hello(hello_for(pair.client.limits))
    pair.to_server()
    pair.server.reject(Status.UNAUTHENTICATED, "bad token")
    assert pair.server.state is CS.CLOSED
    [goaway] = pair.to_client()
    assert goaway == GoAway(0, int(Status.UNAUTHENTICATED), "bad token")
    assert pair.client.state is CS.CLOSED
    assert pair.client.goaway == goaway


def test_send_goaway_during_handshake_rejects() -> None:
    pair = ConnectionPair()
    pair.client.send_hello(hello_for(pair.client.limits))
    pair.to_server()
    assert pair.server.send_goaway(Status.UNAVAILABLE, "busy") == 0
    [goaway] = pair.to_client()
    assert isinstance(goaway, GoAway)
    assert goaway.code == Status.UNAVAILABLE
    assert pair.client.state is CS.CLOSED


def test_server_rejects_old_protocol_version() -> None:
    server = Connection(Role.SERVER)
    with pytest.raises(RemoteProtocolError) as info:
        server.receive_data(frame(hello_for(server.limits, version=PROTOCOL_VERSION - 1)))
    assert info.value.status is Status.FAILED_PRECONDITION
    assert_failed(server, Status.FAILED_PRECONDITION)


def test_newer_client_version_is_accepted() -> None:
    # The server answers with the version it speaks; the client decides.
    server = Connection(Role.SERVER)
    [hello] = server.receive_data(frame(hello_for(server.limits, version=PROTOCOL_VERSION + 1)))
    assert isinstance(hello, Hello)
    assert server.state is CS.HANDSHAKE


@pytest.mark.parametrize("version", [PROTOCOL_VERSION - 1, PROTOCOL_VERSION + 1])
def test_welcome_with_other_version_rejected(version: int) -> None:
    pair = ConnectionPair()
    pair.client.send_hello(hello_for(pair.client.limits))
    pair.to_server()
    pair.server.send_welcome(welcome_for(pair.server.limits, version=version))
    with pytest.raises(RemoteProtocolError) as info:
        pair.to_client()
    assert info.value.status is Status.FAILED_PRECONDITION
    assert_failed(pair.client, Status.FAILED_PRECONDITION)


@pytest.mark.parametrize("overrides", [{"window": 0}, {"max_frame": 1023}, {"window": -5}])
def test_hello_with_bad_limits_rejected(overrides: dict[str, int]) -> None:
    server = Connection(Role.SERVER)
    with pytest.raises(RemoteProtocolError):
        server.receive_data(frame(hello_for(server.limits, **overrides)))
    assert_failed(server)


@pytest.mark.parametrize("overrides", [{"window": 0}, {"max_frame": 1023}, {"max_inflight": 0}])
def test_welcome_with_bad_limits_rejected(overrides: dict[str, int]) -> None:
    pair = ConnectionPair()
    pair.client.send_hello(hello_for(pair.client.limits))
    pair.to_server()
    pair.server.send_welcome(welcome_for(pair.server.limits, **overrides))
    with pytest.raises(RemoteProtocolError):
        pair.to_client()
    assert_failed(pair.client)


def test_handshake_frame_cap_before_welcome() -> None:
    limits = ProtocolLimits(handshake_max_frame=1024, max_frame=8192)
    server = Connection(Role.SERVER, limits)
    big_hello = frame(hello_for(limits, client="x" * 2000))
    with pytest.raises(RemoteProtocolError) as info:
        server.receive_data(big_hello[:4])  # the header alone is enough to refuse
    assert info.value.status is Status.RESOURCE_EXHAUSTED
    assert_failed(server, Status.RESOURCE_EXHAUSTED)


def test_max_frame_applies_after_welcome() -> None:
    limits = ProtocolLimits(handshake_max_frame=1024, max_frame=8192)
    pair = open_pair(server_limits=limits)
    pair.client.send_call("m", "x" * 2000)  # over the handshake cap, under max_frame
    [call] = pair.to_server()
    assert isinstance(call, Call)
    with pytest.raises(RemoteProtocolError) as info:
        pair.server.receive_data(frame(Call(2, "m", raw("x" * 9000)))[:4])
    assert info.value.status is Status.RESOURCE_EXHAUSTED


def test_client_sends_nothing_above_handshake_cap_before_welcome() -> None:
    client = Connection(Role.CLIENT, ProtocolLimits(handshake_max_frame=1024))
    with pytest.raises(LocalProtocolError):
        client.send_hello(hello_for(client.limits, metadata={"k": "v" * 2000}))
    # Nothing was sent and nothing changed: a smaller Hello still goes.
    assert client.state is CS.IDLE
    assert client.data_to_send() == b""
    client.send_hello(hello_for(client.limits))
    assert client.state is CS.HANDSHAKE


def test_writer_adopts_the_peer_max_frame() -> None:
    pair = ConnectionPair()
    pair.handshake(hello=hello_for(pair.client.limits, max_frame=2048))
    pair.client.send_call("m", None)
    pair.to_server()
    with pytest.raises(LocalProtocolError):
        pair.server.send_result(1, "x" * 4096)
    assert pair.server.call_state(1) is CallState.HALF_CLOSED_REMOTE
    assert pair.server.data_to_send() == b""
    # The call is still open: the server can say why instead.
    assert pair.server.send_error(1, Status.RESOURCE_EXHAUSTED, "result too large")
    [error] = pair.to_client()
    assert isinstance(error, Error)
    assert error.code == Status.RESOURCE_EXHAUSTED


def test_welcome_and_refusal_use_the_handshake_cap_not_hello_max_frame() -> None:
    # docs/protocol.md 2.1: the Hello's max_frame covers frames *after* the
    # Welcome; the Welcome and any refusal only have to fit the 16 KiB cap.
    for refuse in (False, True):
        pair = ConnectionPair()
        pair.client.send_hello(hello_for(pair.client.limits, max_frame=1024))
        pair.to_server()
        if refuse:
            pair.server.reject(Status.UNAUTHENTICATED, "x" * 3000)
            [goaway] = pair.to_client()
            assert isinstance(goaway, GoAway)
            continue
        pair.server.send_welcome(welcome_for(pair.server.limits, metadata={"k": "v" * 3000}))
        [welcome] = pair.to_client()
        assert isinstance(welcome, Welcome)
        pair.client.send_call("m", None)
        pair.to_server()
        with pytest.raises(LocalProtocolError):
            pair.server.send_result(1, "x" * 2000)


@pytest.mark.parametrize("window", [2**31, 2**40, 2**63 - 1])
def test_announced_windows_are_capped(window: int) -> None:
    pair = ConnectionPair()
    pair.handshake(
        hello=hello_for(pair.client.limits, window=window),
        welcome=welcome_for(pair.server.limits, window=window),
    )
    pair.client.send_call("m", None, stream=True)
    pair.to_server()
    assert pair.client.send_credit(1) == MAX_CREDIT
    assert pair.server.send_credit(1) == MAX_CREDIT


# -- calls ---------------------------------------------------------------------------


def test_call_fields_are_the_wire_order_send_call_encodes() -> None:
    """send_call encodes a tuple in Call's field order, not a Call: if Call changes, so must it."""
    assert Call.__struct_fields__ == ("id", "method", "args", "timeout_ms", "priority", "stream", "metadata")


@FAST
@given(
    method=st.text(min_size=1, max_size=40),
    args=st.dictionaries(st.text(max_size=8), st.integers(-(2**63), 2**63 - 1) | st.binary(max_size=16), max_size=3),
    timeout_ms=st.none() | st.integers(1, 2**31),
    priority=st.none() | st.integers(-10, 10),
    stream=st.booleans(),
    metadata=st.none() | st.dictionaries(st.text(max_size=8), st.text(max_size=8), max_size=2),
)
def test_send_call_puts_on_the_wire_exactly_the_call(
    method: str,
    args: dict[str, object],
    timeout_ms: int | None,
    priority: int | None,
    stream: bool,
    metadata: dict[str, str] | None,
) -> None:
    pair = open_pair()
    call_id = pair.client.send_call(method, args, timeout_ms, priority, stream, metadata)
    (sent,) = decode_output(pair.client.data_to_send(), Role.CLIENT)
    assert sent == Call(call_id, method, raw(args), timeout_ms, priority, stream, metadata)


@FAST
@given(value=st.none() | st.integers(-(2**63), 2**63 - 1) | st.binary(max_size=16) | st.text(max_size=16))
def test_send_result_puts_on_the_wire_exactly_the_result(value: object) -> None:
    """send_result writes a tuple in Result's field order, not a Result (as send_call, a Call)."""
    assert Result.__struct_fields__ == ("id", "value")
    pair = open_pair()
    call_id = pair.client.send_call("svc.method", {})
    pair.to_server()
    assert pair.server.send_result(call_id, value)
    (sent,) = decode_output(pair.server.data_to_send(), Role.SERVER)
    assert sent == Result(call_id, raw(value))


def test_a_result_that_cannot_be_encoded_is_named_and_leaves_the_call_open() -> None:
    pair = open_pair()
    call_id = pair.client.send_call("svc.method", {})
    pair.to_server()
    before = pair.server.call_state(call_id)
    with pytest.raises(LocalProtocolError, match="cannot encode Result"):
        pair.server.send_result(call_id, object())
    assert pair.server.call_state(call_id) is before  # still open: to be answered with an Error instead
    assert pair.server.send_error(call_id, Status.INTERNAL, "no")


def test_a_call_that_cannot_be_encoded_is_named_and_changes_nothing() -> None:
    pair = open_pair()
    with pytest.raises(LocalProtocolError, match="cannot encode Call"):
        pair.client.send_call("svc.method", {"x": object()})
    assert pair.client.open_calls == 0 and pair.client.data_to_send() == b""


def self_containing() -> list[object]:
    """A value msgspec cannot encode: it raises RecursionError partway through, bytes already written."""
    value: list[object] = [1, "two"]
    value.append(value)
    return value


def test_a_value_too_deep_to_encode_leaves_no_partial_frame_behind() -> None:
    """msgspec raises RecursionError (no TypeError or ValueError) for a value nested too deeply to
    encode, after writing part of it into the output buffer. Those bytes stayed there, behind a
    header never filled in: the next flush sent the peer a corrupt frame, killing the connection
    and every call on it. Now such a value is a LocalProtocolError, like any that cannot be
    encoded, and the buffer holds what it held before."""
    pair = open_pair()
    with pytest.raises(LocalProtocolError, match="cannot encode Call"):
        pair.client.send_call("svc.method", {"x": self_containing()})
    assert pair.client.open_calls == 0 and pair.client.data_to_send() == b""
    call_id = pair.client.send_call("svc.method", {})
    pair.to_server()
    with pytest.raises(LocalProtocolError, match="cannot encode Result"):
        pair.server.send_result(call_id, self_containing())
    with pytest.raises(LocalProtocolError, match="cannot encode Error"):
        pair.server.send_error(call_id, Status.INTERNAL, "no", details={"loop": self_containing()})
    assert pair.server.data_to_send() == b""
    assert pair.server.send_result(call_id, "fine")
    (sent,) = decode_output(pair.server.data_to_send(), Role.SERVER)
    assert sent == Result(call_id, raw("fine"))


def test_unary_call() -> None:
    pair = open_pair()
    call_id = pair.client.send_call("Echo.say", {"text": "hi"}, timeout_ms=500, metadata={"k": "v"})
    assert call_id == 1
    assert pair.client.call_state(1) is CallState.HALF_CLOSED_LOCAL
    [call] = pair.to_server()
    assert isinstance(call, Call)
    assert (call.id, call.method, call.timeout_ms, call.metadata) == (1, "Echo.say", 500, {"k": "v"})
    assert msgspec.msgpack.decode(call.args) == {"text": "hi"}
    assert pair.server.call_state(1) is CallState.HALF_CLOSED_REMOTE
    assert pair.server.send_result(1, {"text": "hi"})
    [result] = pair.to_client()
    assert value(result) == {"text": "hi"}
    assert pair.client.call_state(1) is CallState.CLOSED
    assert pair.server.call_state(1) is CallState.CLOSED
    assert pair.client.open_calls == pair.server.open_calls == 0


def test_error_answer_carries_details() -> None:
    pair = open_pair()
    pair.client.send_call("m", None)
    pair.to_server()
    pair.server.send_error(1, Status.UNAVAILABLE, "later", details={"why": [1]}, retry_after_ms=250)
    [error] = pair.to_client()
    assert error == Error(1, int(Status.UNAVAILABLE), "later", {"why": [1]}, 250)


def test_calls_answered_out_of_order() -> None:
    pair = open_pair()
    ids = [pair.client.send_call("m", i) for i in range(3)]
    assert ids == [1, 2, 3]
    assert len(pair.to_server()) == 3
    for call_id in (3, 1, 2):
        pair.server.send_result(call_id, call_id * 10)
    results = pair.to_client()
    assert [(r.id, value(r)) for r in results] == [(3, 30), (1, 10), (2, 20)]  # type: ignore[union-attr]
    assert pair.client.open_calls == 0


def test_300_concurrent_calls() -> None:
    pair = open_pair()
    ids = [pair.client.send_call("m", i) for i in range(300)]
    calls = pair.to_server()
    assert [c.id for c in calls] == ids  # type: ignore[union-attr]
    assert pair.server.open_calls == pair.client.open_calls == 300
    for call in reversed(calls):
        pair.server.send_result(call.id, msgspec.msgpack.decode(call.args))  # type: ignore[union-attr]
    results = pair.to_client()
    assert sorted((r.id, value(r)) for r in results) == [(i, i - 1) for i in ids]  # type: ignore[union-attr]
    assert pair.server.open_calls == pair.client.open_calls == 0


def test_max_inflight_refusal() -> None:
    pair = open_pair(server_limits=ProtocolLimits(max_inflight=2))
    for i in range(3):
        pair.client.send_call("m", i)
    calls = pair.to_server()
    assert [c.id for c in calls] == [1, 2]  # type: ignore[union-attr]
    assert pair.server.open_calls == 2
    assert pair.server.call_state(3) is CallState.CLOSED
    [refusal] = pair.to_client()
    assert isinstance(refusal, Error)
    assert (refusal.id, refusal.code) == (3, Status.RESOURCE_EXHAUSTED)
    assert pair.client.call_state(3) is CallState.CLOSED
    # Once a slot frees up, the next call goes through.
    pair.server.send_result(1, None)
    pair.to_client()
    pair.client.send_call("m", 4)
    [call] = pair.to_server()
    assert isinstance(call, Call) and call.id == 4


def test_frames_for_a_refused_call_are_dropped() -> None:
    pair = open_pair(server_limits=ProtocolLimits(max_inflight=1))
    pair.client.send_call("m", None)
    pair.client.send_call("m", None, stream=True)
    pair.to_server()
    assert pair.server.receive_data(frame(Item(2, raw(1)), End(2), Cancel(2))) == []
    assert pair.server.state is CS.OPEN


@pytest.mark.parametrize("second", [1, 0, -1])
def test_call_ids_must_strictly_increase(second: int) -> None:
    pair = open_pair()
    pair.server.receive_data(frame(Call(1, "m", raw(None))))
    with pytest.raises(RemoteProtocolError):
        pair.server.receive_data(frame(Call(second, "m", raw(None))))
    goaway = assert_failed(pair.server)
    assert goaway.last_id == 1


def test_call_ids_may_skip() -> None:
    pair = open_pair()
    [call] = pair.server.receive_data(frame(Call(10, "m", raw(None))))
    assert isinstance(call, Call)
    with pytest.raises(RemoteProtocolError):
        pair.server.receive_data(frame(Call(5, "m", raw(None))))


def test_the_largest_call_id_is_2_63_minus_1() -> None:
    pair = open_pair()
    [call] = pair.server.receive_data(frame(Call(2**63 - 1, "m", raw(None))))
    assert isinstance(call, Call)


@pytest.mark.parametrize("call_id", [2**63, 2**64 - 1])
def test_a_call_id_past_2_63_minus_1_is_a_protocol_error(call_id: int) -> None:
    """Ids are at most 2**63-1 (section 6.1): the server took any uint64 and answered it, so its Result carried an
    id a peer holding ids as signed 64-bit integers cannot read."""
    pair = open_pair()
    with pytest.raises(RemoteProtocolError, match="2\\*\\*63"):
        pair.server.receive_data(frame(Call(call_id, "m", raw(None))))
    goaway = assert_failed(pair.server)
    assert goaway.last_id == 0


# -- closed and never-opened calls ---------------------------------------------------


def test_frames_for_a_cancelled_call_are_dropped() -> None:
    pair = open_pair()
    pair.client.send_call("m", None, stream=True)
    pair.to_server()
    assert pair.client.send_cancel(1)
    assert pair.client.call_state(1) is CallState.CLOSED
    # The server answers before it sees the Cancel: the answers cross it.
    pair.server.send_item(1, "late")
    pair.server.grant(1, 5)
    pair.server.send_result(1, "late")
    assert pair.to_client() == []
    assert pair.client.state is CS.OPEN
    # The server's side finished with its Result: the Cancel is dropped too.
    assert pair.to_server() == []
    assert pair.server.state is CS.OPEN
    assert pair.server.call_state(1) is CallState.CLOSED


def test_frames_after_cancel_reach_nobody() -> None:
    pair = open_pair()
    pair.client.send_call("m", None, stream=True)
    pair.client.send_cancel(1)
    assert len(pair.to_server()) == 2
    # Frames the client sent before it cancelled, arriving late, and a second Cancel.
    assert pair.server.receive_data(frame(Item(1, raw(1)), End(1), Credit(1, 1), Cancel(1))) == []
    assert pair.server.state is CS.OPEN
    assert pair.server.data_to_send() == b""
    assert not pair.server.send_result(1, None)
    assert not pair.server.send_item(1, None)
    assert not pair.server.grant(1, 1)
    assert not pair.client.send_cancel(1)


@pytest.mark.parametrize(
    "message",
    [Item(5, raw(1)), End(5), Cancel(5), Credit(5, 1), Credit(0, 1), Credit(-1, 1), Item(0, raw(1))],
)
def test_server_frames_for_never_opened_calls_are_errors(message: Message) -> None:
    pair = open_pair()
    pair.client.send_call("m", None, stream=True)
    pair.to_server()
    with pytest.raises(RemoteProtocolError):
        pair.server.receive_data(frame(message))
    assert_failed(pair.server)


@pytest.mark.parametrize("message", [Result(2, raw(1)), Error(2, 1, ""), Item(2, raw(1)), Credit(2, 1), Credit(0, 1)])
def test_client_frames_for_never_opened_calls_are_errors(message: Message) -> None:
    pair = open_pair()
    pair.client.send_call("m", None, stream=True)
    pair.to_server()
    with pytest.raises(RemoteProtocolError):
        pair.client.receive_data(frame(message))
    assert_failed(pair.client)


def test_local_calls_on_never_opened_ids_are_errors() -> None:
    pair = open_pair()
    for misuse in (
        lambda: pair.client.send_cancel(1),
        lambda: pair.client.send_end(1),
        lambda: pair.client.send_item(1, None),
        lambda: pair.client.grant(1, 1),
        lambda: pair.server.send_result(1, None),
        lambda: pair.server.send_error(1, Status.INTERNAL, ""),
    ):
        with pytest.raises(LocalProtocolError):
            misuse()


def test_wrong_role_send_leaves_the_call_alone() -> None:
    pair = open_pair()
    pair.client.send_call("m", None, stream=True)
    pair.to_server()
    with pytest.raises(LocalProtocolError):
        pair.client.send_result(1, None)
    with pytest.raises(LocalProtocolError):
        pair.server.send_cancel(1)
    with pytest.raises(LocalProtocolError):
        pair.server.send_end(1)
    assert pair.client.call_state(1) is pair.server.call_state(1) is CallState.OPEN
    assert pair.client.data_to_send() == pair.server.data_to_send() == b""


# -- streams and credit ---------------------------------------------------------------


def streaming_pair(window: int = 4) -> ConnectionPair:
    limits = ProtocolLimits(window=window)
    pair = ConnectionPair(limits, limits)
    pair.handshake()
    pair.client.send_call("upload", None, stream=True)
    pair.to_server()
    return pair


def test_client_stream_within_the_window() -> None:
    pair = streaming_pair(window=4)
    assert pair.client.send_credit(1) == 4
    for i in range(4):
        assert pair.client.send_item(1, i)
    assert pair.client.send_credit(1) == 0
    pair.client.send_end(1)
    events = pair.to_server()
    assert [value(e) for e in events[:4]] == [0, 1, 2, 3]
    assert events[4] == End(1)
    assert pair.server.call_state(1) is CallState.HALF_CLOSED_REMOTE
    pair.server.send_result(1, "ok")
    [result] = pair.to_client()
    assert value(result) == "ok"


def test_send_item_without_credit_is_a_local_error() -> None:
    pair = streaming_pair(window=2)
    pair.client.send_item(1, 0)
    pair.client.send_item(1, 1)
    before = pair.client.pending_output
    with pytest.raises(LocalProtocolError):
        pair.client.send_item(1, 2)
    assert pair.client.pending_output == before


def test_items_beyond_the_window_are_a_remote_error() -> None:
    pair = streaming_pair(window=2)
    pair.server.receive_data(frame(Item(1, raw(0)), Item(1, raw(1))))
    with pytest.raises(RemoteProtocolError) as info:
        pair.server.receive_data(frame(Item(1, raw(2))))
    assert info.value.status is Status.RESOURCE_EXHAUSTED
    assert_failed(pair.server, Status.RESOURCE_EXHAUSTED)


def test_grant_restores_credit() -> None:
    pair = streaming_pair(window=2)
    pair.client.send_item(1, 0)
    pair.client.send_item(1, 1)
    pair.to_server()
    assert pair.server.grant(1, 3)
    [credit] = pair.to_client()
    assert credit == Credit(1, 3)
    assert pair.client.send_credit(1) == 3
    for i in range(3):
        pair.client.send_item(1, i)
    assert len(pair.to_server()) == 3
    with pytest.raises(LocalProtocolError):
        pair.client.send_item(1, 99)


def test_grant_never_raises_the_peer_credit_above_the_cap() -> None:
    pair = streaming_pair(window=4)
    assert pair.server.grant(1, MAX_CREDIT)
    assert not pair.server.grant(1, 1)  # nothing left to grant
    [credit] = pair.to_client()
    assert credit == Credit(1, MAX_CREDIT - 4)
    assert pair.client.send_credit(1) == MAX_CREDIT


def test_grant_of_nothing_is_refused() -> None:
    pair = streaming_pair()
    assert not pair.server.grant(1, 0)
    assert not pair.server.grant(1, -1)
    assert pair.server.data_to_send() == b""


@pytest.mark.parametrize("n", [0, -3])
def test_non_positive_credit_is_a_remote_error(n: int) -> None:
    pair = streaming_pair()
    with pytest.raises(RemoteProtocolError):
        pair.client.receive_data(frame(Credit(1, n)))
    assert_failed(pair.client)


def test_credit_is_capped() -> None:
    pair = streaming_pair()
    pair.client.receive_data(frame(Credit(1, MAX_CREDIT), Credit(1, 2**62)))
    assert pair.client.send_credit(1) == MAX_CREDIT


def test_server_streams_results() -> None:
    pair = streaming_pair(window=3)
    pair.client.send_end(1)
    pair.to_server()
    for i in range(3):
        pair.server.send_item(1, i)
    with pytest.raises(LocalProtocolError):
        pair.server.send_item(1, 3)
    assert [value(e) for e in pair.to_client()] == [0, 1, 2]
    pair.client.grant(1, 1)
    pair.to_server()
    pair.server.send_item(1, 3)
    pair.server.send_result(1, "done")
    events = pair.to_client()
    assert [value(e) for e in events] == [3, "done"]
    assert pair.client.call_state(1) is CallState.CLOSED


def test_unary_call_accepts_no_items() -> None:
    pair = open_pair()
    pair.client.send_call("m", None)
    pair.to_server()
    with pytest.raises(LocalProtocolError):
        pair.client.send_item(1, "x")
    with pytest.raises(RemoteProtocolError):
        pair.server.receive_data(frame(Item(1, raw("x"))))
    assert_failed(pair.server)


def test_server_may_answer_before_the_upload_ends() -> None:
    pair = streaming_pair()
    pair.client.send_item(1, 0)
    pair.to_server()
    pair.server.send_error(1, Status.INVALID_ARGUMENT, "bad item")
    pair.client.send_item(1, 1)  # crosses the Error on the wire
    [error] = pair.to_client()
    assert isinstance(error, Error)
    assert pair.to_server() == []  # the late item is dropped
    assert pair.server.state is CS.OPEN


# -- ping -----------------------------------------------------------------------------


@pytest.mark.parametrize("sender", [Role.CLIENT, Role.SERVER])
def test_ping_is_answered_automatically(sender: Role) -> None:
    pair = open_pair()
    pinger = pair.client if sender is Role.CLIENT else pair.server
    pinger.send_ping(12345)
    client_events, server_events = pair.shuttle()
    pinger_events, ponger_events = (
        (client_events, server_events) if sender is Role.CLIENT else (server_events, client_events)
    )
    assert ponger_events == [Ping(12345)]
    assert pinger_events == [Pong(12345)]
    ponger = pair.server if sender is Role.CLIENT else pair.client
    assert (ponger.pings_received, pinger.pings_received) == (1, 0)  # a transport's flood check counts them


def test_ping_before_handshake_is_an_error() -> None:
    server = Connection(Role.SERVER)
    with pytest.raises(RemoteProtocolError):
        server.receive_data(frame(Ping(1)))
    assert_failed(server)


# -- goaway ---------------------------------------------------------------------------


def test_server_goaway_drains() -> None:
    pair = open_pair()
    pair.client.send_call("m", 1)
    pair.client.send_call("m", 2)
    pair.to_server()
    assert pair.server.send_goaway(Status.UNAVAILABLE, "restarting") == 2
    assert pair.server.state is CS.DRAINING
    assert pair.server.last_id == 2
    # Call 3 was sent before the client saw the GoAway.
    pair.client.send_call("m", 3, stream=True)
    [goaway] = pair.to_client()
    assert goaway == GoAway(2, int(Status.UNAVAILABLE), "restarting")
    assert pair.client.state is CS.DRAINING
    assert pair.client.last_id == 2
    assert pair.client.call_state(3) is CallState.CLOSED  # never started: safe to retry
    assert pair.client.call_state(1) is CallState.HALF_CLOSED_LOCAL
    assert pair.to_server() == []  # call 3 dropped, unanswered
    assert pair.server.open_calls == 2
    assert pair.server.data_to_send() == b""
    assert pair.server.receive_data(frame(Item(3, raw(0)))) == []
    with pytest.raises(LocalProtocolError):
        pair.client.send_call("m", 4)
    # Calls at or below last_id still finish.
    pair.server.send_result(1, "a")
    pair.server.send_result(2, "b")
    assert [value(r) for r in pair.to_client()] == ["a", "b"]


def test_second_server_goaway_keeps_last_id() -> None:
    pair = open_pair()
    pair.client.send_call("m", None)
    pair.to_server()
    assert pair.server.send_goaway() == 1
    pair.client.send_call("m", None)  # crosses the GoAway; dropped
    pair.to_server()
    assert pair.server.send_goaway(Status.UNAVAILABLE, "now") == 1
    goaways = pair.to_client()
    assert [g.last_id for g in goaways] == [1, 1]  # type: ignore[union-attr]
    assert pair.client.last_id == 1


def test_client_keeps_the_smallest_last_id() -> None:
    pair = open_pair()
    for _ in range(5):
        pair.client.send_call("m", None)
    pair.to_server()
    pair.client.receive_data(frame(GoAway(2, 0, ""), GoAway(4, 0, "")))
    assert pair.client.last_id == 2
    assert [pair.client.call_state(i) for i in range(1, 6)] == [CallState.HALF_CLOSED_LOCAL] * 2 + [
        CallState.CLOSED
    ] * 3


def test_unmatched_pong_is_harmless() -> None:
    pair = open_pair()
    assert pair.client.receive_data(frame(Pong(99))) == [Pong(99)]
    assert pair.client.state is CS.OPEN


def test_client_goaway() -> None:
    pair = open_pair()
    pair.client.send_call("m", None)
    pair.client.send_goaway()
    assert pair.client.state is CS.DRAINING
    call, goaway = pair.to_server()
    assert isinstance(call, Call) and isinstance(goaway, GoAway)
    assert pair.server.state is CS.DRAINING
    assert pair.server.goaway == goaway
    pair.server.send_result(1, "ok")
    [result] = pair.to_client()
    assert isinstance(result, Result)


def test_goaway_before_handshake_just_closes() -> None:
    client = Connection(Role.CLIENT)
    client.send_goaway()
    assert client.state is CS.CLOSED
    assert client.data_to_send() == b""


# -- protocol errors and junk ---------------------------------------------------------


def test_remote_error_queues_goaway_and_closes() -> None:
    pair = open_pair()
    pair.client.send_call("m", None)
    pair.to_server()
    with pytest.raises(RemoteProtocolError) as info:
        pair.server.receive_data(raw_frame(b"\xc1"))
    goaway = assert_failed(pair.server, info.value.status)
    assert goaway.last_id == 1
    assert goaway.message
    # After the end, input is ignored and sending is refused.
    assert pair.server.receive_data(frame(Ping(1))) == []
    with pytest.raises(LocalProtocolError):
        pair.server.send_ping(1)
    assert not pair.server.send_result(1, None)
    # The client learns why.
    [received] = pair.client.receive_data(frame(goaway))
    assert received == goaway
    assert pair.client.state is CS.DRAINING


def test_messages_after_a_bad_one_in_the_same_read_are_not_surfaced() -> None:
    pair = open_pair()
    with pytest.raises(RemoteProtocolError):
        pair.server.receive_data(frame(Ping(1), End(9), Ping(2)))
    pong, goaway = decode_output(pair.server.data_to_send(), Role.SERVER)
    assert pong == Pong(1)  # answered before the bad frame; Ping(2) never was
    assert isinstance(goaway, GoAway)


def test_goaway_fits_a_tiny_handshake_cap() -> None:
    # The server's own cap bounds what it sends before Hello; the failure
    # GoAway must still go out (without its reason) rather than raise locally.
    server = Connection(Role.SERVER, ProtocolLimits(handshake_max_frame=16))
    with pytest.raises(RemoteProtocolError):
        server.receive_data(raw_frame(b"\xc1"))
    goaway = assert_failed(server)
    assert goaway.message == ""


def nested(depth: int) -> bytes:
    """A MessagePack value ``depth`` arrays deep."""
    return b"\x91" * (depth - 1) + b"\x90"


def test_values_nested_100_deep_are_accepted() -> None:
    # docs/protocol.md 3.2: at least 100 levels, counting the message array.
    pair = open_pair()
    [call] = pair.server.receive_data(raw_frame(b"\x94\x03\x01\xa1m" + nested(99)))
    assert isinstance(call, Call)
    pair.client.send_call("m", None)
    body = b"\x95\x05\x01\x02\xa4deep\x81\xa1k" + nested(98)
    [error] = pair.client.receive_data(raw_frame(body))
    assert isinstance(error, Error)


@pytest.mark.parametrize("role", list(Role))
def test_values_nested_very_deep_are_a_protocol_error(role: Role) -> None:
    pair = open_pair()
    if role is Role.SERVER:
        conn, body = pair.server, b"\x94\x03\x01\xa1m" + nested(50_000)
    else:
        pair.client.send_call("m", None)
        conn, body = pair.client, b"\x95\x05\x01\x02\xa0\x81\xa1k" + nested(50_000)
    with pytest.raises(RemoteProtocolError):
        conn.receive_data(raw_frame(body))
    assert_failed(conn)


def test_eof_closes() -> None:
    pair = open_pair()
    pair.client.send_call("m", None)
    pair.client.receive_eof()
    assert pair.client.state is CS.CLOSED
    assert pair.client.open_calls == 0
    assert pair.client.call_state(1) is CallState.CLOSED


def feed_junk(conn: Connection, data: bytes, chunk: int) -> None:
    try:
        for i in range(0, len(data), chunk):
            conn.receive_data(data[i : i + chunk])
    except RemoteProtocolError:
        assert conn.state is CS.CLOSED


@pytest.mark.parametrize("role", list(Role))
@pytest.mark.parametrize("opened", [False, True])
def test_one_megabyte_of_random_bytes(role: Role, opened: bool) -> None:
    rng = random.Random(f"{role}-{opened}")
    for _ in range(4):
        pair = open_pair() if opened else ConnectionPair()
        conn = pair.client if role is Role.CLIENT else pair.server
        feed_junk(conn, rng.randbytes(1 << 20), rng.choice([1, 7, 4096, 1 << 20]))


@pytest.mark.parametrize("role", list(Role))
def test_random_frames_with_valid_lengths(role: Role) -> None:
    # Junk bodies behind sane lengths get past the length check to the decoder.
    rng = random.Random(str(role))
    for _ in range(300):
        pair = open_pair()
        conn = pair.client if role is Role.CLIENT else pair.server
        body = bytes([rng.choice([0x91, 0x92, 0x93, 0x94, 0x95])]) + rng.randbytes(rng.randint(0, 40))
        feed_junk(conn, raw_frame(body) * 3, 64)


@FAST
@given(role=st.sampled_from(list(Role)), opened=st.booleans(), junk=st.binary(max_size=2000))
def test_junk_only_raises_remote_protocol_error(role: Role, opened: bool, junk: bytes) -> None:
    pair = open_pair() if opened else ConnectionPair()
    conn = pair.client if role is Role.CLIENT else pair.server
    feed_junk(conn, junk, 97)


junk_fields = st.integers(-(2**63), 2**64 - 1) | st.text(max_size=8) | st.none()


@FAST
@given(
    role=st.sampled_from(list(Role)),
    frames=st.lists(
        st.tuples(st.integers(0, 15), st.lists(st.integers(-(2**63), 2**64 - 1) | st.text(max_size=8) | st.none())),
        max_size=8,
    ),
)
def test_well_formed_frames_of_random_messages(role: Role, frames: list[tuple[int, list[object]]]) -> None:
    # MessagePack that decodes, with plausible type codes and junk fields.
    pair = open_pair()
    conn = pair.client if role is Role.CLIENT else pair.server
    data = b"".join(raw_frame(msgspec.msgpack.encode([code, *fields])) for code, fields in frames)
    feed_junk(conn, data, 13)
