"""Both clients against servers that misbehave: real TCP, frames written by hand (tests/support/hostile_server.py).

Every piece of bad input from a server must reach the caller as a bastion
error that says what went wrong -- never a bare ValueError, never a hang --
and must not leave the client unable to make its next call.
"""

from __future__ import annotations

import asyncio
import select
import threading
import time
from typing import Any

import pytest

from bastion import Client, SyncClient
from bastion.client._connection import ClientClosed
from bastion.exceptions import DeadlineExceeded, RemoteProtocolError
from bastion.status import Status
from tests.adversity.test_hostile_peers import poll
from tests.support.hostile_server import (
    BAD_UTF8,
    CALL,
    GOAWAY,
    RESULT,
    HostileServer,
    Peer,
    frame,
    result_frame,
    wait_for,
)


def run(coro: Any) -> Any:
    async def guarded() -> Any:
        async with asyncio.timeout(20):
            return await coro

    return asyncio.run(guarded())


async def bad_utf8_then_echo(peer: Peer) -> None:
    """Answers call 1 with a str that is not UTF-8, later calls with their own id."""
    await peer.handshake()
    while True:
        call = await peer.read_call()
        if call[1] == 1:
            peer.send_raw(result_frame(1, BAD_UTF8))
        else:
            peer.send(RESULT, call[1], call[1])


@pytest.mark.parametrize("how", ["call", "invoke"])
def test_a_result_that_is_not_utf8_is_a_protocol_error_not_a_unicode_error(how: str) -> None:
    """The frame decoder skips over a Result's value; decoding it later raised a bare UnicodeDecodeError
    out of ``await client.call(...)`` -- not a BastionError, so code catching those missed it."""

    async def main(address: str) -> None:
        async with Client(address, insecure=True, timeout=5) as client:
            with pytest.raises(RemoteProtocolError, match="not valid MessagePack") as caught:
                if how == "call":
                    await client.call("x.y")
                else:
                    await client.invoke("x.y", {}, idempotent=True)
            assert caught.value.status is Status.INVALID_ARGUMENT
            assert await client.call("x.y") == 2  # the framing was intact: the connection serves on

    with HostileServer(bad_utf8_then_echo) as server:
        run(main(server.address))
        assert len(server.peers) == 1


def test_a_stream_item_that_is_not_utf8_is_a_protocol_error() -> None:
    async def script(peer: Peer) -> None:
        await peer.handshake()
        call = await peer.read_call()
        peer.send(7, call[1], "fine")
        peer.send_raw(frame(b"\x93\x07" + bytes([call[1]]) + BAD_UTF8))  # an Item
        peer.send(RESULT, call[1], None)
        await peer.until_closed()

    async def main(address: str) -> None:
        async with Client(address, insecure=True, timeout=5) as client:
            seen = []
            with pytest.raises(RemoteProtocolError, match="not valid MessagePack"):
                async for item in client.stream("x.items"):
                    seen.append(item)
            assert seen == ["fine"]

    with HostileServer(script) as server:
        run(main(server.address))


def test_the_sync_client_reports_a_result_that_is_not_utf8_as_a_protocol_error() -> None:
    with HostileServer(bad_utf8_then_echo) as server, SyncClient(server.address, insecure=True, timeout=5) as client:
        with pytest.raises(RemoteProtocolError, match="not valid MessagePack"):
            client.call("x.y")
        assert client.call("x.y") == 2


# -- GoAway and drain -----------------------------------------------------------------------------------------


def goaway_then(answer_after: float | None) -> Any:
    """A server that answers ``x.first`` on a connection it drains (GoAway, then the answer ``answer_after``
    seconds later, or never) and never closes that connection itself; other calls are answered at once."""

    async def script(peer: Peer) -> None:
        await peer.handshake()
        call = await peer.read_call()
        if call[2] == "x.first":
            peer.send(GOAWAY, call[1], 0, "draining")
            if answer_after is not None:
                await asyncio.sleep(answer_after)
                peer.send(RESULT, call[1], "old")
        else:
            peer.send(RESULT, call[1], "new")
        await peer.until_closed(30)

    return script


def test_a_drained_connection_is_closed_once_its_last_call_is_answered() -> None:
    """The client closed a connection the server had sent GoAway on only if it had no call left at the
    GoAway, or when a call was cancelled: once the last call in flight was answered it kept the socket
    open for as long as the server did -- and ``close`` did not close it either (it no longer held it)."""

    async def main(server: HostileServer) -> None:
        client = Client(server.address, insecure=True, timeout=5)
        first = asyncio.ensure_future(client.call("x.first"))
        await poll(lambda: server.peers and any(m[0] == CALL for m in server.peers[0].received), "the first call")
        assert await client.call("x.second") == "new"  # on a new connection: the first is draining
        assert await first == "old"
        await poll(lambda: server.peers[0].closed.is_set(), "the drained connection to close")
        await client.close()
        await poll(lambda: server.peers[1].closed.is_set(), "the new connection to close")

    with HostileServer(goaway_then(0.2)) as server:
        run(main(server))


def test_close_closes_a_draining_connection_and_fails_its_call() -> None:
    async def main(server: HostileServer) -> None:
        client = Client(server.address, insecure=True, timeout=10)
        first = asyncio.ensure_future(client.call("x.first"))
        await poll(lambda: server.peers and any(m[0] == CALL for m in server.peers[0].received), "the first call")
        assert await client.call("x.second") == "new"
        await client.close()
        with pytest.raises(ClientClosed):
            await asyncio.wait_for(first, 2)  # not the 10 s timeout: close ends it
        await poll(lambda: all(peer.closed.is_set() for peer in server.peers), "both connections to close")

    with HostileServer(goaway_then(None)) as server:
        run(main(server))


# -- a server that accepts TCP but never answers the handshake ----------------------------------------------


async def never_welcome(peer: Peer) -> None:
    await peer.until_closed(60)


def test_calls_waiting_for_a_connection_keep_their_own_deadline() -> None:
    """A call's timeout did not cover connecting: with ``timeout=0.5`` a call to a server that never
    answers the handshake failed after ``connect_timeout`` (3 s), and calls made meanwhile each waited for
    the one before to fail, then made their own attempt: the third failed after 9 s."""

    async def main(server: HostileServer) -> None:
        client = Client(server.address, insecure=True, timeout=0.5, connect_timeout=3)
        loop = asyncio.get_running_loop()
        start = loop.time()

        async def one() -> float:
            with pytest.raises(DeadlineExceeded, match="no connection"):
                await client.call("x.y")
            return loop.time() - start

        took = await asyncio.gather(one(), one(), one())
        assert max(took) < 2.0, took
        assert len(server.peers) == 1  # one attempt, shared
        await client.close()
        await poll(lambda: server.peers[0].closed.is_set(), "the half-open connection to close")

    with HostileServer(never_welcome) as server:
        run(main(server))


def test_a_call_cancelled_while_connecting_leaves_no_connection_behind() -> None:
    async def main(server: HostileServer) -> None:
        client = Client(server.address, insecure=True, connect_timeout=30)
        call = asyncio.ensure_future(client.call("x.y"))
        await poll(lambda: server.peers, "the connection")
        call.cancel()
        with pytest.raises(asyncio.CancelledError):
            await call
        await client.close()
        await poll(lambda: server.peers[0].closed.is_set(), "the half-open connection to close")

    with HostileServer(never_welcome) as server:
        run(main(server))


def close_while_connecting(*servers: HostileServer) -> None:
    async def main() -> None:
        addresses = [server.address for server in servers]
        client = Client(addresses, insecure=True, timeout=5, connect_timeout=5, health_interval=None)
        calls = [asyncio.ensure_future(client.call("x.y")) for _ in range(3)]
        await poll(lambda: all(server.peers for server in servers), "the calls to be connecting")
        await client.close()
        for call in calls:
            with pytest.raises(ClientClosed):
                await asyncio.wait_for(call, 2)

    run(main())


def test_close_fails_the_calls_waiting_for_a_connection_with_client_closed() -> None:
    """close() cancels the shared connect attempt: its waiters must see ClientClosed, not a CancelledError
    that looks like their own."""
    with HostileServer(never_welcome) as server:
        close_while_connecting(server)
    with HostileServer(never_welcome) as one, HostileServer(never_welcome) as other:
        close_while_connecting(one, other)  # balanced: each endpoint's attempt


def test_the_sync_clients_call_timeout_covers_connecting() -> None:
    with HostileServer(never_welcome) as server:
        client = SyncClient(server.address, insecure=True, timeout=0.5, connect_timeout=3)
        start = time.monotonic()
        with pytest.raises(DeadlineExceeded, match="no connection"):
            client.call("x.y")
        assert time.monotonic() - start < 2.0
        client.close()


# -- a connection dropped while the sync client was idle ----------------------------------------------------


def test_the_sync_client_does_not_fail_a_call_on_a_connection_dropped_while_idle() -> None:
    """The sync client reads only during a call. A connection closed while it was idle -- a proxy's or
    NAT's idle timeout, a server restart -- was found dead only after the next call had been written to
    it: ConnectionClosed, and a call that is not idempotent is not retried, though it never reached a
    server. (urllib3 checks a pooled connection the same way before reusing it.)"""

    async def script(peer: Peer) -> None:
        await peer.handshake()
        if len(server.peers) == 1:
            peer.writer.close()  # dropped without a word, as an idle timeout in between does
            return
        while True:
            call = await peer.read_call()
            peer.send(RESULT, call[1], "fresh")

    with HostileServer(script) as server, SyncClient(server.address, insecure=True, timeout=5) as client:
        link = client._link
        assert link is not None
        wait_for(lambda: select.select([link.sock], [], [], 0)[0], "the drop to reach the client")
        assert client.invoke("x.write", {}, idempotent=False) == "fresh"
        assert len(server.peers) == 2


def test_a_sync_call_waiting_for_another_threads_call_keeps_its_deadline() -> None:
    """A SyncClient makes one call at a time; a call from a second thread waited for the first without
    limit, its own timeout ignored: with the first call stuck on a server that never answers, the second
    never returned."""

    async def script(peer: Peer) -> None:
        await peer.handshake()
        while True:
            call = await peer.read_call()
            if call[2] != "x.hang":
                peer.send(RESULT, call[1], "quick")

    with HostileServer(script) as server, SyncClient(server.address, insecure=True) as client:

        def hang() -> None:
            with pytest.raises(ClientClosed):
                client.call("x.hang")

        stuck = threading.Thread(target=hang, daemon=True)
        stuck.start()
        wait_for(lambda: any(m[2] == "x.hang" for m in server.peers[0].received if m[0] == CALL), "the stuck call")
        outcome: list[BaseException | str] = []

        def second() -> None:
            try:
                outcome.append(client.invoke("x.quick", {}, timeout=0.5))
            except BaseException as exc:
                outcome.append(exc)

        start = time.monotonic()
        waiting = threading.Thread(target=second, daemon=True)
        waiting.start()
        waiting.join(5)
        try:
            assert not waiting.is_alive(), "the second call ignored its timeout"
            assert isinstance(outcome[0], DeadlineExceeded), outcome
            assert "turn" in str(outcome[0])
            assert time.monotonic() - start < 2.0
        finally:
            client.close()  # fails the stuck call (ClientClosed), freeing both threads
            stuck.join(5)
            waiting.join(5)


# -- a balanced client with one endpoint that accepts TCP but never answers -----------------------------------


async def echo_ok(peer: Peer) -> None:
    await peer.handshake()
    while True:
        call = await peer.read_call()
        peer.send(RESULT, call[1], "ok")


def test_a_balanced_client_fails_over_from_an_endpoint_that_never_answers_the_handshake() -> None:
    """An endpoint that accepts TCP but never answers the handshake (a hung process, a blackhole) held up
    every call that picked it until the connect attempt failed -- and calls waiting for a connection count
    as none outstanding, so power-of-two-choices kept picking it. Each such call waited its own deadline
    (DeadlineExceeded, though the other endpoint was healthy) or connect_timeout, and calls made meanwhile
    queued behind it. Now a call waits CONNECT_ATTEMPT_DELAY for one endpoint, then tries the next
    alongside; the connected one takes it, and endpoints still connecting are picked only if none is
    connected."""

    async def main(hung: HostileServer, good: HostileServer) -> None:
        client = Client([hung.address, good.address], insecure=True, timeout=2, connect_timeout=3, health_interval=None)
        loop = asyncio.get_running_loop()
        start = loop.time()
        assert [await client.call("x.y") for _ in range(5)] == ["ok"] * 5
        assert await asyncio.gather(*(client.call("x.y") for _ in range(10))) == ["ok"] * 10
        assert loop.time() - start < 3.0
        await client.close()

    with HostileServer(never_welcome) as hung, HostileServer(echo_ok) as good:
        run(main(hung, good))


def test_closing_a_sync_client_from_another_thread_ends_a_call_stuck_in_the_handshake() -> None:
    """``close`` fails a call in progress in another thread at once by aborting its connection -- but not
    while that call was still waiting for the server's Welcome: the link was not the client's yet, so
    close waited for connect_timeout (here 30 s)."""
    with HostileServer(never_welcome) as server:
        client = SyncClient(server.address, insecure=True, connect_timeout=30)
        outcome: list[BaseException] = []

        def call() -> None:
            try:
                client.call("x.y")
            except BaseException as exc:
                outcome.append(exc)

        caller = threading.Thread(target=call, daemon=True)
        caller.start()
        wait_for(lambda: server.peers and server.peers[0].received, "the Hello")
        start = time.monotonic()
        closer = threading.Thread(target=client.close, daemon=True)
        closer.start()
        closer.join(5)
        caller.join(5)
        assert not closer.is_alive() and not caller.is_alive(), "close waited for the handshake"
        assert time.monotonic() - start < 2.0
        assert isinstance(outcome[0], ClientClosed), outcome
