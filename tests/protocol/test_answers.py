"""Results as a client receives them: ``receive_data``'s inline path for the usual answer.

A client gets one Result per call, so ``Connection.receive_data`` closes the
call of a Result itself when the connection's state allows it unchanged and
the call may be finished; anything else goes through ``_receive`` as before.
These tests pin the cases either way, in one read and across state changes.
"""

from __future__ import annotations

import pytest

from bastion.exceptions import RemoteProtocolError
from bastion.protocol.messages import GoAway, Item, Result
from bastion.protocol.state import CallState, ConnectionState
from bastion.status import Status
from tests.protocol.helpers import frame, open_pair, raw


def test_many_results_in_one_read_close_their_calls_in_order() -> None:
    pair = open_pair()
    ids = [pair.client.send_call("m", None) for _ in range(20)]
    pair.to_server()
    data = frame(*(Result(i, raw(i * 10)) for i in reversed(ids)))
    events = pair.client.receive_data(data)
    assert [(e.id, e.value) for e in events] == [(i, raw(i * 10)) for i in reversed(ids)]  # type: ignore[union-attr]
    assert pair.client.open_calls == 0
    assert all(pair.client.call_state(i) is CallState.CLOSED for i in ids)


def test_a_result_for_a_streaming_call_closes_it_too() -> None:
    pair = open_pair()
    call_id = pair.client.send_call("m", None, stream=True)
    pair.to_server()
    events = pair.client.receive_data(frame(Item(call_id, raw(1)), Result(call_id, raw("done"))))
    assert [type(e) for e in events] == [Item, Result]
    assert pair.client.open_calls == 0


def test_a_result_after_a_cancel_crossed_it_is_dropped() -> None:
    pair = open_pair()
    first, second = pair.client.send_call("m", None), pair.client.send_call("m", None)
    assert pair.client.send_cancel(first)
    events = pair.client.receive_data(frame(Result(first, raw(1)), Result(second, raw(2))))
    assert [e.id for e in events] == [second]  # type: ignore[union-attr]
    assert pair.client.open_calls == 0


def test_a_result_for_a_call_never_started_is_the_servers_error() -> None:
    pair = open_pair()
    pair.client.send_call("m", None)
    with pytest.raises(RemoteProtocolError, match="call 7 was never started"):
        pair.client.receive_data(frame(Result(7, raw(None))))
    assert pair.client.state is ConnectionState.CLOSED


def test_results_after_a_goaway_in_the_same_read_still_finish_their_calls() -> None:
    pair = open_pair()
    ids = [pair.client.send_call("m", None) for _ in range(3)]
    pair.to_server()
    data = frame(Result(ids[0], raw(0)), GoAway(ids[1], int(Status.UNAVAILABLE), "draining"), Result(ids[1], raw(1)))
    events = pair.client.receive_data(data)
    assert [type(e) for e in events] == [Result, GoAway, Result]
    assert pair.client.state is ConnectionState.DRAINING
    assert pair.client.open_calls == 0  # ids[2] is above last_id: it never started


def test_a_server_receiving_a_result_fails_the_connection() -> None:
    pair = open_pair()
    call_id = pair.client.send_call("m", None)
    pair.to_server()
    with pytest.raises(RemoteProtocolError, match="malformed frame"):  # not even a message a server decodes
        pair.server.receive_data(frame(Result(call_id, raw(None))))
    assert pair.server.state is ConnectionState.CLOSED


def test_a_result_on_a_closed_connection_is_ignored() -> None:
    pair = open_pair()
    call_id = pair.client.send_call("m", None)
    pair.client.close()
    assert pair.client.receive_data(frame(Result(call_id, raw(None)))) == []
