"""The blocking client against a real server: calls made while a stream is read, close from another thread, fork."""

from __future__ import annotations

from bastion import SyncClient
from tests.support.server import ServerProcess


def test_a_call_made_while_a_stream_is_read_leaves_the_streams_items_to_it(server: ServerProcess) -> None:
    with SyncClient(server.address, token_file=str(server.token_file), timeout=20) as client:
        seen = []
        for item in client.stream("demo.count", n=2000):
            seen.append(item)
            assert client.call("demo.echo", value=item) == item  # reads the socket while the stream waits
        assert seen == list(range(2000))
        assert client.call("demo.echo", value="after") == "after"
