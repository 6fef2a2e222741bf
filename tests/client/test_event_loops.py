"""One ``Client`` and several event loops, against real TCP servers (tests/support/hostile_server.py).

A client kept from one ``asyncio.run`` to the next held a connection of the
first loop, closed by then: its next call raised a bare ``RuntimeError: Event
loop is closed`` from deep inside the transport. Now the client leaves that
connection behind and opens one on the running loop. A client used from a
loop while another loop, still running, holds its connection (two threads)
gets a UsageError saying so.
"""

from __future__ import annotations

import asyncio
import os
import threading
from typing import Any

import pytest

from bastion import Client, UsageError
from tests.adversity.test_hostile_peers import poll
from tests.support.hostile_server import RESULT, HostileServer, Peer, wait_for
from tests.support.server import ServerProcess

ITEM = 7


async def serve(peer: Peer) -> None:
    """Answers ``count`` with items 0..n-1, ``admin.ready`` with ready, anything else with its call id."""
    await peer.handshake()
    while True:
        call = await peer.read_call()
        if call[2] == "count":
            for i in range(call[3]["n"]):
                peer.send(ITEM, call[1], i)
            peer.send(RESULT, call[1], None)
        elif call[2] == "admin.ready":
            peer.send(RESULT, call[1], {"ready": True})
        else:
            peer.send(RESULT, call[1], "ok")


def ready_checks(server: HostileServer, peer: int) -> int:
    return sum(1 for m in server.peers[peer].received if m[0] == 3 and m[2] == "admin.ready")


def test_a_client_kept_from_one_asyncio_run_to_the_next_reconnects_on_the_new_loop() -> None:
    with HostileServer(serve) as server:
        client = Client(server.address, insecure=True, timeout=5)

        async def first() -> Any:
            return await client.call("x.y")

        async def second() -> list[Any]:
            got = [await client.call("x.y"), await client.invoke("x.y", {}, idempotent=True)]
            got.append([i async for i in client.stream("count", n=3)])
            await client.close()
            return got

        assert asyncio.run(first()) == "ok"
        assert asyncio.run(second()) == ["ok", "ok", [0, 1, 2]]
        assert len(server.peers) == 2  # one connection per loop
        wait_for(server.peers[0].closed.is_set, "the first loop's connection to be shut down")


def socket_of(client: Client) -> tuple[int, str]:
    """The descriptor of the client's connection, and what it is (``socket:[inode]``)."""
    conns = [client._conn] if client._conn is not None else [s.conn for s in client._slots.values() if s.conn]
    assert len(conns) == 1 and conns[0] is not None and conns[0].link is not None
    fd: int = conns[0].link.transport.get_extra_info("socket").fileno()
    return fd, os.readlink(f"/proc/self/fd/{fd}")


def still_open(fd: int, what: str) -> bool:
    try:
        return os.readlink(f"/proc/self/fd/{fd}") == what
    except FileNotFoundError:
        return False


@pytest.mark.parametrize("balanced", [False, True], ids=["one-server", "balanced"])
def test_a_client_left_open_when_asyncio_run_ends_closes_its_socket_as_the_loop_shuts_down(balanced: bool) -> None:
    """``asyncio.run`` closed its loop under a client nobody closed: the transport was that loop's, and could
    not be closed once the loop was, so the socket stayed open -- the server saw no end, the descriptor
    stayed taken -- until the garbage collector found it (ResourceWarning). Now the client closes the
    connection as the loop shuts down (its async generators are closed then), with the client still held."""
    with HostileServer(serve) as server:
        client = Client([server.address] if balanced else server.address, insecure=True, timeout=5)

        async def call() -> tuple[int, str]:
            assert await client.call("x.y") == "ok"
            return socket_of(client)

        fd, what = asyncio.run(call())
        wait_for(lambda: not still_open(fd, what), "the client's socket to be closed")
        wait_for(server.peers[0].closed.is_set, "the server to see the connection end")
        assert asyncio.run(call())[1] != what  # and the client carries on, on a new connection
        asyncio.run(client.close())


def test_a_tls_connection_left_open_when_asyncio_run_ends_is_closed_too(server: ServerProcess) -> None:
    """The same over TLS (a real server process): the TLS transport's close waits for the peer's
    close_notify, which a loop about to close never reads, so the connection is aborted after it."""
    client = Client(server.address, token_file=str(server.token_file), timeout=10)

    async def call() -> tuple[int, str]:
        assert await client.call("demo.echo", value=1) == 1
        return socket_of(client)

    fd, what = asyncio.run(call())
    wait_for(lambda: not still_open(fd, what), "the client's socket to be closed")
    asyncio.run(client.close())


def test_invoke_and_stream_first_on_a_new_loop_reconnect_too() -> None:
    with HostileServer(serve) as server:
        client = Client(server.address, insecure=True, timeout=5)
        asyncio.run(client.connect())

        async def stream_first() -> list[Any]:
            return [i async for i in client.stream("count", n=2)]

        assert asyncio.run(stream_first()) == [0, 1]
        assert asyncio.run(client.invoke("x.y", {}, timeout=2)) == "ok"
        asyncio.run(client.close())
        assert len(server.peers) == 3


def test_a_client_whose_loop_was_closed_by_hand_reconnects_and_closes_on_the_new_one() -> None:
    """No ``asyncio.run``: a loop run by hand and closed with the client's tasks still pending."""
    with HostileServer(serve) as server:
        client = Client(server.address, insecure=True)
        loop = asyncio.new_event_loop()
        assert loop.run_until_complete(client.call("x.y")) == "ok"
        loop.close()
        assert asyncio.run(client.call("x.y")) == "ok"
        asyncio.run(client.close())
        assert len(server.peers) == 2


def test_a_balanced_client_reconnects_and_checks_health_on_the_new_loop() -> None:
    with HostileServer(serve) as one, HostileServer(serve) as other:
        client = Client([one.address, other.address], insecure=True, timeout=5, health_interval=0.1)

        async def calls() -> list[Any]:
            return [await client.call("x.y") for _ in range(6)]

        assert asyncio.run(calls()) == ["ok"] * 6

        async def second() -> list[Any]:
            got = await calls()
            await poll(
                lambda: any(len(s.peers) > 1 and ready_checks(s, -1) for s in (one, other)),
                "a health check on the new loop's connection",
            )
            # The checks use the calls' connections: one connection per server and loop, never one of
            # their own (a server the calls did not reach on this loop gets its first one from a check).
            assert len(one.peers) <= 2 and len(other.peers) <= 2, (one.peers, other.peers)
            await client.close()
            return got

        assert asyncio.run(second()) == ["ok"] * 6


def test_a_client_held_by_another_running_loop_is_a_usage_error() -> None:
    """Two threads, each with its own running loop, sharing one client: its connection cannot serve
    both. What the second loop starts with the client says so, rather than hanging or corrupting it."""
    with HostileServer(serve) as server:
        client = Client(server.address, insecure=True, timeout=5)
        loop = asyncio.new_event_loop()
        thread = threading.Thread(target=loop.run_forever, daemon=True)
        thread.start()
        try:
            asyncio.run_coroutine_threadsafe(client.connect(), loop).result(5)

            async def from_here() -> None:
                with pytest.raises(UsageError, match="belongs to the event loop it connected on"):
                    await client.connect()
                with pytest.raises(UsageError, match="another event loop"):
                    async for _ in client.stream("count", n=1):
                        pass

            asyncio.run(from_here())
            assert asyncio.run_coroutine_threadsafe(client.call("x.y"), loop).result(5) == "ok"  # still fine there
            asyncio.run_coroutine_threadsafe(client.close(), loop).result(5)
        finally:
            loop.call_soon_threadsafe(loop.stop)
            thread.join(5)
            loop.close()
        assert len(server.peers) == 1
