"""Client-stream items buffered on one connection are bounded in bytes (limits.max_stream_buffer).

The stream window counts items per call, not bytes: calls whose handlers do not read yet (queued
for a scheduler slot, or busy) each accept ``window`` items of up to ``max_frame`` bytes, so one
connection could make the server hold ``max_inflight x window x max_frame`` bytes. Past
``max_stream_buffer`` bytes of items received and not yet taken by their handlers the server
closes the connection with GoAway(RESOURCE_EXHAUSTED).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from typing import Any

from bastion import SyncClient
from bastion.status import Status
from tests.support.raw import CALL, ERROR, GOAWAY, RESULT, RawPeer, frame
from tests.support.server import ServerProcess, read_rss_kib, wait_for

ITEM, END, CANCEL, CREDIT = 7, 8, 6, 9
MIB = 1 << 20
ITEM_BYTES = MIB - 64  # an Item frame of the largest value that fits max_frame (1 MiB)


def call(call_id: int, **args: Any) -> bytes:
    return frame([CALL, call_id, "demo.take", args, None, None, True])


def items(call_id: int, n: int, size: int) -> bytes:
    return b"".join(frame([ITEM, call_id, bytes(size)]) for _ in range(n))


def answer(peer: RawPeer) -> Any:
    """The next message that is no Credit (the server grants credit as handlers take items)."""
    while (message := peer.read_message())[0] == CREDIT:
        pass
    return message


def buffered(server: ServerProcess) -> int:
    with SyncClient(server.address, token_file=str(server.token_file), timeout=10, insecure=True) as admin:
        value: int = admin.call("admin.stats")["stream_buffer_bytes"]
        return value


def test_items_that_no_handler_takes_close_the_connection_past_the_limit(
    server_factory: Callable[..., ServerProcess],
) -> None:
    server = server_factory(insecure=True)  # limits.max_stream_buffer: 64 MiB by default
    before = read_rss_kib(server.pid)
    with RawPeer(server.host, server.port, timeout=30) as peer:
        peer.hello(server.token)
        # 6 calls whose handlers will not read for a minute, each sent its window of 16 items of
        # 1 MiB: 96 MiB, all within the protocol's credit.
        with contextlib.suppress(OSError):  # the server may close while we still send
            for call_id in range(1, 13, 2):
                peer.send(call(call_id, hold=60) + items(call_id, 16, ITEM_BYTES))
        try:
            while (message := peer.read_message(timeout=10))[0] != GOAWAY:
                pass
        except (TimeoutError, ConnectionResetError) as exc:
            grown = (read_rss_kib(server.pid) - before) // 1024
            raise AssertionError(f"no GoAway ({exc}); the server's RSS grew by {grown} MiB") from None
        assert message[2] == Status.RESOURCE_EXHAUSTED, message
        assert "limits.max_stream_buffer" in message[3], message
        peer.wait_closed(timeout=5)
    with SyncClient(server.address, token_file=str(server.token_file), timeout=10, insecure=True) as admin:
        stats = admin.call("admin.stats")
        assert stats["closed_abuse"] == 1
        assert stats["stream_buffer_bytes"] == 0
        assert admin.call("demo.echo", value="after") == "after"
    wait_for(lambda: "limits.max_stream_buffer" in server.log(), 5, what="the close to be logged")


def test_buffered_bytes_return_to_zero_after_cancel_error_and_end(
    server_factory: Callable[..., ServerProcess],
) -> None:
    server = server_factory(insecure=True)
    size = 1000
    with RawPeer(server.host, server.port) as peer:
        peer.hello(server.token)
        # Cancelled while its handler runs (not reading): its 16 items are released.
        peer.send(call(1, hold=60) + items(1, 16, size))
        wait_for(lambda: buffered(server) >= 16 * size, 5, what="the items to be counted")
        peer.send(frame([CANCEL, 1]))
        wait_for(lambda: buffered(server) == 0, 5, what="the cancelled call's items to be released")
        # Cancelled in the same read as its Call: it never runs.
        peer.send(call(3, hold=60) + items(3, 16, size) + frame([CANCEL, 3]))
        wait_for(lambda: buffered(server) == 0, 5, what="the never-run call's items to be released")
        # The handler fails after one item, 15 left unread.
        peer.send(call(5, hold=0.2, fail_after=1) + items(5, 16, size))
        assert answer(peer)[:2] == [ERROR, 5]
        wait_for(lambda: buffered(server) == 0, 5, what="the failed call's items to be released")
        # The normal end: every item taken.
        peer.send(call(7) + items(7, 16, size) + frame([END, 7]))
        result = answer(peer)
        assert result[:2] == [RESULT, 7] and result[2] == 16 * size, result
        assert buffered(server) == 0
        assert not peer.is_closed_now()
