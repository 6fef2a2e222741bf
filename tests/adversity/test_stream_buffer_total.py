"""Client-stream items buffered on all connections together are bounded (limits.max_stream_buffer_total).

``max_stream_buffer`` bounds one connection; many connections each under it could together hold
``max_connections x max_stream_buffer`` bytes (64 MiB x 10,000). Past the server-wide total the
server stops reading from a connection that holds more than its share (``max_stream_buffer_total
/ max_connections``) until its handlers take items or the total falls again: flow control, so no
connection is closed and no item of an accepted call is lost, and a connection whose handlers keep
taking its items keeps going while others' items sit unread.
"""

from __future__ import annotations

import contextlib
import socket
import struct
import threading
from collections.abc import Callable
from typing import Any

from bastion import SyncClient
from tests.support.raw import CALL, GOAWAY, RESULT, RawPeer, frame
from tests.support.server import ServerProcess, wait_for

ITEM, CREDIT = 7, 9
KIB = 1 << 10
MIB = 1 << 20
ITEM_BYTES = 250 * KIB  # an Item frame that fits max_frame below
TOTAL = 4 * MIB
LIMITS = {
    "BASTION_LIMITS__MAX_FRAME": str(512 * KIB),
    "BASTION_JOBS__MAX_RESULT_BYTES": str(256 * KIB),  # what one answer carries must fit the frame (config.py)
    "BASTION_KV__MAX_VALUE_BYTES": str(256 * KIB),
    "BASTION_LIMITS__WINDOW": "4",
    "BASTION_LIMITS__MAX_STREAM_BUFFER": str(4 * MIB),
    "BASTION_LIMITS__MAX_STREAM_BUFFER_TOTAL": str(TOTAL),
    "BASTION_LIMITS__MAX_CONNECTIONS": "16",  # each connection's share: 4 MiB / 16 = 256 KiB
}
SHARE = TOTAL // 16
#: What a connection may add past the total: its share, then what one read brings (at most 256 KiB
#: read, plus the rest of a frame begun in the read before).
SLACK = SHARE + 2 * 256 * KIB


def stats(server: ServerProcess) -> dict[str, Any]:
    with SyncClient(server.address, token_file=str(server.token_file), timeout=10, insecure=True) as admin:
        result: dict[str, Any] = admin.call("admin.stats")
        return result


class Sender(threading.Thread):
    """One connection: ``calls`` calls of demo.take(hold), each sent its window of 4 items of
    ITEM_BYTES (3 MiB for 3 calls: under the connection's own 4 MiB), then their answers read."""

    def __init__(self, server: ServerProcess, calls: int, hold: float) -> None:
        super().__init__(daemon=True)
        self.peer = RawPeer(server.host, server.port, timeout=60)
        self.peer.hello(server.token)
        self.calls, self.hold = calls, hold
        self.answers: dict[int, Any] = {}
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            ids = range(1, 2 * self.calls, 2)
            for call_id in ids:
                args = {"hold": self.hold}
                data = frame([CALL, call_id, "demo.take", args, None, None, True])
                data += b"".join(frame([ITEM, call_id, bytes(ITEM_BYTES)]) for _ in range(4))
                self.peer.send(data)  # blocks while the server does not read: flow control
            for call_id in ids:
                self.peer.send(frame([8, call_id]))  # End
            while len(self.answers) < self.calls:
                message = self.peer.read_message(timeout=60)
                if message[0] == GOAWAY:
                    raise AssertionError(f"GoAway: {message}")
                if message[0] != CREDIT:
                    self.answers[message[1]] = message
        except BaseException as exc:
            self.error = exc


def test_many_connections_under_their_own_limit_are_held_to_the_total_and_lose_nothing(
    server_factory: Callable[..., ServerProcess],
) -> None:
    server = server_factory(insecure=True, env=LIMITS)
    # 6 connections x 3 MiB = 18 MiB offered, each connection under its own 4 MiB.
    senders = [Sender(server, calls=3, hold=2.0) for _ in range(6)]
    try:
        for sender in senders:
            sender.start()
        wait_for(lambda: stats(server)["stream_buffer_bytes"] > TOTAL, 10, what="the total to be reached")
        # While no handler reads (hold), what the server holds stays near the total.
        peak = max(stats(server)["stream_buffer_bytes"] for _ in range(20))
        assert peak <= TOTAL + 6 * SLACK, f"{peak / MIB:.1f} MiB buffered past a total of {TOTAL / MIB} MiB"
        for sender in senders:
            sender.join(timeout=60)
            assert sender.error is None, sender.error
            # Every item of every accepted call reached its handler.
            assert sorted(sender.answers) == [1, 3, 5]
            for message in sender.answers.values():
                assert message[0] == RESULT and message[2] == 4 * ITEM_BYTES, message
        after = stats(server)
        assert after["closed_abuse"] == 0
        assert after["stream_buffer_paused"] >= 1
        assert after["stream_buffer_bytes"] == 0
    finally:
        for sender in senders:
            sender.peer.close()


def test_a_connection_whose_handler_reads_keeps_going_while_others_hold_the_total(
    server_factory: Callable[..., ServerProcess],
) -> None:
    server = server_factory(insecure=True, env=LIMITS)
    # 2 connections hold 6 MiB (past the 4 MiB total) in calls whose handlers will not read for a minute.
    pinners = [Sender(server, calls=3, hold=60.0) for _ in range(2)]
    try:
        for pinner in pinners:
            pinner.start()
        wait_for(lambda: stats(server)["stream_buffer_bytes"] > TOTAL, 10, what="the total to be reached")
        # Another client uploads 10 MiB, more than the whole total, to a handler that reads: it is
        # paused only while it holds more than its share, and goes on as its handler takes items.
        with SyncClient(server.address, token_file=str(server.token_file), timeout=30, insecure=True) as client:
            chunks = (bytes(ITEM_BYTES) for _ in range(40))
            assert client.upload("demo.take", chunks) == 40 * ITEM_BYTES
            assert client.call("demo.echo", value="still served") == "still served"
            held = client.call("admin.stats")["stream_buffer_bytes"]
        assert held > TOTAL - SHARE, held  # the pinned items are still there, unread and not lost
        assert all(pinner.error is None for pinner in pinners)
        for pinner in pinners:
            assert not pinner.answers
    finally:
        for pinner in pinners:
            with contextlib.suppress(OSError):
                pinner.peer.close()


def test_a_paused_connection_whose_peer_is_gone_is_noticed_and_its_items_freed(
    server_factory: Callable[..., ServerProcess],
) -> None:
    # A paused connection is not read, so its peer's close is not seen there: keepalive Pings
    # written to it find the peer gone. With a 0.5 s ping interval that takes a second or two.
    server = server_factory(insecure=True, env={**LIMITS, "BASTION_LIMITS__PING_INTERVAL": "0.5"})
    holder = Sender(server, calls=3, hold=60.0)  # stays, holding 3 MiB: the total stays reached
    holder.start()
    wait_for(lambda: stats(server)["stream_buffer_bytes"] >= 12 * ITEM_BYTES, 10, what="the holder's items")
    gone = [Sender(server, calls=3, hold=60.0) for _ in range(2)]
    try:
        for sender in gone:
            sender.start()
        wait_for(lambda: stats(server)["stream_buffer_paused"] == 2, 10, what="both to be paused")
        for sender in gone:
            sender.peer.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            sender.peer.close()  # a reset, unseen while the server does not read
        wait_for(lambda: stats(server)["connections"] == 2, 15, what="the gone peers' connections to close")
        assert stats(server)["stream_buffer_bytes"] < 13 * ITEM_BYTES  # the holder's alone
        assert holder.is_alive() and holder.error is None
    finally:
        holder.peer.close()
